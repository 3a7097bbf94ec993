"""Quantization-aware training: straight-through gradients, and conversion to exactly the PTQ layers."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama
from torch import nn

from modelpress.formats.packed import fake_quantize, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.quant_linear import QuantLinear
from modelpress.train.data import TaskData
from modelpress.train.distill import DistillConfig, distill, distillation_loss_fn
from modelpress.train.qat import FakeQuantLinear, convert_qat, prepare_qat
from modelpress.train.trainer import TrainConfig


def reference_path():
    """Packed layers computed by the reference path (dequantize, then F.linear), not a fast kernel."""
    from modelpress.nn.cpu_backend import CPU_BACKEND

    return CPU_BACKEND.disabled()


SCHEMES = ["int4/g32", "int3/g32", "int4-asym/g32", "int2/channel", "nf4/g32", "nf4/g32/dq", "fp4/g32",
           "fp8-e4m3", "ternary/g32", "int8/channel", "int4/g24"]


@pytest.mark.parametrize("spec", SCHEMES)
def test_fake_quantize_is_the_packed_weight_bit_for_bit(spec):
    scheme = WeightScheme.parse(spec)
    weight = torch.randn(24, 80, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fake_quantize(weight, scheme), quantize_weight(weight, scheme).dequantize())


@pytest.mark.parametrize("spec", ["int4/g32", "int3/g32", "nf4/g32", "int4-asym/g32"])
def test_straight_through_gradient_is_the_gradient_at_the_quantized_weight(spec):
    scheme = WeightScheme.parse(spec)
    g = torch.Generator().manual_seed(0)
    layer = FakeQuantLinear(torch.randn(16, 64, generator=g), torch.randn(16, generator=g), scheme)
    x = torch.randn(5, 64, generator=g)
    target = torch.randn(5, 16, generator=g)
    F.mse_loss(layer(x), target).backward()
    # reference: a plain linear layer holding Q(W); with absmax/min-max scales every weight is in range,
    # so dL/dW through the STE is exactly dL/dQ(W)
    plain = nn.Linear(64, 16)
    with torch.no_grad():
        plain.weight.copy_(fake_quantize(layer.weight, scheme))
        plain.bias.copy_(layer.bias)
    F.mse_loss(plain(x), target).backward()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=0, atol=0)


@pytest.mark.parametrize("spec", SCHEMES)
def test_convert_gives_the_rtn_layer_whose_forward_equals_fake_quant(spec):
    scheme = WeightScheme.parse(spec)
    g = torch.Generator().manual_seed(1)
    layer = FakeQuantLinear(torch.randn(24, 80, generator=g), torch.randn(24, generator=g), scheme)
    model = nn.Sequential(layer)
    x = torch.randn(3, 7, 80, generator=g)
    with torch.no_grad():
        expected = model(x)
    converted = convert_qat(model)["0"]
    assert isinstance(model[0], QuantLinear) and converted is model[0]
    reference = quantize_weight(layer.weight, scheme)
    for name, tensor in reference.tensors().items():
        assert torch.equal(getattr(converted, name), tensor), name
    with torch.no_grad(), reference_path():
        assert torch.equal(model(x), expected)
    with torch.no_grad():   # a fast CPU kernel may serve the packed layer, rounding activations to bfloat16
        assert (model(x) - expected).norm() < 1e-2 * expected.norm()


def test_qat_training_on_a_tiny_llama_then_convert():
    scheme = WeightScheme.parse("int3/g32")
    teacher = build_tiny_llama(0)
    student = build_tiny_llama(0)
    fakes = prepare_qat(student, scheme)
    assert len(fakes) == 14 and "lm_head" not in fakes
    data = TaskData(torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0)))
    config = DistillConfig(freeze=("embed_tokens",))
    loss = distillation_loss_fn(student, teacher, data, config)
    with torch.no_grad():
        before = loss(torch.arange(6)).item()
    distill(student, teacher, data, config, TrainConfig(steps=12, lr=2e-4, batch_size=3, precision="fp32"))
    with torch.no_grad():
        assert loss(torch.arange(6)).item() < 0.8 * before
    ids = data.input_ids[:2]
    with torch.no_grad():
        fake_logits = student(input_ids=ids).logits
    convert_qat(student)
    assert not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    with torch.no_grad(), reference_path():
        torch.testing.assert_close(student(input_ids=ids).logits, fake_logits, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["int4/g32", "int4-asym/g32", "nf4/g32", "int3/channel"])
def test_qat_on_a_packed_grid_starts_at_the_ptq_weight_and_converts_on_that_grid(spec):
    """A PTQ layer with its own scales and column order (as GPTQ leaves it) becomes a FakeQuantLinear whose
    Q(W) is the packed weight at step 0; after training moves W, conversion encodes on the same grid and
    its forward equals the fake-quant forward bit for bit."""
    scheme = WeightScheme.parse(spec)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 64, generator=g)
    perm = torch.randperm(64, generator=g)
    base = quantize_weight(weight, scheme, input_perm=perm)
    shrunk = quantize_weight(weight, scheme, scale=base.scale.float() * 0.9,
                             offset=None if base.offset is None else base.offset.float(), input_perm=perm)
    ptq = QuantLinear(shrunk, torch.randn(16, generator=g))
    model = nn.Sequential(ptq)
    from modelpress.train.qat import prepare_qat_from_packed

    fake = prepare_qat_from_packed(model)["0"]
    assert torch.equal(fake.quantized_weight(), shrunk.dequantize())
    with torch.no_grad():
        fake.weight.add_(torch.randn(16, 64, generator=g) * 0.3)
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        expected = fake(x)
    convert_qat(model)
    converted = model[0]
    assert isinstance(converted, QuantLinear)
    assert torch.equal(converted.packed.scale, shrunk.scale) and torch.equal(converted.packed.input_perm, shrunk.input_perm)
    assert not torch.equal(converted.packed.qdata, shrunk.qdata)  # training moved some codes
    with reference_path(), torch.no_grad():
        assert torch.equal(converted(x), expected)


def test_qat_on_a_packed_grid_refuses_double_quantized_scales():
    scheme = WeightScheme.parse("nf4/g32/dq")
    layer = QuantLinear(quantize_weight(torch.randn(8, 64), scheme))
    with pytest.raises(Exception, match="double quantization"):
        FakeQuantLinear.from_packed(layer)


def test_the_qat_stage_trains_a_packed_model_on_its_own_grid():
    """recover(QAT()) after PTQ: the layers stay on the PTQ grid (same scales), move toward the teacher, and a
    scheme given for an already packed model, or none for a float one, is refused before any training."""
    from modelpress.algorithms.quantize import RTNConfig, quantize_rtn
    from modelpress.errors import ModelpressError
    from modelpress.train.recover import QAT, recover

    teacher = build_tiny_llama(0)
    student = build_tiny_llama(0)
    quantize_rtn(student, RTNConfig("int3/g32"))
    scales = {n: m.packed.scale.clone() for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    ids = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0))
    loss = distillation_loss_fn(student, teacher, TaskData(ids), DistillConfig(freeze=("embed_tokens",)))
    with torch.no_grad():
        before = loss(torch.arange(6)).item()
    with pytest.raises(ModelpressError, match="drop scheme"):
        recover(student, QAT(scheme="int4/g32", steps=2, windows=6), teacher, ids)
    with pytest.raises(ModelpressError, match="needs a scheme"):
        recover(build_tiny_llama(0), QAT(steps=2, windows=6), teacher, ids)
    report = recover(student, QAT(steps=40, lr=1e-3, windows=6, batch_size=3, top_k=None), teacher, ids)
    assert report["converted_layers"] == len(scales)
    after = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    assert after.keys() == scales.keys() and all(torch.equal(after[n].packed.scale, s) for n, s in scales.items())
    loss = distillation_loss_fn(student, teacher, TaskData(ids), DistillConfig(freeze=("embed_tokens",)))
    with torch.no_grad():
        assert loss(torch.arange(6)).item() < 0.8 * before
