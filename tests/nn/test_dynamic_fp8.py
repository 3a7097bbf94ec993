"""FP8 dynamic (W8A8 fp8) layers: per-token fp8 activation codes, the product against a float64 reference of
those codes, the method through the registry and the API, and save/load round trips."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama, char_tokenizer
from modelpress.algorithms.quantize import Fp8DynamicConfig, config_for_method, method_names
from modelpress.api import quantize_model
from modelpress.errors import ModelpressError
from modelpress.formats import WeightScheme, quantize_weight
from modelpress.io.model import LoadedModel
from modelpress.io.save import load_compressed, save_compressed
from modelpress.nn import QuantLinear
from modelpress.nn.dynamic_fp8 import DynamicFp8Linear, fp8_codes, quantize_rows_fp8


def test_rows_are_scaled_to_the_fp8_range_and_rounded_as_pytorch_rounds():
    torch.manual_seed(0)
    x = torch.randn(6, 300) * torch.tensor([1e-3, 1.0, 50.0, 1e4, 1.0, 1.0])[:, None]
    x[4] = 0
    x[5, :3] = torch.tensor([-7.0, 3.0, 1.0])
    codes, scales = quantize_rows_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (6, 1)
    amax = x.abs().amax(dim=1)
    assert torch.equal(scales[:4, 0], amax[:4] / 448)
    assert torch.equal(codes.float()[[0, 1, 2, 3, 5]].abs().amax(dim=1), torch.full((5,), 448.0))
    assert scales[4].item() == 1.0 and not codes[4].float().any()
    assert torch.equal(codes.view(torch.uint8), (x / scales).to(torch.float8_e4m3fn).view(torch.uint8))


def test_layer_is_the_product_of_its_codes():
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40)
    layer = DynamicFp8Linear.from_linear(linear)
    x = torch.randn(3, 7, 96)
    codes, sx = quantize_rows_fp8(x.reshape(-1, 96))
    w = fp8_codes(layer.packed).double()
    expected = (codes.double() @ w.t()) * sx.double() * layer.scale.double().reshape(1, -1) + linear.bias.double()
    got = layer(x)
    assert got.shape == (3, 7, 40)
    torch.testing.assert_close(got.double().reshape(-1, 40), expected, rtol=1e-5, atol=1e-5)
    # the activations really are quantized: not the weight-only fp8 layer's output
    weight_only = QuantLinear(layer.packed, linear.bias)(x)
    assert not torch.allclose(got, weight_only, rtol=1e-4, atol=1e-4)
    assert ((got - weight_only).norm() / weight_only.norm()).item() < 0.05


def test_new_weights_loaded_into_a_used_layer_are_the_ones_used():
    torch.manual_seed(2)
    first, second = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    layer, other = DynamicFp8Linear.from_linear(first), DynamicFp8Linear.from_linear(second)
    x = torch.randn(5, 64)
    layer(x)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))


def test_only_per_channel_fp8_e4m3_weights():
    for spec in ("fp8-e4m3/g64", "fp8-e5m2/channel", "int8/channel"):
        with pytest.raises(ModelpressError, match="fp8-e4m3"):
            DynamicFp8Linear(quantize_weight(torch.randn(8, 64), WeightScheme.parse(spec)))
        with pytest.raises(ModelpressError, match="--format fp8-e4m3"):
            Fp8DynamicConfig(spec)


def test_method_quantizes_a_model_that_saves_and_loads(tmp_path):
    assert "fp8-dynamic" in method_names()
    model = build_tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
    loaded = LoadedModel(model, char_tokenizer(), source="tiny", float_source="tiny")
    report = quantize_model(loaded, config_for_method("fp8-dynamic", "fp8-e4m3/channel"))
    assert report.method == "fp8-dynamic" and report.layers == 14   # 7 per block; the head stays float
    assert sum(isinstance(m, DynamicFp8Linear) for m in model.modules()) == 14
    with torch.no_grad():
        logits = model(ids).logits
    assert ((logits - reference).norm() / reference.norm()).item() < 0.05
    save_compressed(loaded, tmp_path / "out")
    again = load_compressed(tmp_path / "out")
    assert type(again.model.model.layers[1].self_attn.o_proj) is DynamicFp8Linear
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, logits)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 100, 300])
def test_cuda_layer_computes_what_the_cpu_layer_computes(cuda, rows):
    """Up to 64 rows the Triton GEMM, above torch._scaled_mm: the same codes and scales as the CPU path, products
    summed in the tensor cores' precision, the output rounded to bfloat16."""
    pytest.importorskip("triton")
    torch.manual_seed(rows)
    linear = torch.nn.Linear(576, 1536)
    layer = DynamicFp8Linear.from_linear(linear)
    x = (torch.randn(rows, 576) * 3).bfloat16().float()   # what the GPU layer is given
    expected = layer(x)
    got = layer.to(cuda)(x.to(cuda, torch.bfloat16)).float().cpu()
    err = ((got - expected).norm() / expected.norm()).item()   # the sums' precision and the bfloat16 output
    assert err < 6e-3, f"relative error {err:.2e}"
    codes, scales = quantize_rows_fp8(x)
    from modelpress.nn import triton_int8

    gpu_codes, gpu_scales = triton_int8.quantize_rows(x.to(cuda, torch.bfloat16), fp8=True)
    assert torch.equal(gpu_codes.view(torch.uint8).cpu(), codes.view(torch.uint8))
    assert torch.equal(gpu_scales.cpu(), scales)


def test_the_cli_method(tiny_llama_dir, tmp_path, capsys):
    from modelpress.cli import main

    assert main(["quantize", str(tiny_llama_dir), "--method", "fp8-dynamic", "--format", "fp8-e4m3",
                 "--out", str(tmp_path / "out")]) == 0
    loaded = load_compressed(tmp_path / "out")
    assert type(loaded.model.model.layers[0].mlp.down_proj) is DynamicFp8Linear
    assert "fp8-e4m3/channel" in capsys.readouterr().out
    assert main(["quantize", str(tiny_llama_dir), "--method", "fp8-dynamic", "--format", "int8",
                 "--out", str(tmp_path / "bad")]) != 0
    assert "Use --format fp8-e4m3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
def test_generate_captures_fp8_layers_and_keeps_the_tokens(cuda):
    """The captured decode step (graph path) computes what the eager path computes, token for token."""
    pytest.importorskip("triton")
    from modelpress.inference.decoding import GenerationSettings, generate
    from modelpress.inference.sampling import SamplingConfig

    model = build_tiny_llama().to(cuda, torch.bfloat16)
    quantize_model(LoadedModel(model, None, source="tiny", float_source="tiny"), config_for_method("fp8-dynamic", "fp8-e4m3/channel"))
    prompt = list(range(3, 40))
    def tokens(path: str) -> list[int]:
        settings = GenerationSettings(max_new_tokens=12, decode=path, sampling=SamplingConfig(temperature=0.0))
        return generate(model, prompt, settings).tokens

    eager = tokens("eager")
    assert len(eager) == 12
    assert tokens("graph") == eager and tokens("graph") == eager   # the second run reuses the cached scale rows
