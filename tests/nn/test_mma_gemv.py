"""The tensor-core M = 1 GEMV (nn/gluon_mma_gemv.py) against float64 dequantize-then-matmul, on a GPU.

Random weights and activations; a partial last row tile; K that is not a whole number of loop steps; int4
(code zero 8), int4-asym (scale and offset) and nf4; bfloat16 and float16 activations; an output buffer poisoned
with NaN plus one extra row that must stay NaN; and back-to-back PDL launches replayed from a CUDA graph, bit
for bit equal to eager launches without PDL."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
    pytest.skip("needs CUDA and triton", allow_module_level=True)
pytest.importorskip("triton.experimental.gluon")

from modelpress.formats import WeightScheme, quantize_weight  # noqa: E402
from modelpress.nn import gluon_mma_gemv, mma_ptx  # noqa: E402
from modelpress.nn.mma_ptx import NF4_NIBBLE_OF, NIBBLE_OF, mma_layout  # noqa: E402

DEVICE = torch.device("cuda")
# int4 products are exact and summed in float32: the error is the output's rounding (bf16 2**-9, f16 2**-11);
# NF4 levels are rounded to the activations' type first, as dequantize-then-matmul rounds the weight
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 4e-3}
CONFIGS = [dict(rows_per_thread=1, chunks_per_step=2, warps_rows=1, warps_k=4),
           dict(rows_per_thread=2, chunks_per_step=1, warps_rows=2, warps_k=2),
           dict(rows_per_thread=1, chunks_per_step=4, warps_rows=1, warps_k=8),
           dict(rows_per_thread=1, chunks_per_step=2, warps_rows=1, warps_k=4, split=2),  # ragged splits on short K
           dict(rows_per_thread=2, chunks_per_step=1, warps_rows=2, warps_k=2, split=5)]


def make(spec: str, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    packed = quantize_weight(weight, WeightScheme.parse(spec)).to(DEVICE)
    order = NF4_NIBBLE_OF if spec.startswith("nf4") else NIBBLE_OF
    return packed, mma_layout(packed.qdata, n, k, order)


def call(x, packed, words, out=None, **config):
    zero = None if packed.scheme.format == "nf4" else 0 if packed.offset is not None else 8
    return gluon_mma_gemv.mma_gemv(x, words, packed.scale, packed.offset, packed.shape[0],
                                   packed.scheme.group_length(packed.shape[1]), zero=zero, out=out, **config)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec, n, k", [("int4/g128", 40, 576), ("int4-asym/g64", 72, 448), ("nf4/g64", 40, 448),
                                        ("int4/g128", 4096, 4096), ("int4-asym/g128", 1000, 11008),
                                        ("nf4/g64", 2048, 4096)])
def test_mma_gemv_matches_float64(spec, n, k, dtype, config):
    packed, words = make(spec, n, k, seed=n + k)
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    buffer = torch.full((2, n), float("nan"), device=DEVICE, dtype=dtype)
    y = call(x, packed, words, out=buffer[:1], **config)
    assert torch.isnan(buffer[1]).all(), "kernel wrote past the last row"
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    ref = x.double() @ packed.dequantize(torch.float64).T
    error = ((y.double() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE[dtype], error
    again = call(x, packed, words, **config)
    assert torch.equal(again, y)  # deterministic: split-K partial sums are added in a fixed order
    assert torch.equal(call(x, packed, words, depth=2, **config), y)  # two steps of weights in flight: same sums


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec, width, k", [("int4/g128", 5504, 4096), ("nf4/g64", 72, 448),
                                            ("int4-asym/g64", 1000, 1536)])
def test_interleaved_gate_up_rows_and_the_activation_in_the_epilogue(spec, width, k, dtype):
    """A gated MLP's [gate | up] weight re-laid with its rows interleaved: the plain GEMV (whole K and split) gives
    the rows in their stored order, and the activation in the epilogue gives silu(gate) * up as silu_mul does from
    the plain GEMV's output."""
    from modelpress.nn.mma_ptx import interleave_rows
    from modelpress.nn.triton_act import silu_mul

    n = 2 * width
    packed, _ = make(spec, n, k, seed=width)
    order = NF4_NIBBLE_OF if spec.startswith("nf4") else NIBBLE_OF
    words = mma_layout(packed.qdata[interleave_rows(n, DEVICE)], n, k, order)
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    ref = x.double() @ packed.dequantize(torch.float64).T
    for split in (1, 3):
        h = call(x, packed, words, interleave=True, split=split)
        error = ((h.double() - ref).norm() / ref.norm()).item()
        assert error < TOLERANCE[dtype], (split, error)
    buffer = torch.full((2, width), float("nan"), device=DEVICE, dtype=dtype)
    y = call(x, packed, words, out=buffer[:1], interleave=True, act=True)
    assert torch.isnan(buffer[1]).all(), "kernel wrote past the last row"
    h = call(x, packed, words, interleave=True)
    want = silu_mul(h)  # bfloat16; float16 is not silu_mul's: the same two roundings in PyTorch
    if want is None:
        want = (torch.nn.functional.silu(h[:, :width].float()).to(dtype).float() * h[:, width:].float()).to(dtype)
    # the same rounded sums, then an exp and a division approximate in the last float32 bits
    torch.testing.assert_close(y, want, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-5)
    assert (y != want).float().mean() < 0.01


ROW_CONFIGS = [dict(rows_per_thread=1, chunks_per_step=2, warps_rows=1, warps_k=4),
               dict(rows_per_thread=2, chunks_per_step=1, warps_rows=2, warps_k=2),
               dict(rows_per_thread=1, chunks_per_step=4, warps_rows=1, warps_k=8)]


@pytest.mark.parametrize("config", ROW_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 5, 8, 12, 16])
@pytest.mark.parametrize("spec, n, k", [("int4/g128", 40, 576), ("int4-asym/g64", 72, 448), ("nf4/g64", 40, 448),
                                        ("int4/g128", 12288, 4096)])
def test_rows_mode_matches_float64_row_by_row(spec, n, k, m, dtype, config):
    """2..16 rows of x (rows mode: row r in column r % 8 of fragment r // 8 of the MMAs' B): every row of y is that
    row's product, against float64 and against the one-row GEMV (the same exact products, their float32 sums taken
    in another order, so within the magic number's rounding, mma_ptx's docstring); nothing written past the last
    row of y; x laid out in fragment order and two steps of weights in flight give the same bits."""
    packed, words = make(spec, n, k, seed=n + k + m)
    x = torch.randn(m, k, device=DEVICE).to(dtype) * torch.linspace(0.5, 2, m, device=DEVICE).to(dtype)[:, None]
    buffer = torch.full((m + 1, n), float("nan"), device=DEVICE, dtype=dtype)
    y = call(x, packed, words, out=buffer[:m], **config)
    assert torch.isnan(buffer[m]).all(), "kernel wrote past the last row"
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    ref = x.double() @ packed.dequantize(torch.float64).T
    for r in range(m):
        error = ((y[r].double() - ref[r]).norm() / ref[r].norm()).item()
        assert error < TOLERANCE[dtype], (r, error)
        one = call(x[r:r + 1], packed, words, **config)
        # float32 sums of (MAGIC + code) * x: each within 2**-24 (MAGIC + 15) sum |x| of exact, times the scale
        magic = 128.0 if dtype == torch.bfloat16 else 1024.0
        bound = 4 * 2.0 ** -24 * (magic + 15) * x[r].double().abs().sum() * packed.scale.double().abs().max()
        ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11) * ref[r].abs()  # the output's rounding, both sides
        assert ((y[r].double() - one[0].double()).abs() <= 2 * ulp + bound).all(), r
    assert torch.equal(call(x, packed, words, **config), y)
    # x laid out in fragment order: the same words in the same MMAs, so the same bits
    assert torch.equal(call(x, packed, words, laid=mma_ptx.fragment_order(x), **config), y)
    assert torch.equal(call(x, packed, words, depth=2, **config), y)


def test_rows_mode_under_a_cuda_graph_and_through_quant_linear():
    """QuantLinear re-laid for the tensor-core GEMV serves 1..8 rows from it (prepared launchers, PDL) and more
    rows by decoding the weight for cuBLAS: each, like the stored layout's own kernels, against float64; a captured
    8-row call replays bit for bit."""
    from modelpress.inference.fusion import FusionReport, _relayout
    from modelpress.nn.quant_linear import QuantLinear

    packed, _ = make("int4/g128", 12288, 2048, seed=0)  # 768 row tiles: the tensor-core GEMV's plan
    bias = torch.randn(12288, device=DEVICE).to(torch.bfloat16)  # a bfloat16 parameter: the model's dtype
    model = torch.nn.Sequential(QuantLinear(packed, bias))
    layer = model[0]
    xs = {m: torch.randn(m, 2048, device=DEVICE).to(torch.bfloat16) for m in (1, 3, 8, 40)}
    with torch.no_grad():
        want = {m: layer(x) for m, x in xs.items()}
        undo = _relayout(model, FusionReport(), interleave=False)
        assert len(undo) == 1 and "mma_words" in layer.__dict__
        got = {m: layer(x) for m, x in xs.items()}
        static = xs[8].clone()
        graph = torch.cuda.CUDAGraph()
        layer(static)
        with torch.cuda.graph(graph):
            out = layer(static)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got[8])
        for step in undo:
            step()
    weight = packed.dequantize(torch.float64)
    for m, x in xs.items():
        ref = x.double() @ weight.T + bias.double()
        for y in (got[m], want[m]):
            assert ((y.double() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.bfloat16], m


def test_mma_gemv_refuses_what_it_cannot_read():
    packed, words = make("int4/g128", 32, 256, seed=0)
    x = torch.randn(1, 256, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        gluon_mma_gemv.mma_gemv(x, words, packed.scale, None, 32, 32)
    with pytest.raises(ValueError, match="do not lay out"):
        gluon_mma_gemv.mma_gemv(x, words, packed.scale, None, 48, 128)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        gluon_mma_gemv.mma_gemv(x.expand(17, 256).contiguous(), words, packed.scale, None, 32, 128)
    with pytest.raises(ValueError, match="rows mode takes contiguous rows"):
        gluon_mma_gemv.mma_gemv(x.expand(2, 256).contiguous(), words, packed.scale, None, 32, 128, split=2)


@pytest.mark.parametrize("split", [1, 3])
def test_mma_gemv_pdl_chain_under_cuda_graph(split):
    layers = [(make("int4/g128", 512, 1536, seed=s), make("int4/g128", 1536, 512, seed=10 + s)) for s in range(6)]
    x = torch.randn(1, 1536, device=DEVICE).to(torch.bfloat16)

    def chain(pdl):  # split-K GEMVs back to back share the workspace and the arrival counters
        h = x
        for (down, down_words), (up, up_words) in layers:
            h = call(h, down, down_words, pdl=pdl, split=split)
            h = call(h, up, up_words, pdl=pdl, split=split)
            h = h / h.abs().amax()  # keeps the chain's values in range, and puts a PyTorch kernel between GEMVs
        return h

    eager = chain(False)
    static = chain(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = chain(True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, eager)
