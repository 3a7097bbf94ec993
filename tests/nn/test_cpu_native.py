"""The native CPU kernels (nn/cpu_gemv.c through nn/cpu_native.py): every build (AVX-512 with and without
bfloat16 products, AVX2, plain C) against a float64 reference for every format and group layout they serve,
the weights they read back exactly, and the CPU backend sending decode-sized calls to them."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import NATIVE_BUILDS as BUILDS, cpu_flags, native_build, random_packed

from modelpress.formats.packed import PackedWeight, expand_groups
from modelpress.nn import cpu_native
from modelpress.nn.cpu_backend import CPU_BACKEND, DIGITS_MAX_ROWS, EXACT_NATIVE_ROWS, native_rows
from modelpress.nn.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the native kernels are not built")

# formats x group layouts: ragged last groups (576 = 4.5 * 128, 1000 = 31.25 * 32), K % 8 != 0 (70, 12: the
# scalar code), groups spread over a superblock's lanes (g8..g64) or broadcast (g128, g256, per channel, tensor);
# 8-bit integers in byte planes, or group by group where their groups do not fit the planes (g48) and for fp8
SPECS = ["int4/g32", "int4-asym/g128", "int4-asym/g64", "int4/g256", "int4/g8", "int4/channel", "int4/tensor",
         "nf4/g64", "nf4/g64/dq", "nf4/g16", "fp4/g32", "int8/g32", "int8/channel", "int8-asym/channel",
         "int8-asym/g32", "fp8-e4m3/channel", "fp8-e5m2/g128", "fp8-e4m3/g32", "int4/g128/bfloat16",
         "int8/g32/float32", "int8/g8", "int8-asym/g48", "int8/g128"]
SHAPES = [(96, 576), (64, 1000), (33, 70), (5, 12)]


@functools.cache
def build(name: str, directory: str):
    return native_build(name, Path(directory))


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("native"))


def magnitudes(packed: PackedWeight) -> torch.Tensor:
    """(N, K) float64: |w| plus 16 times its group's scale (and offset): the size of the terms the kernel sums,
    which for linear formats include code * scale and bias * scale before they cancel to w."""
    n, k = packed.shape
    group = packed.scheme.group_length(k)
    terms = 16 * expand_groups(packed.group_scales().double().abs(), n, k, group)
    if packed.offset is not None:
        terms = terms + expand_groups(packed.offset.double().abs(), n, k, group)
    return packed.dequantize(torch.float64).abs() + terms


def float32_bound(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """What float32 sums of the kernel's terms may be off by: a few roundings of the magnitudes summed."""
    return 8 * 2.0**-23 * (x.abs().double() @ magnitudes(packed).t()) + 1e-30


@pytest.mark.parametrize("name", list(BUILDS))
@pytest.mark.parametrize("spec", SPECS)
def test_every_build_matches_float64_in_float32(name, spec, build_dir):
    lib = build(name, build_dir)
    assert lib.mp_isa() == {"avx512-bf16": 513, "avx512": 512, "avx2": 256, "plain": 0}[name]
    for n, k in SHAPES:
        packed = random_packed(spec, n, k, seed=n + k)
        plan = cpu_native.plan_for(packed)
        assert plan is not None, (spec, n, k)
        w = packed.dequantize(torch.float64)
        for m in (1, 3):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            y = cpu_native.native_matmul(x, plan, lib=lib, products="float32")
            ref = x.double() @ w.t()
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert ((y.double() - ref).abs() <= float32_bound(x, packed)).all(), (spec, n, k, m)


@pytest.mark.parametrize("spec", ["int4/g32", "int4-asym/g128", "int4/channel", "int4-asym/g64"])
def test_bfloat16_products_are_the_products_of_rounded_x(spec, build_dir):
    """Linear 4-bit formats on the bfloat16 build: x rounded to bfloat16 (to nearest even), then float32 sums:
    the float64 product of the rounded x, not of x."""
    lib = build("avx512-bf16", build_dir)
    for n, k in SHAPES:
        packed = random_packed(spec, n, k, seed=k)
        w = packed.dequantize(torch.float64)
        x = torch.randn(2, k) * 3
        y = cpu_native.native_matmul(x, cpu_native.plan_for(packed), lib=lib, products="bfloat16")
        rounded = x.bfloat16().double() @ w.t()
        assert ((y.double() - rounded).abs() <= 10 * float32_bound(x, packed)).all()  # levels 128 + code: 10x larger
        if k >= 64:
            assert (y.double() - x.double() @ w.t()).abs().max() > 1e-5  # really rounded


@pytest.mark.parametrize("products", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("name", ["avx512-bf16", "avx2"])
def test_what_an_earlier_call_left_in_the_scratch_never_leaks_in(name, products, build_dir):
    """A call whose rows end in lanes past the codes (K = 96: 12 of 16 lanes) reads a vector of parameters past its
    last row's: after a call that left NaNs in the (reused, per-thread) scratch, those lanes must still add 0."""
    lib = build(name, build_dir)
    big, small = random_packed("int4/g32", 64, 576, seed=1), random_packed("int4/g32", 40, 96, seed=2)
    small_plan = cpu_native.plan_for(small)
    x = torch.randn(1, 96)
    expected = cpu_native.native_matmul(x, small_plan, lib=lib, products=products)
    cpu_native.native_matmul(torch.full((4, 576), float("nan")), cpu_native.plan_for(big), lib=lib,
                             products=products)
    assert torch.equal(cpu_native.native_matmul(x, small_plan, lib=lib, products=products), expected)


def int8_blocks(x: torch.Tensor, per_lane: int, top_code: float = 127.0) -> torch.Tensor:
    """x as the int8 (top_code 127) or int16 (32767) products see it (cpu_gemv.c): blocks of 32 over the columns its
    lanes of `per_lane` codes cover, each rounded to the nearest multiple of max|x| / top_code; the columns past
    them unchanged."""
    whole = x.shape[1] // per_lane * per_lane
    out = x.clone()
    for start in range(0, whole, 32):
        block = x[:, start:min(start + 32, whole)]
        top = block.abs().amax(1, keepdim=True)
        inv = torch.where(top > 0, top_code / top, torch.zeros_like(top))
        out[:, start:start + block.shape[1]] = torch.round(block * inv) * (top / top_code)
    return out


def vnni_build(build_dir: str):
    lib = build("avx512-bf16", build_dir)
    if not cpu_native.products_available("int8", lib):
        pytest.skip("this CPU has no AVX512_VNNI")
    return lib


def quantized_x_cases(spec: str):
    """Per shape: K, the packed weight, its plan and float64 weight, and 3 rows of x (the first half of row 0 zero:
    all-zero blocks have a zero scale)."""
    for n, k in SHAPES:
        packed = random_packed(spec, n, k, seed=k)
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * 3
        x[0, : k // 2] = 0.0
        yield k, packed, cpu_native.plan_for(packed), packed.dequantize(torch.float64), x


INT16_8BIT = ["int8/g32", "int8-asym/g64", "int8/channel", "int8/g8", "int8-asym/channel"]
INT16_4BIT = ["int4/g32", "int4-asym/g128", "int4/g8", "int4-asym/g64", "int4/channel"]


@pytest.mark.parametrize("name,spec", [("avx512-bf16", spec) for spec in INT16_8BIT] +
                         [("avx2", spec) for spec in INT16_4BIT])
def test_integer_codes_take_int16_x_where_bfloat16_products_are_allowed(name, spec, build_dir):
    """Under bfloat16 products (the default), 8-bit integer codes on a VNNI build and linear 4-bit codes on an AVX2
    build multiply x quantized to int16 per block of 32, integer sums: the float64 product of that x (closer to x's
    own than bfloat16 rounding would be), not of x."""
    lib = vnni_build(build_dir) if name == "avx512-bf16" else build(name, build_dir)
    for k, packed, plan, w, x in quantized_x_cases(spec):
        x[1, 5] = 1e4   # one large value: its block's other values keep 2^-16 of it
        y = cpu_native.native_matmul(x, plan, lib=lib, products="bfloat16")
        quantized = int8_blocks(x, 8 if plan.bits == 4 else 4, 32767.0).double() @ w.t()
        assert ((y.double() - quantized).abs() <= 4 * float32_bound(x, packed)).all(), (spec, k)
        exact = x.double() @ w.t()
        bf16 = x.bfloat16().double() @ w.t()
        assert (y.double() - exact).abs().max() < (bf16 - exact).abs().max() / 4
        if k >= 64:
            assert (y.double() - exact).abs().max() > 1e-6   # really quantized


@pytest.mark.parametrize("spec", ["int4/g32", "int4-asym/g128", "int4/g8", "int4-asym/g64", "int4/channel", "int8/g32",
                                  "int8-asym/g64", "int8/channel", "int8/g8"])
def test_int8_products_are_the_products_of_x_in_int8_blocks(spec, build_dir):
    """int8 products (AVX512_VNNI): x quantized to int8 per block of 32, integer sums, then float32: the float64
    product of that quantized x, offsets included, and not the product of x itself."""
    lib = vnni_build(build_dir)
    for k, packed, plan, w, x in quantized_x_cases(spec):
        y = cpu_native.native_matmul(x, plan, lib=lib, products="int8")
        quantized = int8_blocks(x, 8 if plan.bits == 4 else 4).double() @ w.t()
        assert ((y.double() - quantized).abs() <= 4 * float32_bound(x, packed)).all(), (spec, k)
        if k >= 64:
            assert (y.double() - x.double() @ w.t()).abs().max() > 1e-4   # really quantized


def test_int8_products_leave_other_formats_exact(build_dir):
    """Formats int8 products do not serve (lookup and fp8 levels) keep their float32 products."""
    lib = build("avx512-bf16", build_dir)
    for spec in ("nf4/g64", "fp8-e4m3/channel", "fp4/g32"):
        packed = random_packed(spec, 64, 576)
        plan, x = cpu_native.plan_for(packed), torch.randn(2, 576)
        assert torch.equal(cpu_native.native_matmul(x, plan, lib=lib, products="int8"),
                           cpu_native.native_matmul(x, plan, lib=lib, products="float32"))


@pytest.mark.parametrize("spec", ["int4-asym/g32", "nf4/g64/dq", "int8/g32", "fp8-e4m3/channel", "fp8-e5m2/g128"])
def test_identity_reads_back_the_stored_weight(spec, build_dir):
    """One-hot rows of x read every stored weight back through the kernel's own decode, scales and offsets:
    the float32 dequantized weight to within one rounding."""
    lib = build("avx512" if {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags() else "plain", build_dir)
    packed = random_packed(spec, 40, 200, seed=3)
    plan = cpu_native.plan_for(packed)
    seen = torch.cat([cpu_native.native_matmul(rows, plan, lib=lib, products="float32")
                      for rows in torch.eye(200).split(7)]).t()
    w = packed.dequantize(torch.float32)
    assert torch.allclose(seen, w, rtol=2**-23, atol=0), (seen - w).abs().max()


def test_every_fp8_code_reads_back_its_level(build_dir):
    """All 256 codes of both fp8 formats (subnormals and the sign included) decode to the format's levels."""
    lib = build("avx512" if {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags() else "plain", build_dir)
    for spec in ("fp8-e4m3/channel", "fp8-e5m2/channel"):
        packed = random_packed(spec, 1, 256)
        codes = torch.arange(256, dtype=torch.uint8)
        levels = packed.scheme.qformat.levels
        codes = codes[torch.isfinite(levels)]   # NaN / infinity codes hold no weight
        qdata = torch.zeros(1, packed.qdata.shape[1], dtype=torch.uint8)
        qdata[0, : codes.numel()] = codes
        one = PackedWeight(scheme=packed.scheme, shape=(1, codes.numel()), qdata=qdata,
                           scale=torch.ones(1, 1, dtype=torch.float32))
        seen = torch.cat([cpu_native.native_matmul(rows, cpu_native.plan_for(one), lib=lib)
                          for rows in torch.eye(codes.numel()).split(8)])[:, 0]
        assert torch.equal(seen, levels[codes.long()]), spec


@pytest.mark.parametrize("name", list(BUILDS))
@pytest.mark.parametrize("spec", ["int4/g32", "nf4/g64", "int8/g32", "fp8-e4m3/channel"])
def test_non_finite_activations_are_not_hidden(name, spec, build_dir):
    """A NaN in x makes every output of its row NaN, and an infinity every output of its row non-finite, as in
    F.linear; no rounding (bfloat16 pairs included) turns them into finite numbers. (Where F.linear gives +-inf
    the kernel may give NaN: the bias it folds in through the sum of x cancels inf against inf.)"""
    lib = build(name, build_dir)
    packed = random_packed(spec, 16, 128, seed=7)
    plan = cpu_native.plan_for(packed)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(2, 128)
        x[0, 37] = bad
        y = cpu_native.native_matmul(x, plan, lib=lib)
        assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all(), (bad, y)
        if bad != bad:
            assert torch.isnan(y[0]).all()


def test_gptq_input_order_and_16_bit_activations():
    if not cpu_native.available():
        pytest.skip("the native kernels are not built on this machine")
    packed = random_packed("int4/g32", 48, 160, perm=True)
    plan = cpu_native.plan_for(packed)
    w = packed.dequantize(torch.float64)   # in the layer's own column order
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(1, 160).to(dtype)
        y = cpu_native.native_matmul(x, plan, products="float32")
        ref = x.double() @ w.t()
        assert ((y.double() - ref).abs() <= float32_bound(x.float(), packed)).all(), dtype


def test_unserved_layouts_are_refused():
    assert cpu_native.plan_for(random_packed("int4/g48", 8, 96)) is None    # lanes would straddle groups
    assert cpu_native.plan_for(random_packed("int3/g32", 8, 96)) is None    # 3-bit codes cross bytes
    assert cpu_native.plan_for(random_packed("int2/g32", 8, 96)) is None
    assert cpu_native.plan_for(random_packed("int8/g16", 8, 96)) is not None  # 8 bits: any group


# ---- the CPU backend ----

@pytest.fixture
def native_backend():
    if not cpu_native.available():
        pytest.skip("the native kernels are not built on this machine")
    with CPU_BACKEND.fast():
        yield CPU_BACKEND


@pytest.mark.parametrize("spec,rows", [("int4/g128", EXACT_NATIVE_ROWS), ("int8/g32", EXACT_NATIVE_ROWS),
                                       ("fp4/g32", EXACT_NATIVE_ROWS), ("nf4/g64", DIGITS_MAX_ROWS),
                                       ("fp8-e4m3/channel", DIGITS_MAX_ROWS), ("nf4/g16", DIGITS_MAX_ROWS)])
def test_decode_sized_calls_take_the_native_kernels(spec, rows, native_backend):
    layer = QuantLinear(random_packed(spec, 48, 576), torch.randn(48))
    plan = native_backend.native_plan(layer.packed)
    assert native_rows(plan) == rows
    kind = f"native {plan.bits}-bit"
    w = layer.packed.dequantize(torch.float64)
    for m in (1, rows):
        x = torch.randn(m, 576)
        before = native_backend.calls[kind]
        y = layer(x)
        assert native_backend.calls[kind] == before + 1
        ref = F.linear(x.double(), w, layer.bias.double())
        # int4 takes bfloat16 products where the CPU has them: x rounded to bfloat16
        bound = 2**-8 * (x.abs().double() @ w.abs().t()) + 10 * float32_bound(x, layer.packed)
        assert ((y.double() - ref).abs() <= bound).all()
    before = native_backend.calls[kind]
    layer(torch.randn(rows + 1, 576))   # past the rows the native kernels take: PyTorch's kernels or the reference
    assert native_backend.calls[kind] == before


def test_lookup_formats_never_build_a_digits_layout(native_backend):
    """NF4 and fp8 (levels PyTorch's kernels take only as three digits of a 12-bit grid, 1.5 bytes per weight)
    run natively up to DIGITS_MAX_ROWS rows and on the reference path above: no digits layout is built."""
    layer = QuantLinear(random_packed("nf4/g64", 32, 128, seed=5))
    held = native_backend.digits_bytes
    for m in (1, 16, DIGITS_MAX_ROWS, DIGITS_MAX_ROWS + 1):
        layer(torch.randn(m, 128))
    assert native_backend.digits_bytes == held
    from modelpress.nn.cpu_backend import _UNBUILT

    assert native_backend._entries[id(layer.qdata)].prepared is _UNBUILT
    assert native_backend.needs_digits(layer.packed)


def test_native_kernels_keep_the_backend_rules(native_backend):
    """Float32 calls outside fast(), autograd and a disabled backend still go to the reference path; the plan is
    built once per layer and rebuilt when the layer's tensors change; the layer itself is never copied."""
    layer = QuantLinear(random_packed("nf4/g64", 32, 128))
    x = torch.randn(1, 128)
    layer(x)
    plan = native_backend.native_plan(layer.packed)
    assert plan.qdata is layer.packed.qdata and plan.scale is layer.packed.scale   # read in place
    assert native_backend.native_plan(layer.packed) is plan
    layer.scale.mul_(2)
    assert native_backend.native_plan(layer.packed) is not plan
    native_backend.round_float32 = False
    try:
        assert native_backend(x, layer.packed, None) is None
    finally:
        native_backend.round_float32 = True
    assert native_backend(x.requires_grad_(), layer.packed, None) is None
    with native_backend.disabled():
        assert native_backend(x.detach(), layer.packed, None) is None


def test_build_is_cached_and_disabled_by_the_environment(tmp_path, monkeypatch):
    first = cpu_native.build(directory=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_native.build(directory=tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(tmp_path.glob("*.tmp"))   # no half-written library left behind
    assert cpu_native.build(("-DMP_UNUSED=1",), directory=tmp_path) != first   # other flags: another library
    monkeypatch.setenv("MODELPRESS_CPU_NATIVE", "0")
    cpu_native.library.cache_clear()
    try:
        assert not cpu_native.available()
    finally:
        monkeypatch.delenv("MODELPRESS_CPU_NATIVE")
        cpu_native.library.cache_clear()


def test_a_missing_compiler_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        cpu_native.build(directory=tmp_path)
    cpu_native.library.cache_clear()
    monkeypatch.setattr(cpu_native, "cache_dir", lambda: tmp_path)
    try:
        assert cpu_native.library() is None
        assert "native CPU kernels unavailable" in caplog.text
    finally:
        monkeypatch.delenv("CC")
        cpu_native.library.cache_clear()
