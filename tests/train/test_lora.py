"""LoRA on packed and float bases: zero-start, training only adapters, merging by re-quantization."""

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.errors import ModelpressError
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.quant_linear import QuantLinear
from modelpress.train.data import TaskData
from modelpress.train.distill import DistillConfig, distill
from modelpress.train.lora import LoRAConfig, LoRALinear, add_lora, load_adapters, merge_lora, save_adapters
from modelpress.train.trainer import TrainConfig

SCHEME = WeightScheme.parse("int4/g32")


def reference_path():
    from modelpress.nn.cpu_backend import CPU_BACKEND

    return CPU_BACKEND.disabled()


def packed_layer(seed=0, n=48, k=96):
    g = torch.Generator().manual_seed(seed)
    return QuantLinear(quantize_weight(torch.randn(n, k, generator=g) * 0.05, SCHEME), torch.randn(n, generator=g))


def trained_adapter(seed=0, size=0.05):
    adapter = LoRALinear(packed_layer(seed), rank=4, alpha=8)
    with torch.no_grad():
        adapter.lora_b.normal_(0, size, generator=torch.Generator().manual_seed(seed + 1))
    return adapter


def test_adapter_starts_as_the_base_and_only_adapters_train():
    model = build_tiny_llama(0)
    quantize_rtn(model, RTNConfig(SCHEME))
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    adapters = add_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(adapters) == 14 and all(isinstance(a.base, QuantLinear) for a in adapters.values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)


def test_lora_training_reduces_the_loss_to_the_float_teacher():
    teacher = build_tiny_llama(0)
    student = build_tiny_llama(0)
    quantize_rtn(student, RTNConfig(WeightScheme.parse("int2/g32")))
    add_lora(student, LoRAConfig(rank=4, alpha=8))
    data = TaskData(torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0)))
    result = distill(student, teacher, data, DistillConfig(), TrainConfig(steps=10, lr=3e-3, batch_size=3,
                                                                          precision="fp32"))
    assert result.trained_parameters == sum(a.lora_a.numel() + a.lora_b.numel()
                                            for a in student.modules() if isinstance(a, LoRALinear))
    assert result.train.losses[-1] < result.train.losses[0]


def test_rtn_merge_requantizes_the_merged_weight_never_adds_to_codes():
    adapter = trained_adapter()
    model = nn.Sequential(adapter)
    base = adapter.base
    merged_float = base.dequantized_weight() + adapter.delta_weight().detach()
    expected = quantize_weight(merged_float, base.scheme)
    merge_lora(model, "rtn")
    new = model[0]
    assert isinstance(new, QuantLinear) and new.scheme == base.scheme
    for name, tensor in expected.tensors().items():
        assert torch.equal(getattr(new, name), tensor), name
    assert torch.equal(new.bias, base.bias)
    # adding the update to the stored codes (old scales, clamped to the grid) is a different, worse answer
    step = base.packed.group_scales().repeat_interleave(32, dim=1)
    naive_codes = (base.packed.codes().float() + torch.round(adapter.delta_weight().detach() / step)).clamp(0, 15)
    naive = (naive_codes - 8) * step
    assert not torch.equal(new.qdata, base.qdata)
    assert not torch.equal(new.scale, base.scale)              # fresh scales for the new weight
    error_merge = (new.dequantized_weight() - merged_float).norm()
    error_naive = (naive - merged_float).norm()
    assert error_merge < error_naive


def test_merging_a_float_base_gives_the_exact_float_weight():
    layer = nn.Linear(32, 16)
    adapter = LoRALinear(layer, rank=2, alpha=4)
    with torch.no_grad():
        adapter.lora_b.normal_()
    expected = layer.weight.detach() + adapter.delta_weight().detach()
    model = nn.Sequential(adapter)
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = model(x)
    merge_lora(model, "rtn")
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0].weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_adapters_round_trip_through_safetensors(tmp_path):
    model = nn.Sequential(trained_adapter(0), nn.ReLU(), trained_adapter(1))
    x = torch.randn(2, 96)
    model[2] = LoRALinear(QuantLinear(quantize_weight(torch.randn(48, 48) * 0.05, SCHEME)), rank=4, alpha=8)
    with torch.no_grad():
        model[2].lora_b.normal_()
        model[0].base.bias.zero_()
        expected = model(x)
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = nn.Sequential(model[0].base, nn.ReLU(), model[2].base)
    loaded = load_adapters(fresh, path)
    assert sorted(loaded) == ["0", "2"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_gptq_merge_requantizes_with_calibration():
    model = build_tiny_llama(0)
    quantize_rtn(model, RTNConfig(SCHEME))
    adapters = add_lora(model, LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_b.normal_(0, 0.01, generator=g)
    ids = torch.randint(0, 320, (4, 32), generator=g)
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
    with pytest.raises(ModelpressError, match="calibration"):
        merge_lora(model, "gptq")
    done = merge_lora(model, "gptq", calibration_ids=ids)
    assert len(done) == 14 and all(isinstance(m, QuantLinear) and m.scheme == SCHEME for m in done.values())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad(), reference_path():
        merged_logits = model(input_ids=ids).logits
    assert (merged_logits - lora_logits).norm() < 0.2 * lora_logits.norm()


def test_bad_settings_fail_clearly():
    with pytest.raises(ModelpressError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ModelpressError, match="merge method"):
        merge_lora(nn.Sequential(trained_adapter()), "awq")
    with pytest.raises(ModelpressError, match="no LoRA adapters"):
        merge_lora(nn.Sequential(nn.Linear(2, 2)))
