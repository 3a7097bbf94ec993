"""The M = 1 GEMV kernels (nn/triton_gemv.py) and the prepared eager launcher (triton_backend.prepared_linear)
against float64 dequantize-then-matmul.

With CUDA everything runs on the GPU. Without it, the kernels run under Triton's interpreter
(TRITON_INTERPRET=1) on tiny shapes when triton is installed; the launcher tests need CUDA. Every kernel
check: random weights and activations, activation-order permutation, a short last group, a K tail, an
output row block past N, and an output buffer poisoned with NaN plus one extra row that must stay NaN.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is None:
    pytest.skip("needs triton (on CUDA, or its interpreter on the CPU)", allow_module_level=True)
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

from modelpress.formats import WeightScheme, quantize_weight  # noqa: E402
from modelpress.nn import QuantLinear, triton_backend  # noqa: E402
from modelpress.nn.ops import quant_linear  # noqa: E402
from modelpress.nn.triton_backend import KernelConfig, choose_plan, fused_matmul, gemv_plan, plan_for  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOLERANCE = {torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
SPECS = ["int4/g128", "int4-asym/g32", "int4/g96", "int4/channel", "nf4/g64", "int8/channel", "int8-asym/g32",
         "fp8-e4m3/g64", "fp8-e5m2/channel"]
CONFIGS = [KernelConfig(BM=1, BN=16, BKG=128, SUB=1, SPLIT=1, num_warps=1, gemv=True),
           KernelConfig(BM=1, BN=16, BKG=128, SUB=2, SPLIT=3, num_warps=2, gemv=True)]
N, K = 40, 328  # N: a partial row block; K: a ragged last group for g64/g96/g128 and a tail for every step


def make_packed(spec: str, n: int, k: int, seed: int, perm: bool = True):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    order = torch.randperm(k, generator=gen) if perm else None
    return quantize_weight(weight, WeightScheme.parse(spec), input_perm=order).to(DEVICE)


def relative_error(y, x, packed, bias) -> float:
    ref = x.double() @ packed.dequantize(torch.float64).T
    if bias is not None:
        ref = ref + bias.double()
    return ((y.double() - ref).norm() / ref.norm()).item()


def run_poisoned(x, packed, bias, config, **kwargs):
    m, n = x.shape[0], packed.shape[0]
    buffer = torch.full((m + 1, n), float("nan"), device=DEVICE, dtype=x.dtype)
    y = fused_matmul(x, packed, bias, config, out=buffer[:m], **kwargs)
    assert y.data_ptr() == buffer.data_ptr()
    assert torch.isnan(buffer[m]).all(), "kernel wrote past the last row"
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    return y


# The Gluon GEMV (nn/gluon_gemv.py, 4-bit formats, CUDA only): one row per thread without split-K; two rows per
# thread with a K split of 3 launched as a programmatic dependent launch; warps along K and a cp.async ring.
GLUON_CONFIGS = [KernelConfig(BM=1, BN=32, BKG=128, SUB=1, SPLIT=1, num_warps=1, gemv=True, gluon=True),
                 KernelConfig(BM=1, BN=16, BKG=128, SUB=2, SPLIT=3, num_warps=2, gemv=True, gluon=True,
                              rows_per_thread=2, pdl=True),
                 KernelConfig(BM=1, BN=16, BKG=128, SUB=4, SPLIT=2, num_warps=4, gemv=True, gluon=True,
                              warps_k=2, stages=3, pdl=True)]


@pytest.mark.parametrize("config", CONFIGS + GLUON_CONFIGS,
                         ids=["sub1", "sub2-split3", "gluon", "gluon-split3-pdl", "gluon-ring-warpsk"])
@pytest.mark.parametrize("spec", SPECS)
def test_gemv_matches_float64(spec, config):
    if config.gluon and (not CUDA or WeightScheme.parse(spec).bits != 4):
        pytest.skip("the Gluon GEMV runs on CUDA only and reads 4-bit codes")
    packed = make_packed(spec, N, K, seed=SPECS.index(spec))
    dtypes = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]
    for dtype in dtypes:
        x = torch.randn(1, K, device=DEVICE).to(dtype)
        bias = torch.randn(N, device=DEVICE).to(dtype) if dtype == torch.float16 else None
        y = run_poisoned(x, packed, bias, config)
        err = relative_error(y, x, packed, bias)
        assert err < TOLERANCE[dtype], f"{spec} {config} {dtype}: relative error {err:.2e}"
        if CUDA and packed.scheme.format == "nf4" and not config.gluon:  # the table gather agrees with the PTX
            portable = run_poisoned(x, packed, bias, config, use_asm=False)
            assert relative_error(portable, x, packed, bias) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=["gluon", "gluon-split3-pdl", "gluon-ring-warpsk"])
@pytest.mark.parametrize("spec", ["int4/g128", "int4-asym/g32", "int4/g96", "int4/channel"])
def test_gluon_half_products_match_float64(cuda, spec, config):
    """The Gluon GEMV's float16-pair int4 products (HALF: weights without an input permutation, 16-bit
    activations), against float64 and against its own float32 products (half=False), for activations of any
    range: ordinary, with outlier channels (3e4 in bfloat16; 3e3 in float16, whose outputs would overflow
    otherwise), all of them 1e6 times larger (bfloat16) and 1e4 times smaller. Each thread's activations are
    scaled by a power of two from their largest magnitude, so none overflows float16 or falls below its range."""
    from dataclasses import replace

    packed = make_packed(spec, N, K, seed=SPECS.index(spec) if spec in SPECS else 7, perm=False)
    for dtype in (torch.float16, torch.bfloat16):
        for case in ("plain", "outliers", "huge", "tiny"):
            if case == "huge" and dtype == torch.float16:
                continue
            gen = torch.Generator().manual_seed(3)
            x = torch.randn(1, K, generator=gen)
            if case == "outliers":
                big = torch.tensor([3e4, -2e4, 1e4, -5e3]) * (1.0 if dtype == torch.bfloat16 else 0.1)
                x[0, torch.randperm(K, generator=gen)[:4]] = big
            x = x * {"huge": 1e6, "tiny": 1e-4}.get(case, 1.0)
            x = x.to(DEVICE, dtype)
            bias = torch.randn(N, device=DEVICE).to(dtype) * x.abs().max() if dtype == torch.float16 else None
            y = run_poisoned(x, packed, bias, config)
            err = relative_error(y, x, packed, bias)
            assert err < TOLERANCE[dtype], f"{spec} {config} {dtype} {case}: relative error {err:.2e}"
            full = run_poisoned(x, packed, bias, replace(config, half=False))
            assert relative_error(full, x, packed, bias) < TOLERANCE[dtype]
            gap = ((y.double() - full.double()).norm() / full.double().norm()).item()
            assert gap < TOLERANCE[dtype], f"{spec} {dtype} {case}: float16-pair and float32 products differ by {gap:.2e}"


def test_gemv_auto_plan_even_shape_and_determinism():
    """A shape with no tails (no masks) under the automatic plan, and bitwise-equal repeated results with
    split-K (partial sums are added in a fixed order, not by atomics)."""
    n, k = (64, 1024) if CUDA else (32, 512)  # the interpreter is slow
    for spec in ("int4/g128", "nf4/g64", "int8/channel"):
        packed = make_packed(spec, n, k, seed=9, perm=False)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
        auto = plan_for(1, packed, DEVICE)
        assert auto.gemv == (packed.scheme.bits == 4)  # 8-bit formats: the tensor-core kernel (GEMV_TILES)
        y = run_poisoned(x, packed, None, auto)
        assert relative_error(y, x, packed, None) < TOLERANCE[torch.float16]
        split = KernelConfig(BM=1, BN=16, BKG=64, SUB=2, SPLIT=4, num_warps=2, gemv=True)
        first = fused_matmul(x, packed, None, split)
        assert torch.equal(first, fused_matmul(x, packed, None, split))
        assert relative_error(first, x, packed, None) < TOLERANCE[torch.float16]


def test_gemv_plan_selection():
    assert choose_plan(1, 4096, 4096, 128, 132, True).gemv
    assert choose_plan(1, 4096, 4096, 64, 132, True, 1).gemv
    assert not choose_plan(2, 4096, 4096, 128, 132, True).gemv  # M >= 2: tensor cores
    assert not choose_plan(1, 4096, 4096, 128, 132, False).gemv  # 8-bit, or qdata that does not view as words
    for kind in (0, 1):
        for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
            plan = gemv_plan(n, k, 128, kind, 132)
            programs = -(-n // plan.BN) * plan.SPLIT
            assert plan.BM == 1 and 132 <= programs <= 8 * 132
            assert k // (plan.BKG * plan.SUB * plan.SPLIT) >= 2  # every split keeps at least two loop steps
    small = gemv_plan(64, 256, 128, 1, 132)
    assert small.SUB * small.BKG * 2 <= 256 or small.SUB == 1


def test_small_m_tiles_match_float64(monkeypatch):
    """M = 16 on the tensor-core tiles int4 weights in groups of 128, NF4 in groups of 64 and wide int8 and fp8
    weights take (SMALL_M_TILES: 32 rows, two group tiles a loop step; 8-bit at M = 1 too; tests/nn/test_plans.py
    checks the choice) against float64, with a ragged last step (int4), split 1 and 2, rows past N unwritten."""
    n, k = (72, 1408) if CUDA else (40, 640)  # 1408 = 5.5 steps of 256 columns, 640 = 2.5
    cases = [(spec, 16) for spec in ("int4/g128", "int4-asym/g128", "nf4/g64")]
    cases += [(spec, m) for spec in ("int8/g128", "int8-asym/g128", "int8/channel", "fp8-e4m3/channel")
              for m in (1, 16)]
    monkeypatch.setattr(triton_backend, "WIDE_8BIT_MIN_WAVES", 0)  # this narrow 8-bit weight takes them too
    choose_plan.cache_clear()
    try:
        for spec, m in cases:
            packed = make_packed(spec, n, k, seed=5, perm=False)
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            for split in (1, 2):
                config = dataclasses.replace(plan_for(m, packed, DEVICE), SPLIT=split, pdl=False)
                assert (config.BM, config.BN, config.SUB, config.gemv) == (16, 32, 2, False), spec
                y = run_poisoned(x, packed, None, config)
                assert relative_error(y, x, packed, None) < TOLERANCE[torch.float16], (spec, m, split)
    finally:
        choose_plan.cache_clear()  # no plan made under the patch outlives it


# ------------------------------------------------------------------ the prepared eager launcher (CUDA)
def make_layer(spec: str, n: int, k: int, bias: bool, seed: int = 0) -> QuantLinear:
    packed = make_packed(spec, n, k, seed=seed).to("cpu")
    gen = torch.Generator().manual_seed(seed)
    return QuantLinear(packed, torch.randn(n, generator=gen) if bias else None)


def _operator(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return quant_linear(x, layer.qdata, layer.scale, layer.offset, layer.scale_scale, layer.scale_mean,
                        layer.input_perm, layer.bias, layer.scheme_key, layer.out_features, layer.in_features)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["int4/g32", "nf4/g64", "int8-asym/g32", "fp8-e4m3/channel", "int4/g32/dq"])
@torch.no_grad()
def test_eager_launcher_equals_operator(cuda, spec):
    """QuantLinear's eager CUDA path (prepared launchers) gives the operator's output bit for bit: GEMV, the
    tensor-core kernel, dequantize + cuBLAS, 3-D inputs, a non-contiguous input, and again after the
    buffers move."""
    layer = make_layer(spec, 72, 256, bias=True).to(cuda)
    for shape in ((1, 256), (1, 1, 256), (5, 256), (2, 40, 256)):
        for _ in range(2):  # the second call runs the cached launcher
            x = torch.randn(shape, device=cuda).to(torch.bfloat16)
            assert torch.equal(layer(x), _operator(layer, x))
    wide = torch.randn(3, 512, device=cuda).to(torch.bfloat16)[:, ::2]  # non-contiguous: the operator
    assert torch.equal(layer(wide), _operator(layer, wide))
    x = torch.randn(1, 256, device=cuda).to(torch.float16)
    before = layer(x)
    layer.to("cpu").to(cuda)  # new buffer addresses: launchers are rebuilt
    assert torch.equal(layer(x), before)
    assert torch.equal(layer(x), _operator(layer, x))


@pytest.mark.gpu
@torch.no_grad()
def test_eager_launcher_under_cuda_graph(cuda):
    layer = make_layer("int4/g128", 96, 512, bias=True).to(cuda)
    x = torch.randn(1, 512, device=cuda, dtype=torch.bfloat16)
    layer(x)  # prepares (and compiles) outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, _operator(layer, x))


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("spec", ["int4/g128", "nf4/g64"])
@torch.no_grad()
def test_gluon_pdl_chain_under_cuda_graph(cuda, spec, stages):
    """Programmatic dependent launches read x only after the previous kernel finished: a chain of GEMVs whose
    inputs are the previous outputs (straight GEMV to GEMV, and with a torch kernel between), replayed from a
    CUDA graph with PDL, equals the same chain run eagerly without PDL bit for bit."""
    packs = [make_packed(spec, 256, 256, seed=s, perm=False) for s in range(6)]
    base = dict(BM=1, BN=32, BKG=64, SUB=2, SPLIT=2, num_warps=2, gemv=True, gluon=True, stages=stages)
    pdl, plain = KernelConfig(**base, pdl=True), KernelConfig(**base)
    x = torch.randn(1, 256, device=cuda, dtype=torch.bfloat16)

    def chain(config, normalize):
        y = x
        for packed in packs:
            y = fused_matmul(y, packed, None, config)
            if normalize:
                y = y / y.float().norm().to(y.dtype)
        return y

    for normalize in (False, True):
        chain(pdl, normalize)  # compiles outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain(pdl, normalize)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(got, chain(plain, normalize))
