"""triton_int8.scaled_matmul (the W8A8 GEMM with its rescale inside) and fp8 activation quantization (CUDA only).

int8: integer sums are exact, so the kernel must equal torch._int_mm followed by the rescale kernel bit for bit,
whatever the tile. fp8: the codes are PyTorch's own float8_e4m3fn rounding of x / scale, and the product is the
float64 product of those codes within float32 summation error.
"""

from __future__ import annotations

import pytest
import torch

from modelpress.formats import WeightScheme, quantize_weight

if not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA", allow_module_level=True)
pytest.importorskip("triton")

from modelpress.nn import triton_int8  # noqa: E402
from modelpress.nn.dynamic import int8_weight  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")
TILES = [triton_int8.GemmTile(), triton_int8.GemmTile(BM=16, BN=64, BK=256, GROUP_M=1, num_warps=4, num_stages=4),
         triton_int8.GemmTile(BM=64, BN=128, BK=64, GROUP_M=4, num_warps=4, num_stages=3)]


def packed(spec: str, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=gen), WeightScheme.parse(spec)).to(DEVICE)


@pytest.mark.parametrize("tile", TILES, ids=["128x128", "16x64", "64x128"])
@pytest.mark.parametrize("shape", [(17, 96, 40), (300, 576, 1536), (129, 4096, 200), (33, 328, 72)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_scaled_matmul_equals_int_mm_then_rescale(tile, shape, bias):
    m, k, n = shape
    weight = packed("int8/channel", n, k, seed=m)
    x = torch.randn(m, k, device=DEVICE).bfloat16() * 3
    b = torch.randn(n, device=DEVICE).bfloat16() if bias else None
    codes, sx = triton_int8.quantize_rows(x)
    out = triton_int8.scaled_matmul(codes, sx, weight.qdata, weight.scale, b, torch.bfloat16, flip=True, tile=tile)
    acc = torch._int_mm(codes, int8_weight(weight).t()) if k % 8 == 0 and n % 8 == 0 else \
        (codes.double() @ int8_weight(weight).double().t()).to(torch.int32)
    expected = triton_int8.rescale(acc, sx, weight.scale, b, torch.bfloat16)
    if b is None:
        assert torch.equal(out, expected)
    else:  # the bias add may fuse into an FMA in one kernel and not the other: one bfloat16 rounding apart
        torch.testing.assert_close(out, expected, rtol=8e-3, atol=1e-2)
    signed = triton_int8.scaled_matmul(codes, sx, int8_weight(weight).contiguous(), weight.scale, b, torch.bfloat16,
                                       tile=tile)
    assert torch.equal(signed, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_row_quantization_is_pytorch_rounding(dtype):
    torch.manual_seed(4)
    x = torch.randn(37, 576, device=DEVICE, dtype=dtype) * torch.rand(37, 1, device=DEVICE, dtype=dtype) * 40
    x[2] = 0
    codes, scales = triton_int8.quantize_rows(x, fp8=True)
    assert codes.dtype == torch.float8_e4m3fn
    amax = x.float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(scales, torch.where(amax > 0, amax / torch.full_like(amax, 448.0), torch.ones_like(amax)))
    expected = (x.float() / scales).to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    assert codes.float().abs().amax(dim=1)[amax.reshape(-1) > 0].eq(448).all()  # each row's largest hits the top
    assert not codes[2].float().any() and scales[2].item() == 1.0


@pytest.mark.parametrize("tile", TILES, ids=["128x128", "16x64", "64x128"])
@pytest.mark.parametrize("shape", [(5, 96, 48), (300, 576, 1536), (129, 4096, 200)])
def test_fp8_scaled_matmul_matches_float64(tile, shape):
    m, k, n = shape
    weight = packed("fp8-e4m3/channel", n, k, seed=k)
    w8 = weight.qdata[:, :k].view(torch.float8_e4m3fn)
    x = torch.randn(m, k, device=DEVICE).bfloat16()
    b = torch.randn(n, device=DEVICE)
    codes, sx = triton_int8.quantize_rows(x, fp8=True)
    out = triton_int8.scaled_matmul(codes, sx, w8, weight.scale, b, torch.float32, tile=tile)
    ref = (codes.double() @ w8.double().t()) * sx.double() * weight.scale.double().reshape(1, -1) + b.double()
    # products of fp8 codes are exact; Hopper's fp8 MMA sums them in reduced precision within each BK step
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, f"relative error {err:.2e}"
    if m > 16 and k % 16 == 0 and n % 16 == 0:  # CUTLASS's row-wise fp8 GEMM, on the same codes and scales
        lib = torch._scaled_mm(codes, w8.t(), scale_a=sx, scale_b=weight.scale.float().reshape(1, -1),
                               out_dtype=torch.float32)
        diff = ((out - b - lib).norm() / lib.norm()).item()
        assert diff < 2e-3, f"against torch._scaled_mm: relative difference {diff:.2e}"


@pytest.mark.parametrize("kind", ["w8a8", "fp8"])
@pytest.mark.parametrize("rows", [8, 300])
def test_layers_prepared_launches_compute_the_unprepared_path(kind, rows):
    """Eager CUDA calls of DynamicInt8Linear / DynamicFp8Linear go through launchers prepared per input shape
    (triton_int8.prepared_linear): the same numbers as the unprepared function, on later calls, after new
    weights are loaded into the layer, and replayed from a CUDA graph."""
    from modelpress.nn.dynamic import DynamicInt8Linear, dynamic_int8_linear
    from modelpress.nn.dynamic_fp8 import DynamicFp8Linear, dynamic_fp8_linear

    torch.manual_seed(rows)
    make = (lambda lin: DynamicInt8Linear.from_linear(lin, WeightScheme.parse("int8/channel"))) if kind == "w8a8" \
        else DynamicFp8Linear.from_linear
    layer = make(torch.nn.Linear(576, 1536)).to(DEVICE)
    other = make(torch.nn.Linear(576, 1536)).to(DEVICE)

    def reference(module, x):
        if kind == "w8a8":
            return dynamic_int8_linear(x, module.packed, module.bias)
        return dynamic_fp8_linear(x, module.packed, module.bias, module.scale.float().reshape(1, -1))

    x = torch.randn(2, rows // 2, 576, device=DEVICE).bfloat16()
    with torch.no_grad():
        first, second = layer(x), layer(x)
        assert layer._launchers and all(fn is not None for fn in layer._launchers.values())
        assert torch.equal(first, reference(layer, x)) and torch.equal(second, first)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), reference(other, x))
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(x * 2)
        graph.replay()
        assert torch.equal(static_y, reference(other, x * 2))
