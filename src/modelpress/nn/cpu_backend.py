"""The CPU matmul backend: QuantLinear on the CPU runs the native kernels (decode) or PyTorch's packed int4 and
int8 kernels.

Decode-sized calls of 4-bit and 8-bit formats go first to the native kernels (cpu_native.py: compiled on first
use, they read the stored packed weight as it is, with no prepared copy): calls of one row, or up to
DIGITS_MAX_ROWS rows for formats PyTorch's kernels take only as three digits of a 12-bit grid (nf4, fp8;
`native_rows`). Their products are float32, except int4 and int4-asym on CPUs with AVX512_BF16, whose x is
rounded to bfloat16 as in PyTorch's int4 kernel. `CpuBackend.native = False` turns them off; where they are not
built (no C compiler, no AVX2), everything below applies to every call.

Served by PyTorch's kernels (anything else returns None, and the reference path takes it):
- formats whose levels are integers that fit a 4-bit grid (int2/int3/int4, symmetric or asymmetric, and
  ternary) with groups whose length is a multiple of 32 (or one group per row when K is), on
  aten._weight_int4pack_mm_for_cpu;
- formats with integer levels and one scale per row or per tensor (int8/channel, int8-asym/channel, and the
  narrower ints when the int4 kernel cannot take them), on aten._weight_int8pack_mm;
- formats with integer levels that fit an 8-bit grid and groups the int4 kernel can take (int8/g32, which is
  GGUF's Q8_0, int8-asym/g32, int5/int6 with such groups), on the int4 kernel as two 4-bit halves (below);
  fp4, whose levels are half-integers, the same way;
- lookup formats whose levels are not integers (nf4, fp8-e4m3, fp8-e5m2) with such groups, on the int4 kernel
  as three 4-bit digits of a 12-bit integer grid: approximate, each level within 2^-12 of the largest
  (below);
for CPU tensors, float32 / bfloat16 / float16 activations, and not while autograd needs a gradient.

Numerics: these kernels are fast only with bfloat16 activations (float32 ones take a path 10-100x slower
than F.linear on this torch), so x is rounded to bfloat16, and so is the kernel's output (relative error
2^-9 each); int4 scales and zero points are bfloat16 in the kernel; int8 row scales are applied afterwards
in float32. These errors sit far below the weight quantization error beside them, but they are not the
stored weight's exact product: bfloat16/float16 activations are always served (their own rounding is of
the same order), float32 activations only inside `with fast_cpu():` (generation, speed measurement), so
that evaluation measures the stored weights and nothing else.

Exact conversions: the int4 kernel computes w = (c - 8) * s + z for codes c in 0..15, with groups of 32,
64, 128 or 256 columns that divide K, and N a multiple of 16; the int8 kernel w = s * q, q in -128..127.
A scale-only format with integer level v stores q = v, z = 0; an affine one (w = s * v + offset) stores
q = v - center and z = offset + center * s, center being the middle of its levels (8 for int4-asym, 128 for
int8-asym), so z sits mid-group and rounding s and z to bfloat16 costs nothing to cancellation. A stored
group is cut into kernel groups of the largest allowed size dividing both the group length and K (K = 576
with g128: groups of 64, each stored scale used twice); when no such size exists, K is padded with zero
columns (and x with zeros). Rows are padded to a multiple of 16 and cut off the output.

8-bit levels with groups, as two int4 halves: q in -128..127 is 16 * h + l with h = floor(q / 16) in -8..7 and
l in 0..15, so s * q + z = (16 s) * h + (s * l + z). The kernel runs one matrix of 2K columns, codes h + 8
(scale 16 s, zero 0) then l (scale s, zero 8 s + z), against x written twice: one call, its own float32 sum
of both halves. 16 s and 8 s are exact in bfloat16 whenever s is, so the product is the stored weight's with
s and z rounded to bfloat16, as for int4. It reads K * N bytes of codes, as int8 does; aten's int8 kernel has
one scale per row, and cutting x into groups (one call, or one row of a block-diagonal x, per group) measured
several times slower at M = 1 than these halves.

Digits in general: levels that are integers after doubling at most three times (fp4's ±0.5 ... ±6 times 2)
and fit 4 * D bits are written as D base-16 digits, the top one signed (-8..7), the others 0..15, with scales
16^i s (D = 2 is the halves above). Levels that are no such integers (NF4's, the fp8 values) are rounded, per
group, to a grid of 12-bit integers q = round(2047 L / m), m the largest |level| the group uses, with scale
s m / 2047: each weight moves by at most 2^-12 of its group's largest weight, the size of bfloat16's
rounding of a weight an eighth of that (NF4's smallest non-zero level is 0.08 of its largest). The kernel
reads 1.5 bytes per weight for those: a CPU matmul three times int4's, against the reference path's decode
of every weight on every call (which made an NF4 model decode 7x slower than float32). Such formats are
served only where bfloat16 rounding is already accepted (bfloat16 / float16 activations, or float32 inside
fast_cpu()), like the rest.

Threads: calls with at most SMALL_M_ROWS activation rows (decode) run the kernel on one thread
(`CpuBackend.small_m_threads`). They are memory-bound, and each enters an OpenMP parallel region: on this
2-core machine shared with other work, a region whose second thread is descheduled waits a scheduler slice,
which made 2-thread int4/int8 matrix-vector calls 5-10x slower than one thread (and decode slower than float32,
whose small F.linear calls stay on one thread). Prefill-sized calls keep the configured thread count.

Prepared tensors are built on a layer's first call and cached by the backend, one entry per qdata tensor
(freed with it), checked on every call against the identity and version counter of each packed tensor, so
moving, reloading or editing a layer rebuilds them. They are not module buffers: state_dict and saved
files never see them. Their size is about the packed size (prepared_nbytes) for one digit; layouts of several
take 0.5 byte per weight and digit (three digits: 1.5 bytes, 2.8x NF4's packed 0.53), so they are built only
while their total stays under `CpuBackend.digits_budget` (4 GiB by default): a layer past it keeps the reference
path. No float weight is kept.
Inference-mode tensors have no version counter: an in-place edit of one inside inference_mode goes unseen.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from modelpress.formats.base import QFormat
from modelpress.formats.packed import PackedWeight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn import cpu_native

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes aten._weight_int4pack_mm_for_cpu accepts
INT4_ROW_MULTIPLE = 16
SMALL_M_ROWS = 8  # calls with at most this many rows run on `CpuBackend.small_m_threads` threads
# levels as several digits: calls with more rows decode the weight and run F.linear instead (the kernel's
# time grows with rows x digits; measured on one thread, 1536 x 576, the reference path wins from 64 rows
# for int8/g32, 64-128 for fp8-e4m3 and NF4; bench/cpu_decode.py's prefill column)
DIGITS_MAX_ROWS = 64
# layouts of several digits take 0.5 byte per weight and digit, up to 3x a 4-bit packed weight: they are built
# while the total they take stays under this (later layers keep the reference path; CpuBackend.digits_budget)
DIGITS_BUDGET_BYTES = 4 * 2**30
INT8_K_MULTIPLE = 32  # aten._weight_int8pack_mm reads out of bounds (segfaults) for M > 1 and K % 16 != 0
MAX_DIGITS = 3  # 4-bit digits per level at most: exact integer levels up to 12 bits, the rest rounded to 12 bits
MAX_DOUBLINGS = 3  # levels that are integers after doubling up to this many times (fp4: once) are exact
_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Int4Prepared:
    weight: torch.Tensor       # uint8, the kernel's packed layout of (rows, copies * padded_k) codes
    scale_zero: torch.Tensor   # bfloat16 (copies * padded_k // group, rows, 2): s and z per kernel group and row
    group: int                 # kernel group size
    padded_k: int              # K rounded up to a multiple of `group`
    out_features: int          # N (rows beyond it are padding)
    input_perm: torch.Tensor | None  # int64 (K,), gathered from x before the matmul
    copies: int = 1            # D > 1: levels as D 4-bit digits, x written D times (see the module doc)
    exact: bool = True         # False: levels rounded to a 12-bit grid (lookup formats, see the module doc)


@dataclass(frozen=True)
class Int8Prepared:
    weight: torch.Tensor       # int8 (N, padded_k): integer levels (minus 128 for affine formats), zero padded
    ones: torch.Tensor         # bfloat16 (N,) of 1.0: the kernel's scale argument
    scale: torch.Tensor        # float32 (N,) row scales, applied to the kernel's output
    zero: torch.Tensor | None  # float32 (N,): w = scale * q + zero, affine formats only
    padded_k: int              # K rounded up to a multiple of INT8_K_MULTIPLE
    input_perm: torch.Tensor | None


Prepared = Int4Prepared | Int8Prepared


# ---- pure functions: which kernel fits, and the exact conversions ----

def centered_levels(fmt: QFormat, span: int) -> tuple[torch.Tensor, int] | None:
    """(q per code as int64, center) such that w = s * q + z with z = offset + center * s (affine formats;
    z = 0 and center = 0 for scale-only ones), every q in [-span/2, span/2 - 1]; None if some level is not
    an integer or they do not fit. Centering affine levels keeps z near the middle of each group, so that
    (q * s) + z loses nothing to cancellation when s and z are rounded to bfloat16."""
    levels = fmt.levels.double()
    if not torch.equal(levels, levels.round()):
        return None
    levels = levels.long()
    center = (int(levels.min()) + int(levels.max()) + 1) // 2 if fmt.affine else 0
    q = levels - center
    if q.min() < -span // 2 or q.max() > span // 2 - 1:
        return None
    return q, center


@dataclass(frozen=True)
class DigitLevels:
    """A format's levels on an integer grid: level = unit * (q + center) per code; `digits` 4-bit digits hold q."""

    q: torch.Tensor   # per code: int64 q when exact, else the float32 level (put on a grid per group)
    center: int
    unit: float
    digits: int
    exact: bool


def _digits_for(q: torch.Tensor) -> int | None:
    for digits in range(1, MAX_DIGITS + 1):
        half = 8 * 16 ** (digits - 1)
        if q.min() >= -half and q.max() <= half - 1:
            return digits
    return None


def digit_levels(fmt: QFormat) -> DigitLevels | None:
    """The format's levels as D 4-bit digits (D <= MAX_DIGITS): exactly when they are integers after at most
    MAX_DOUBLINGS doublings, else (scale-only lookup formats) rounded to a 12-bit grid; None for affine formats
    with levels that are no such integers."""
    # fp8's NaN (and e5m2's infinite) codes never hold a weight
    levels = torch.nan_to_num(fmt.levels.double(), nan=0.0, posinf=0.0, neginf=0.0)
    for doublings in range(MAX_DOUBLINGS + 1):
        scaled = levels * 2**doublings
        if not torch.equal(scaled, scaled.round()):
            continue
        integer = scaled.long()
        center = (int(integer.min()) + int(integer.max()) + 1) // 2 if fmt.affine else 0
        digits = _digits_for(integer - center)
        if digits is not None:
            return DigitLevels(integer - center, center, 2.0**-doublings, digits, exact=True)
        break
    if fmt.affine:
        return None
    return DigitLevels(levels.float(), 0, 1.0, MAX_DIGITS, exact=False)


GRID_TOP = 8 * 16 ** (MAX_DIGITS - 1) - 1   # 2047: the 12-bit grid's largest integer


def int4_kernel_grouping(group: int, k: int) -> tuple[int, int] | None:
    """(kernel group size, padded K) for stored groups of `group` columns in rows of K, or None."""
    for size in INT4_KERNEL_GROUPS:
        if group % size == 0 and k % size == 0:
            return size, k
    for size in INT4_KERNEL_GROUPS:
        if group % size == 0:
            return size, -(-k // size) * size
    return None


def int4_plan(packed: PackedWeight) -> tuple[int, int] | None:
    if centered_levels(packed.scheme.qformat, 16) is None:
        return None
    k = packed.shape[1]
    return int4_kernel_grouping(packed.scheme.group_length(k), k)


def int8_fits(packed: PackedWeight) -> bool:
    one_group = packed.scheme.num_groups(packed.shape[1]) == 1 or packed.scale.shape == (1, 1)
    return one_group and centered_levels(packed.scheme.qformat, 256) is not None


def digits_plan(packed: PackedWeight) -> tuple[int, int, DigitLevels] | None:
    """(kernel group, padded K, levels) for levels as several 4-bit digits on the int4 kernel, or None."""
    levels = digit_levels(packed.scheme.qformat)
    if levels is None:
        return None
    k = packed.shape[1]
    grouping = int4_kernel_grouping(packed.scheme.group_length(k), k)
    return None if grouping is None else (*grouping, levels)


def _weight_terms(packed: PackedWeight, levels: DigitLevels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (N, K) int64, s and z (N, G) float32 with W = s * q + z per group (per-tensor values broadcast)."""
    n, k = packed.shape
    codes = packed.codes()
    q = levels.q.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
    scale = packed.group_scales() * levels.unit
    if scale.shape == (1, 1):
        scale = scale.expand(n, 1)
    if not levels.exact:   # each group's largest level used -> GRID_TOP (see the module doc)
        group = k if scale.shape[1] == 1 else packed.scheme.group_length(k)
        owner = (torch.arange(k) // group).expand(n, k)
        largest = torch.zeros(n, scale.shape[1]).scatter_reduce(1, owner, q.abs(), "amax")
        largest = torch.where(largest > 0, largest, torch.ones_like(largest))
        q = (q / largest.gather(1, owner) * GRID_TOP).round().long()
        scale = scale * largest / GRID_TOP
    if packed.offset is None:
        return q, scale, torch.zeros_like(scale)
    return q, scale, packed.offset.float().expand_as(scale) + levels.center * scale



def _perm(packed: PackedWeight) -> torch.Tensor | None:
    return None if packed.input_perm is None else packed.input_perm.long()


def _int4_layout(halves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], stored_group: int, group: int,
                 padded_k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel codes (rows, len(halves) * padded_k) and bfloat16 (groups, rows, 2) scales and zeros for weights
    sum over halves of (c - 8) * s + z, each half given as (codes c (N, K), s (N, G), z (N, G))."""
    k = halves[0][0].shape[1]
    # stored group of each kernel group; padding columns belong to the last one
    owner = (torch.arange(padded_k // group) * group // stored_group).clamp(max=halves[0][1].shape[1] - 1)
    rows = -(-n // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
    codes = torch.full((rows, len(halves) * padded_k), 8, dtype=torch.int32)  # the kernel reads w = (c - 8) * s + z
    params = torch.zeros(len(halves) * padded_k // group, rows, 2)
    for i, (c, scale, zero) in enumerate(halves):
        codes[:n, i * padded_k: i * padded_k + k] = c.to(torch.int32)
        g0 = i * padded_k // group
        params[g0: g0 + padded_k // group, :n, 0] = scale[:, owner].t()
        params[g0: g0 + padded_k // group, :n, 1] = zero[:, owner].t()
    return codes, params.to(_KERNEL_DTYPE).contiguous()


def prepare_int4(packed: PackedWeight, group: int, padded_k: int) -> Int4Prepared:
    n, k = packed.shape
    q, scale, zero = _weight_terms(packed, digit_levels(packed.scheme.qformat))  # type: ignore[arg-type]
    codes, params = _int4_layout([(q + 8, scale, zero)], packed.scheme.group_length(k), group, padded_k, n)
    return Int4Prepared(
        weight=torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scale_zero=params,
        group=group, padded_k=padded_k, out_features=n, input_perm=_perm(packed),
    )


def prepare_digits(packed: PackedWeight, group: int, padded_k: int, levels: DigitLevels) -> Int4Prepared:
    """Levels q = sum_i 16^i d_i as D int4 digit matrices side by side in one kernel matrix: the top digit
    signed (code d + 8, scale 16^(D-1) s, zero 0), the others 0..15 (code d, scale 16^i s, zero 8 16^i s,
    which cancels the kernel's - 8), the format's own zero point on the lowest (see the module doc)."""
    n, k = packed.shape
    q, scale, zero = _weight_terms(packed, levels)
    parts, rest = [], q.to(torch.int32)
    for i in range(levels.digits - 1):   # two's complement: & 15 is the remainder mod 16, >> 4 the floor quotient
        parts.append((rest & 15, 16**i * scale, 8 * 16**i * scale + (zero if i == 0 else 0)))
        rest = rest >> 4
    top = 16 ** (levels.digits - 1)
    parts.append((rest + 8, top * scale, zero if levels.digits == 1 else torch.zeros_like(zero)))  # rest in -8..7
    codes, params = _int4_layout(parts[::-1], packed.scheme.group_length(k), group, padded_k, n)
    return Int4Prepared(
        weight=torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), scale_zero=params,
        group=group, padded_k=padded_k, out_features=n, input_perm=_perm(packed), copies=levels.digits,
        exact=levels.exact,
    )


def prepare_int8(packed: PackedWeight) -> Int8Prepared:
    n, k = packed.shape
    q, scale, zero = _weight_terms(packed, digit_levels(packed.scheme.qformat))  # type: ignore[arg-type]
    padded_k = -(-k // INT8_K_MULTIPLE) * INT8_K_MULTIPLE
    weight = torch.zeros(n, padded_k, dtype=torch.int8)
    weight[:, :k] = q
    return Int8Prepared(
        weight=weight, ones=torch.ones(n, dtype=_KERNEL_DTYPE), scale=scale[:, 0].contiguous(),
        zero=None if packed.offset is None else zero[:, 0].contiguous(), padded_k=padded_k,
        input_perm=_perm(packed),
    )


def int4_matmul(x2: torch.Tensor, prep: Int4Prepared) -> torch.Tensor:
    """(M, K) activations -> (M, N) bfloat16."""
    xb = x2.to(_KERNEL_DTYPE)
    if prep.input_perm is not None:
        xb = xb.index_select(1, prep.input_perm)
    if prep.padded_k != xb.shape[1]:
        xb = F.pad(xb, (0, prep.padded_k - xb.shape[1]))
    if prep.copies > 1:
        xb = torch.cat([xb] * prep.copies, dim=1)  # (M, copies * padded_k); repeat() costs 5x more here
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), prep.weight, prep.group, prep.scale_zero)
    return y if y.shape[1] == prep.out_features else y[:, : prep.out_features]


def int8_matmul(x2: torch.Tensor, prep: Int8Prepared) -> torch.Tensor:
    """(M, K) activations -> (M, N) float32."""
    if prep.input_perm is not None:
        x2 = x2.index_select(1, prep.input_perm)
    xb = x2.to(_KERNEL_DTYPE)
    if prep.padded_k != xb.shape[1]:
        xb = F.pad(xb, (0, prep.padded_k - xb.shape[1]))
    y = torch.ops.aten._weight_int8pack_mm(xb.contiguous(), prep.weight, prep.ones) * prep.scale  # float32
    if prep.zero is not None:  # sum_k x_k * zero_n, with x at full precision
        y = y + x2.float().sum(dim=1, keepdim=True) * prep.zero
    return y


def prepare(packed: PackedWeight) -> Prepared | None:
    """The fastest prepared form this CPU can run for `packed`, or None."""
    plan = int4_plan(packed)
    if plan is not None:
        return prepare_int4(packed, *plan)
    if int8_fits(packed):
        return prepare_int8(packed)
    plan = digits_plan(packed)
    if plan is not None:
        return prepare_digits(packed, *plan)
    return None


def int4_kind(prep: Int4Prepared) -> str:
    """The counter name of a call on the int4 kernel (see CpuBackend.calls)."""
    if prep.copies == 1:
        return "int4"
    return f"{4 * prep.copies}-bit levels as int4 digits" + ("" if prep.exact else " (12-bit grid)")


def prepared_nbytes(prep: Prepared) -> int:
    tensors = [getattr(prep, f.name) for f in fields(prep)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


EXACT_NATIVE_ROWS = 2


def native_rows(plan: cpu_native.NativePlan) -> int:
    """The most activation rows a call may have to take the native kernels. They decode the weight once per row
    of x, so where PyTorch's kernels read the format's exact levels (int4, int8, fp4...) the native kernels win up
    to EXACT_NATIVE_ROWS rows (bench/cpu_native.py, 1536 x 576 at one thread: at 2 rows 49 vs 67 µs for int4/g32,
    63 vs 132 for int8/g32, level for int8/channel; at 4 level or behind). Levels PyTorch's kernels take only rounded to
    a 12-bit grid, as three digits (nf4, fp8), take the native kernels up to DIGITS_MAX_ROWS, as far as the digits
    would serve: exact, and without the digits' layout of 1.5 bytes per weight beside the packed one. NF4's native
    time per row stays at or below the digits' there; fp8's is up to 1.3x above from 4 rows (prompts), the price
    of that memory."""
    return EXACT_NATIVE_ROWS if _exact_in_torch(plan.format) else DIGITS_MAX_ROWS


@functools.cache
def _exact_in_torch(format_name: str) -> bool:
    from modelpress.formats.base import get_format

    levels = digit_levels(get_format(format_name))
    return levels is not None and levels.exact


_NATIVE_KINDS = {4: "native 4-bit", 8: "native 8-bit"}


def native_kind(plan: cpu_native.NativePlan) -> str:
    """The counter name of a call on the native kernels (see CpuBackend.calls)."""
    return _NATIVE_KINDS[plan.bits]


# ---- plumbing: the backend, its per-layer cache and its counters ----

def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no versions
        return -1


_UNBUILT = object()  # an _Entry form not built yet


@dataclass
class _Entry:
    """The forms a layer is served in, each built on the first call that needs it, and what they were built from:
    the packed tensors (weakly) and their versions."""

    scheme: WeightScheme
    sources: tuple[weakref.ref | None, ...]
    versions: tuple[int, ...]
    prepared: Prepared | None | object = _UNBUILT   # PyTorch kernels' layout
    charged: int = 0   # bytes of `prepared` counted against CpuBackend.digits_budget (layouts of several digits)
    native: cpu_native.NativePlan | None | object = _UNBUILT   # the native kernels' plan (no copy of the weight)

    def matches(self, packed: PackedWeight, tensors: tuple[torch.Tensor | None, ...]) -> bool:
        if packed.scheme is not self.scheme and packed.scheme != self.scheme:
            return False
        for ref, t, version in zip(self.sources, tensors, self.versions):
            if (None if ref is None else ref()) is not t or (t is not None and _version(t) != version):
                return False
        return True


def _packed_tensors(packed: PackedWeight) -> tuple[torch.Tensor | None, ...]:
    return (packed.qdata, packed.scale, packed.offset, packed.scale_scale, packed.scale_mean, packed.input_perm)


class CpuBackend:
    """Backend entry (see backends.py). `calls` counts calls served per kernel ("native 4-bit", "native 8-bit",
    "int4", "int8", "8-bit levels as int4 digits", "12-bit levels as int4 digits (12-bit grid)", see int4_kind);
    `with backend.disabled():` sends every call to the next backend (to compare against the reference);
    `with backend.fast():` lets float32 activations through too (rounded to bfloat16, see the module doc)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}  # id(qdata) -> entry, dropped when that qdata tensor is freed
        self.calls: Counter[str] = Counter()
        self.enabled = True
        self.round_float32 = False
        self.small_m_threads: int | None = 1  # None: small calls use the configured thread count too
        self.digits_budget = DIGITS_BUDGET_BYTES
        self.digits_bytes = 0   # held now by layouts of several digits
        self.native = True      # decode-sized calls take the native kernels (cpu_native.py) where they serve

    @contextmanager
    def fast(self) -> Iterator[None]:
        before, self.round_float32 = self.round_float32, True
        try:
            yield
        finally:
            self.round_float32 = before

    @contextmanager
    def disabled(self) -> Iterator[None]:
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def _entry(self, packed: PackedWeight) -> _Entry:
        """This layer's cache entry, a fresh one if its packed tensors were replaced or edited since."""
        tensors = _packed_tensors(packed)
        key = id(packed.qdata)
        entry = self._entries.get(key)
        if entry is None or not entry.matches(packed, tensors):
            if entry is not None:
                self.digits_bytes -= entry.charged
            else:
                weakref.finalize(packed.qdata, self._drop, key)
            entry = _Entry(packed.scheme, tuple(None if t is None else weakref.ref(t) for t in tensors),
                           tuple(-1 if t is None else _version(t) for t in tensors))
            self._entries[key] = entry
        return entry

    def prepared(self, packed: PackedWeight, entry: _Entry | None = None) -> Prepared | None:
        """The cached prepared form of this layer's packed tensors (built on first use), or None. `entry`: this
        layer's cache entry, if the caller has it already."""
        entry = entry or self._entry(packed)
        if entry.prepared is _UNBUILT:
            prepared, charged = prepare(packed), 0
            if isinstance(prepared, Int4Prepared) and prepared.copies > 1:
                charged = prepared_nbytes(prepared)
                if self.digits_bytes + charged > self.digits_budget:
                    prepared, charged = None, 0
                self.digits_bytes += charged
            entry.prepared, entry.charged = prepared, charged
        return entry.prepared  # type: ignore[return-value]

    def needs_digits(self, packed: PackedWeight, entry: _Entry | None = None) -> bool:
        """Whether this layer's prepared form is (or would be) a layout of several digits."""
        entry = entry or self._entry(packed)
        if entry.prepared is not _UNBUILT:
            return isinstance(entry.prepared, Int4Prepared) and entry.prepared.copies > 1
        return int4_plan(packed) is None and not int8_fits(packed) and digits_plan(packed) is not None

    def native_plan(self, packed: PackedWeight, entry: _Entry | None = None) -> cpu_native.NativePlan | None:
        """The cached native-kernel plan of this layer (None: the native kernels do not serve it)."""
        entry = entry or self._entry(packed)
        if entry.native is _UNBUILT:
            entry.native = cpu_native.plan_for(packed)
        return entry.native  # type: ignore[return-value]

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.digits_bytes -= entry.charged

    def __call__(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
        if not self.enabled or not x.is_cpu or not packed.qdata.is_cpu:  # is_cpu: no device object per call
            return None
        if x.dtype not in _ACT_DTYPES or (x.dtype == torch.float32 and not self.round_float32):
            return None
        n, k = packed.shape
        if x.shape[-1] != k or x.numel() == 0:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return None  # the kernels have no backward; the reference path does
        x2 = x.reshape(-1, k)
        rows = x2.shape[0]
        entry = self._entry(packed)
        if self.native and rows <= DIGITS_MAX_ROWS and cpu_native.available():
            plan = self.native_plan(packed, entry)
            if plan is not None and rows <= native_rows(plan):
                y = cpu_native.native_matmul(x2, plan)
                self.calls[native_kind(plan)] += 1
                return self._finish(y, x, bias, n)
        if rows > DIGITS_MAX_ROWS and self.needs_digits(packed, entry):
            return None   # layouts of several digits are not built for calls they would not serve
        prep = self.prepared(packed, entry)
        if prep is None:
            return None
        if isinstance(prep, Int4Prepared) and prep.copies > 1 and x2.shape[0] > DIGITS_MAX_ROWS:
            return None
        threads = torch.get_num_threads()
        limit = self.small_m_threads if x2.shape[0] <= SMALL_M_ROWS else None
        if limit is not None and limit < threads:
            torch.set_num_threads(limit)
        try:
            if isinstance(prep, Int4Prepared):
                y, kind = int4_matmul(x2, prep), int4_kind(prep)
            else:
                y, kind = int8_matmul(x2, prep), "int8"
        finally:
            if limit is not None and limit < threads:
                torch.set_num_threads(threads)
        self.calls[kind] += 1
        return self._finish(y, x, bias, n)

    @staticmethod
    def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        if bias is not None:  # bfloat16 + float32 adds in float32, in one op
            y = torch.add(y, bias if bias.dtype == torch.float32 else bias.float())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _kernels_available() -> bool:
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in
               ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm"))


CPU_BACKEND = CpuBackend()


def fast_cpu() -> contextlib.AbstractContextManager:
    """Context in which float32 calls on the CPU also take the packed int4/int8 kernels (bfloat16 inside)."""
    return CPU_BACKEND.fast()


def _register() -> None:
    from modelpress.nn.backends import backend_names, register_backend

    if _kernels_available() and "cpu" not in backend_names():
        register_backend("cpu", CPU_BACKEND)


_register()
