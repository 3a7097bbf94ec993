"""Triton weight-only matmul kernels against float64 dequantize-then-matmul (CUDA only; skipped elsewhere).

Every check: random non-zero weights and activations, an output buffer poisoned with NaN (plus one extra
poisoned row that must stay untouched), and a relative error bound set by the output dtype's rounding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelpress.formats import WeightScheme, quantize_weight
from modelpress.nn import QuantLinear
from modelpress.nn.backends import backend_names

if not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA", allow_module_level=True)
pytest.importorskip("triton")

from modelpress.nn.triton_backend import (
    KernelConfig,
    choose_plan,
    dequantize,
    fused_matmul,
    plan_for,
    quantized_matmul,
    triton_linear,
)

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")
# output rounding dominates: float32 accumulation, exact small-integer weights
TOLERANCE = {torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
SPECS = ["int4/g128", "int4/g32", "int4-asym/g128", "int4-asym/g64", "int4/g96", "int4/tensor", "nf4/g64",
         "nf4/g128", "int8/channel", "int8/g64", "int8-asym/g32", "fp8-e4m3/channel", "fp8-e4m3/g128",
         "fp8-e5m2/g64"]
N, K = 72, 200  # N not a multiple of any tile; K leaves a short last group for every group size


def make_packed(spec: str, n: int, k: int, seed: int, perm: bool = False):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    order = torch.randperm(k, generator=gen) if perm else None
    return quantize_weight(weight, WeightScheme.parse(spec), input_perm=order).to(DEVICE)


def reference(x: torch.Tensor, packed, bias: torch.Tensor | None) -> torch.Tensor:
    weight = packed.dequantize(torch.float64)  # layer's own column order, input_perm undone
    y = x.double() @ weight.T
    return y if bias is None else y + bias.double()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def run_poisoned(x, packed, bias, config, **kwargs):
    m, n = x.shape[0], packed.shape[0]
    buffer = torch.full((m + 1, n), float("nan"), device=DEVICE, dtype=x.dtype)
    y = fused_matmul(x, packed, bias, config, out=buffer[:m], **kwargs)
    assert y.data_ptr() == buffer.data_ptr()
    assert torch.isnan(buffer[m]).all(), "kernel wrote past the last row"
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec", SPECS)
def test_fused_matches_float64_for_odd_m(spec, dtype):
    packed = make_packed(spec, N, K, seed=SPECS.index(spec))
    bias = torch.randn(N, device=DEVICE).to(dtype)
    for m in (1, 3, 16, 17, 257):
        x = torch.randn(m, K, device=DEVICE).to(dtype)
        config = plan_for(m, packed, DEVICE)
        y = run_poisoned(x, packed, bias, config)
        assert torch.isfinite(y).all(), f"{spec} M={m}: unwritten or non-finite outputs"
        err = relative_error(y, reference(x, packed, bias))
        assert err < TOLERANCE[dtype], f"{spec} M={m} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", [
    KernelConfig(BM=16, BN=16, BKG=32, SUB=2, SPLIT=3),
    KernelConfig(BM=16, BN=64, BKG=32, SUB=4, SPLIT=1, num_warps=2, num_stages=2),
    KernelConfig(BM=64, BN=32, BKG=64, SUB=1, SPLIT=2),
], ids=["split3", "sub4", "bm64-split2"])
@pytest.mark.parametrize("spec", ["int4/g64", "int4-asym/g32", "nf4/g64", "int8-asym/g64", "fp8-e4m3/g64"])
def test_tile_options_and_input_perm(spec, config, dtype):
    packed = make_packed(spec, 100, 328, seed=7, perm=True)
    x = torch.randn(5, 328, device=DEVICE).to(dtype)
    ref = reference(x, packed, None)
    out = run_poisoned(x, packed, None, config) if config.SPLIT == 1 else fused_matmul(x, packed, None, config)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < TOLERANCE[dtype]
    # the portable decode path (used by TRITON_INTERPRET) must agree with the inline-PTX one
    portable = fused_matmul(x, packed, None, config, use_asm=False)
    assert relative_error(portable, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("spec", ["int4/g128", "int4-asym/g32", "nf4/g64", "int8/channel", "fp8-e5m2/g128"])
def test_dequantize_kernel_is_exact(spec):
    packed = make_packed(spec, 70, 328, seed=3)
    expected = packed.dequantize(torch.float32)
    got = dequantize(packed, torch.float32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("m", [1, 16])
def test_fp8_e4m3_decoded_by_bits_equals_the_conversion(m):
    """GPUs before compute capability 8.9 have no e4m3 conversion and decode the codes in integer arithmetic
    (KernelConfig.native_fp8=False, what for_capability picks there): the same values as the conversion, for
    every bit pattern but NaN (both zeros and the subnormals included), so the same outputs bit for bit."""
    packed = make_packed("fp8-e4m3/channel", 64, 256, seed=13)
    patterns = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    packed.qdata[:, :256].copy_(patterns[torch.randperm(64 * 256) % len(patterns)].reshape(64, 256))
    x = torch.randn(m, 256, device=DEVICE).to(torch.bfloat16)
    config = plan_for(m, packed, DEVICE)
    assert config.native_fp8
    converted = fused_matmul(x, packed, None, config)
    by_bits = fused_matmul(x, packed, None, dataclasses.replace(config, native_fp8=False))
    assert torch.equal(converted, by_bits)
    assert relative_error(by_bits, reference(x, packed, None)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prefill_plan_dequantizes_then_gemms(dtype):
    packed = make_packed("int4-asym/g64", N, K, seed=11, perm=True)
    x = torch.randn(2, 600, K, device=DEVICE).to(dtype)
    assert choose_plan(1200, N, K, 64).dequant
    y = quantized_matmul(x, packed, None)
    assert y.shape == (2, 600, N)
    assert relative_error(y.reshape(-1, N), reference(x.reshape(-1, K), packed, None)) < TOLERANCE[dtype]


def test_quant_linear_dispatches_to_triton_on_cuda_only():
    assert "triton" in backend_names()
    packed = make_packed("int4/g32", N, K, seed=5)
    layer = QuantLinear(packed, bias=torch.randn(N)).to(DEVICE)
    x = torch.randn(2, 3, K, device=DEVICE, dtype=torch.float16)
    direct = triton_linear(x, layer.packed, layer.bias)
    assert direct is not None
    assert torch.equal(layer(x), direct)
    assert triton_linear(x.cpu(), packed.to("cpu"), None) is None
    assert triton_linear(x.float(), layer.packed, None) is None  # float32 activations: reference path
    dq = make_packed("int4/g64/dq", N, K, seed=5)
    assert triton_linear(x, dq, None) is None
    assert relative_error(layer(x).reshape(-1, N), reference(x.reshape(-1, K), layer.packed, layer.bias)) < 1.5e-3
