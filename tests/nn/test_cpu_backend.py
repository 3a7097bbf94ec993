"""The CPU backend (nn/cpu_backend.py) on PyTorch's kernels: parity with the reference path, that the fast kernels
really run for the schemes they serve, fallback for the others, and the per-layer cache of prepared weights.
The native kernels it takes for decode-sized calls are tested in test_cpu_native.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_packed

from modelpress.formats import WeightScheme
from modelpress.formats.packed import PackedWeight
from modelpress.formats.packing import pack_codes
from modelpress.nn.backends import backend_names, linear_forward, reference_linear
from modelpress.nn.cpu_backend import (
    CPU_BACKEND,
    DIGITS_MAX_ROWS,
    Int4Prepared,
    Int8Prepared,
    prepare,
    prepared_nbytes,
)
from modelpress.nn.quant_linear import QuantLinear

BF16_STEP = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding moves a value by at most half this, relatively
HALVES = "8-bit levels as int4 digits"
GRID = "12-bit levels as int4 digits (12-bit grid)"  # lookup levels rounded to 12-bit integers
GRID_STEP = 2.0**-11  # that grid's step, relative to the group's largest weight (rounding moves half of it)

# (spec, N, K, kernel): ragged last groups (576 = 4*128 + 64; 100 = 3*32 + 4), N not a multiple of 16,
# the narrower integer formats and ternary on the int4 kernel, one-group-per-row schemes on the int8 kernel
SERVED = [
    ("int4/g128", 48, 576, "int4"),
    ("int4/g128", 20, 1536, "int4"),
    ("int4-asym/g32", 40, 100, "int4"),
    ("int4-asym/g64", 17, 200, "int4"),
    ("int4/g64/dq", 32, 576, "int4"),
    ("int4-asym/g32/bfloat16", 16, 96, "int4"),
    ("int4/g128/float32", 16, 130, "int4"),
    ("int4/tensor", 24, 96, "int4"),
    ("int3/g32", 48, 96, "int4"),
    ("int2-asym/g64", 48, 200, "int4"),
    ("ternary/g32", 20, 64, "int4"),
    ("int4-asym/channel", 24, 100, "int8"),  # K = 100 is no multiple of 32: the int4 kernel cannot take it
    ("int8/channel", 33, 77, "int8"),
    ("int8/channel", 64, 576, "int8"),
    ("int8-asym/channel", 33, 77, "int8"),
    ("int8/tensor", 16, 64, "int8"),
    # 8-bit levels with groups (GGUF's Q8_0 is int8/g32) on the int4 kernel as two 4-bit halves
    ("int8/g32", 48, 576, HALVES),
    ("int8/g32", 17, 100, HALVES),
    ("int8-asym/g64", 40, 200, HALVES),
    ("int8/g128/dq", 32, 576, HALVES),
    ("int6/g32", 24, 96, HALVES),
    ("fp4/g32", 40, 96, HALVES),  # half-integer levels, doubled: exact
    # lookup formats whose levels are no integers, on a 12-bit grid as three digits
    ("nf4/g64", 48, 576, GRID),
    ("nf4/g64/dq", 17, 200, GRID),
    ("nf4/channel", 20, 96, GRID),
    ("fp8-e4m3/channel", 33, 128, GRID),
    ("fp8-e5m2/channel", 16, 64, GRID),
]
FALLBACK = ["nf4/g16", "fp4/g16", "int8/g16", "int4/g16", "int4/g48"]
INT4_KERNEL = ("int4", HALVES, GRID)  # kinds that run on the int4 kernel: bfloat16 scales and zero points


def reference64(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), packed.dequantize(torch.float64), None if bias is None else bias.double())


def read_back(packed: PackedWeight) -> torch.Tensor:
    """(N, K) float64: the weight the kernel uses, multiplied out of the identity in calls of at most
    DIGITS_MAX_ROWS rows (the most that layouts of several digits serve)."""
    eye = torch.eye(packed.shape[1])
    return torch.cat([CPU_BACKEND(rows, packed, None) for rows in eye.split(DIGITS_MAX_ROWS)]).double().t()


def calls() -> dict:
    return dict(CPU_BACKEND.calls)


@pytest.fixture(autouse=True)
def _fast_float32():
    """Most tests here exercise the kernels with float32 inputs, which the backend takes only when asked. They
    test PyTorch's kernels: decode-sized calls would take the native kernels (tests/nn/test_cpu_native.py)."""
    native, CPU_BACKEND.native = CPU_BACKEND.native, False
    try:
        with CPU_BACKEND.fast():
            yield
    finally:
        CPU_BACKEND.native = native


def test_float32_takes_the_exact_reference_path_unless_asked():
    packed = random_packed("int4/g128", 48, 576)
    x = torch.randn(3, 576)
    with CPU_BACKEND.disabled():
        exact = linear_forward(x, packed, None)
    CPU_BACKEND.round_float32 = False
    try:
        assert CPU_BACKEND(x, packed, None) is None
        assert torch.equal(linear_forward(x, packed, None), exact)
        assert CPU_BACKEND(x.bfloat16(), packed, None) is not None  # half precision is always served
    finally:
        CPU_BACKEND.round_float32 = True
    assert not torch.equal(linear_forward(x, packed, None), exact)  # inside fast(): bfloat16 kernels


def test_registered_as_a_backend():
    assert "cpu" in backend_names()


@pytest.mark.parametrize("spec,n,k,kernel", SERVED)
def test_weight_seen_by_the_kernel_is_the_stored_weight(spec, n, k, kernel):
    """Multiplying the identity reads back every weight the kernel uses: the code conversion, the group
    mapping of ragged groups, zero points and padding are checked element by element."""
    packed = random_packed(spec, n, k)
    prep = prepare(packed)
    assert isinstance(prep, Int4Prepared if kernel in INT4_KERNEL else Int8Prepared)
    if kernel in INT4_KERNEL:
        assert prep.copies == {"int4": 1, HALVES: 2, GRID: 3}[kernel] and prep.exact == (kernel != GRID)
    seen = read_back(packed)  # (N, K)
    w = packed.dequantize(torch.float64)
    row_max = w.abs().amax(dim=1, keepdim=True)
    # int4 kernel: bf16 scales and zero points (|q*s| + |z| <= 4 * row max; for the two halves of 8-bit levels
    # |16 h s| + |(l - 8) s| + |8 s + z| <= 144 s + |z|, also below 4 * row max), bf16 output; the 12-bit grid
    # moves a weight by at most half its step, relative to the group's (so at most the row's) largest level
    if kernel in INT4_KERNEL:
        bound = BF16_STEP / 2 * (4 * row_max + 2 * w.abs()) + (GRID_STEP / 2 * row_max if kernel == GRID else 0)
    else:  # exact int8 levels, float32 scales applied after the kernel
        bound = 1e-6 * (row_max + w.abs())
    assert ((seen - w).abs() <= bound).all(), (seen - w).abs().max().item()


@pytest.mark.parametrize("spec,n,k,kernel", SERVED)
def test_random_inputs_match_the_reference_within_bfloat16_rounding(spec, n, k, kernel):
    packed = random_packed(spec, n, k, seed=1)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, k, generator=generator) * 2  # M = 15 rows
    bias = torch.randn(n, generator=generator)
    before = calls().get(kernel, 0)
    y = linear_forward(x, packed, bias)
    assert calls()[kernel] == before + 1
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    ref = reference64(x, packed, bias)
    w = packed.dequantize(torch.float64)
    # rounding to bf16 of x, of the int4 kernel's scales and zero points (as bounded above) and of the kernel's
    # output, which for affine formats on the int8 kernel is x @ (W - Z)^T with |Z| <= row max
    scaled_by_row = kernel in INT4_KERNEL or packed.offset is not None
    row_term = 4 * w.abs().amax(dim=1) if scaled_by_row else torch.zeros(n, dtype=torch.float64)
    x_abs = x.double().abs()
    bound = BF16_STEP / 2 * (x_abs @ w.abs().t() + x_abs.sum(-1, keepdim=True) * row_term
                             + (ref - bias.double()).abs())
    if kernel == GRID:
        bound = bound + GRID_STEP / 2 * x_abs.sum(-1, keepdim=True) * w.abs().amax(dim=1)
    # the kernels round partial sums too (seen up to 1.7x the two-rounding model over 20 seeds): margin 2.5
    bound = 2.5 * bound + 1e-5
    assert ((y.double() - ref).abs() <= bound).all()
    # on average far inside that bound (a wrong scale or zero point gives 1e-1 and more)
    assert (y.double() - ref).abs().mean() < 2e-3 * (x_abs @ w.abs().t()).mean()


@pytest.mark.parametrize("spec", ["int4-asym/g32", "int8/g32", "nf4/g32"])
def test_one_row_and_gptq_input_order(spec):
    packed = random_packed(spec, 64, 160, seed=2, perm=True)
    x = torch.randn(1, 160)
    y = CPU_BACKEND(x, packed, None)
    ref = reference64(x, packed, None)
    magnitude = x.double().abs() @ packed.dequantize(torch.float64).abs().t()
    assert y is not None and (y.double() - ref).abs().mean() < 2e-3 * magnitude.mean()


@pytest.mark.parametrize("spec", ["int8/g32", "int8-asym/g64"])
def test_8bit_halves_give_back_every_level_exactly(spec):
    """Unit scales (and zero offsets), which bfloat16 holds exactly: multiplying the identity reads back each
    of the 256 levels exactly, so the split into 16 h + l and the zero points of the two halves are right."""
    scheme = WeightScheme.parse(spec)
    n, k = 16, 256
    codes = torch.arange(256, dtype=torch.uint8).roll(7).repeat(n, 1)  # every code once per row
    groups = k // scheme.group_size
    offset = None if not scheme.qformat.affine else torch.zeros(n, groups, dtype=torch.float16)
    packed = PackedWeight(scheme, (n, k), pack_codes(codes, 8), torch.ones(n, groups, dtype=torch.float16), offset)
    assert isinstance(prepare(packed), Int4Prepared)
    seen = read_back(packed)
    assert torch.equal(seen, packed.dequantize(torch.float64))
    assert torch.equal(seen.unique(), scheme.qformat.levels.double())


@pytest.mark.parametrize("spec,exact", [("nf4/g64", False), ("fp4/g32", True), ("fp8-e4m3/channel", False)])
def test_lookup_levels_read_back_within_the_grid(spec, exact):
    """Unit scales: every code's level read back through the kernel, exactly for fp4 (half-integers, doubled),
    within half a 12-bit step of the largest level for NF4 and fp8 (whose levels are no integers)."""
    scheme = WeightScheme.parse(spec)
    fmt = scheme.qformat
    levels = torch.nan_to_num(fmt.levels.double(), nan=0.0, posinf=0.0, neginf=0.0)
    n, k = 16, 256
    codes = torch.arange(k).remainder(len(levels)).to(torch.uint8).repeat(n, 1)
    groups = scheme.num_groups(k)
    scale = torch.ones(n, groups, dtype=torch.float16)
    packed = PackedWeight(scheme, (n, k), pack_codes(codes, fmt.bits), scale, None)
    seen = read_back(packed)
    wanted = torch.nan_to_num(packed.dequantize(torch.float64), nan=0.0)
    error = (seen - wanted).abs()
    largest = levels.abs().max()
    if exact:
        assert torch.equal(seen, wanted)
    else:  # half a grid step, plus bf16 rounding of the three digit scales and the output
        assert error.max() <= largest * (GRID_STEP / 2 + 4 * BF16_STEP / 2) and error.max() > 0
        assert error.mean() <= largest * GRID_STEP


@pytest.mark.parametrize("spec,kernel", [("int8/g32", HALVES), ("nf4/g64", GRID), ("int4/g32", "int4")])
def test_large_calls_on_several_digits_take_the_reference_path(spec, kernel):
    """Prefill-sized calls: the int4 kernel's time grows with rows x digits, so layouts of several digits
    serve up to DIGITS_MAX_ROWS rows and leave larger calls to decode-then-F.linear; one digit serves all."""
    packed = random_packed(spec, 32, 128)
    small, large = torch.randn(DIGITS_MAX_ROWS, 128), torch.randn(DIGITS_MAX_ROWS + 1, 128)
    before = calls().get(kernel, 0)
    assert CPU_BACKEND(small, packed, None) is not None
    served_large = CPU_BACKEND(large, packed, None)
    assert calls()[kernel] == before + 1 + (kernel == "int4")
    if kernel == "int4":
        assert served_large is not None
    else:
        assert served_large is None
        assert torch.equal(linear_forward(large, packed, None), reference_linear(large, packed, None))


@pytest.mark.parametrize("spec", FALLBACK)
def test_unsupported_schemes_fall_back_to_the_reference(spec):
    packed = random_packed(spec, 32, 128)
    assert prepare(packed) is None
    x = torch.randn(5, 128)
    before = calls()
    assert CPU_BACKEND(x, packed, None) is None
    assert torch.equal(linear_forward(x, packed, None), reference_linear(x, packed, None))
    assert calls() == before


def test_float64_and_autograd_calls_fall_back():
    packed = random_packed("int4/g32", 32, 64)
    assert CPU_BACKEND(torch.randn(2, 64, dtype=torch.float64), packed, None) is None
    x = torch.randn(2, 64, requires_grad=True)
    assert CPU_BACKEND(x, packed, None) is None
    linear_forward(x, packed, None).sum().backward()  # the reference path carries the gradient
    assert torch.allclose(x.grad, packed.dequantize().sum(0).expand(2, 64))
    with torch.no_grad():
        assert CPU_BACKEND(x, packed, None) is not None


def test_disabled_sends_calls_to_the_reference():
    packed = random_packed("int8/channel", 32, 64)
    x = torch.randn(3, 64)
    with CPU_BACKEND.disabled():
        assert torch.equal(linear_forward(x, packed, None), reference_linear(x, packed, None))
    assert CPU_BACKEND(x, packed, None) is not None


def test_prepared_once_per_layer_and_rebuilt_when_the_layer_changes():
    layer = QuantLinear(random_packed("int4/g128", 48, 576), torch.randn(48))
    keys_before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 576)
    y1 = layer(x)
    first = CPU_BACKEND.prepared(layer.packed)
    layer(x)
    assert CPU_BACKEND.prepared(layer.packed) is first  # cached, not rebuilt per call
    state = layer.state_dict()  # the cache adds nothing to what is saved
    assert state.keys() == keys_before.keys() and all(torch.equal(state[k], keys_before[k]) for k in state)
    assert not any(t is first.weight for t in layer.buffers())

    layer.scale.mul_(2)  # an in-place edit (as load_state_dict does) rebuilds
    y2 = layer(x)
    assert CPU_BACKEND.prepared(layer.packed) is not first
    assert torch.allclose(y2 - layer.bias, 2 * (y1 - layer.bias), rtol=1e-2, atol=1e-3)

    clone = copy.deepcopy(layer)  # a copy gets its own prepared weights, from its own buffers
    clone.qdata.zero_()
    assert not torch.allclose(clone(x), layer(x))


def test_prepared_weights_stay_near_the_packed_size():
    for spec, ratio in (("int4/g128", 1.15), ("int4-asym/g32", 1.15), ("int8/channel", 1.15), ("int8/g32", 1.2)):
        packed = random_packed(spec, 64, 576)
        size = prepared_nbytes(prepare(packed))
        assert size <= ratio * packed.nbytes, (spec, size, packed.nbytes)
        assert size < 0.35 * 4 * 64 * 576  # far from a float32 weight (int8/g32: 1.25 bytes per weight)


def test_tiny_model_logits_match_the_reference(tiny_llama):
    from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn

    quantize_rtn(tiny_llama, RTNConfig(WeightScheme.parse("int4-asym/g32")))
    ids = torch.randint(0, 320, (1, 23))
    before = calls().get("int4", 0)
    with torch.no_grad():
        fast = tiny_llama(input_ids=ids).logits
        assert calls()["int4"] >= before + 2 * 7  # every linear layer of both blocks took the kernel
        with CPU_BACKEND.disabled():
            ref = tiny_llama(input_ids=ids).logits
    assert (fast - ref).abs().max() < 2e-2 * ref.abs().max()
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_layouts_of_several_digits_stay_within_their_budget():
    """Three-digit layouts take 1.5 bytes per weight: past CpuBackend.digits_budget a layer keeps the reference
    path (bit for bit), and the bytes come back when a layer is freed."""
    import gc

    first, second = (QuantLinear(random_packed("nf4/g64", 32, 128, seed=s)) for s in (0, 1))
    x = torch.randn(1, 128)
    budget, held = CPU_BACKEND.digits_budget, CPU_BACKEND.digits_bytes
    try:
        first(x)
        size = CPU_BACKEND.digits_bytes - held
        assert size == prepared_nbytes(CPU_BACKEND.prepared(first.packed)) > 1.4 * 32 * 128
        CPU_BACKEND.digits_budget = held + size   # room for the first layer only
        assert CPU_BACKEND.prepared(second.packed) is None
        with CPU_BACKEND.disabled():
            reference = second(x)
        assert torch.equal(second(x), reference) and CPU_BACKEND.digits_bytes == held + size
        del first
        gc.collect()
        assert CPU_BACKEND.digits_bytes == held
    finally:
        CPU_BACKEND.digits_budget = budget


def test_prepared_weights_are_freed_with_the_layer():
    import gc
    import weakref

    layer = QuantLinear(random_packed("int4/g64", 32, 128))
    layer(torch.randn(1, 128))
    prepared = weakref.ref(CPU_BACKEND.prepared(layer.packed).weight)
    del layer
    gc.collect()
    assert prepared() is None


@pytest.mark.parametrize("spec, kernel", [("int4/g128", "int4_matmul"), ("int8/channel", "int8_matmul")])
def test_small_calls_run_on_one_thread_and_restore_the_thread_count(spec, kernel, monkeypatch):
    from modelpress.nn import cpu_backend

    packed = random_packed(spec, 32, 256)
    seen: list[tuple[int, int]] = []
    real = getattr(cpu_backend, kernel)

    def spy(x2, prep):
        seen.append((x2.shape[0], torch.get_num_threads()))
        return real(x2, prep)

    monkeypatch.setattr(cpu_backend, kernel, spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x_small = torch.randn(1, 3, 256, dtype=torch.bfloat16)  # 3 rows: decode-sized
        x_large = torch.randn(2, cpu_backend.SMALL_M_ROWS, 256, dtype=torch.bfloat16)
        y_small = CPU_BACKEND(x_small, packed, None)
        assert torch.get_num_threads() == 2
        y_large = CPU_BACKEND(x_large, packed, None)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(CPU_BACKEND, "small_m_threads", None)
        y_small_2 = CPU_BACKEND(x_small, packed, None)
    finally:
        torch.set_num_threads(before)
    assert seen == [(3, 1), (2 * cpu_backend.SMALL_M_ROWS, 2), (3, 2)]
    ref = reference64(x_small, packed, None)
    for y in (y_small, y_small_2):
        assert (y.double() - ref).abs().max() <= 4 * BF16_STEP * ref.abs().max()
    ref_large = reference64(x_large, packed, None)
    assert (y_large.double() - ref_large).abs().max() <= 4 * BF16_STEP * ref_large.abs().max()
