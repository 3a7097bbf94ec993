"""The CUDA matmul backend: QuantLinear on a CUDA device runs the Triton kernels of triton_kernels.py.

`triton_linear(x, packed, bias)` returns None (so the next backend is tried) unless x is a float16 or
bfloat16 CUDA tensor, Triton imports, and the weight's scheme is one the kernels read: int4 and int8
(symmetric or asymmetric), nf4, fp8-e4m3 and fp8-e5m2, with group sizes whose largest power-of-two
divisor is at least 32 for 4-bit formats and 16 for 8-bit ones (or per-channel / per-tensor scales),
without double quantization. No weight is converted or copied: the kernels read the stored qdata,
scale and offset tensors directly.

Up to M = 64 (decode, small batches) one fused kernel streams the weight once; from M = 65 up (prefill) a
dequantize kernel writes the weight in the activation dtype and cuBLAS multiplies (`choose_plan`). For the
4-bit formats at M = 1 (decode) a CUDA-core GEMV kernel replaces the tensor-core one: gluon_gemv.py's (launched as
a programmatic dependent launch on Hopper) where Triton has Gluon, else triton_gemv.py's.
Plans are made for the GPU they run on (`for_capability`): what an older GPU lacks is left out of the kernel, never
compiled in (tests/nn/arch_compile.py compiles every launch for the T4, A100, A10, L4 and H100).
`prepared_linear` fixes everything about a call but x, for QuantLinear's eager CUDA path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelpress.formats.packed import PackedWeight
from modelpress.formats.scheme import WeightScheme

KIND_INT8 = 2  # triton_kernels' kind of int8 codes
KIND_FP8E4, KIND_FP8E4_BITS = 3, 5  # triton_kernels' kinds of fp8-e4m3 codes: converted, or decoded by bits
_FORMAT_KINDS = {  # format name -> (kernel kind, code zero)
    "int4": (0, 8), "int4-asym": (0, 0), "nf4": (1, 0),
    "int8": (2, 128), "int8-asym": (2, 0), "fp8-e4m3": (3, 0), "fp8-e5m2": (4, 0),
}
_ACT_DTYPES = (torch.float16, torch.bfloat16)
DEQUANT_MIN_M = 65  # from here up, dequantize-then-cuBLAS beats the fused kernel (bench/kernel_sweep.py, H100)
GEMV_MAX_M = 1  # up to here the GEMV kernels (triton_gemv.py) serve every format; M >= 2 takes the tensor cores


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch options of one fused launch (BKG: columns per group sub-tile, SUB sub-tiles
    per loop step, SPLIT ways of splitting K; dequant=True means dequantize then cuBLAS instead; gemv=True
    means a CUDA-core GEMV kernel of triton_gemv.py, M = 1 only, which uses BN, BKG, SUB, SPLIT, num_warps;
    gluon=True (4-bit formats) means gluon_gemv.py's kernel instead, with rows_per_thread rows per thread, all
    warps_k of the warps along K and the rest along the rows, words through a cp.async ring of `stages` steps
    when stages > 1, pdl=True launches it as a programmatic dependent launch, and half=True sums int4 products
    in float16 pairs (gluon_gemv's HALF; 16-bit activations without an input permutation; nf4 keeps float32
    products: float16 pairs were slower for it, bench/kernels.py --float32-products)); native_fp8=False decodes
    fp8-e4m3 codes in integer arithmetic (GPUs without e4m3 conversions)."""

    BM: int = 16
    BN: int = 64
    BKG: int = 128
    SUB: int = 1
    SPLIT: int = 1
    num_warps: int = 2
    num_stages: int = 3
    dequant: bool = False
    gemv: bool = False
    gluon: bool = False
    rows_per_thread: int = 1
    warps_k: int = 1
    stages: int = 1
    pdl: bool = False
    half: bool = True
    native_fp8: bool = True


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def bf16_rounding():
    """A Triton function rounding float32 to bfloat16 (to nearest, ties to even), kept in float32, in integer
    arithmetic: the compiler may fold a cast to bfloat16 and back away, which leaves products and sums unrounded
    where PyTorch's separate operations round them (the decode-time kernels must give PyTorch's numbers)."""
    import triton
    import triton.language as tl

    @triton.jit
    def bf16(x):
        bits = x.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)

    return bf16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def group_tile(packed: PackedWeight) -> int | None:
    """Largest power-of-two sub-tile (up to 128 columns) that never crosses a group; None if it would be
    narrower than a tensor-core step (16 products: 32 columns of 4-bit codes, split into even and odd)."""
    return _group_tile(packed.scheme, packed.shape, tuple(packed.scale.shape))


@functools.lru_cache(maxsize=4096)
def _group_tile(scheme: WeightScheme, shape: tuple[int, int], scale_shape: tuple[int, ...]) -> int | None:
    k = shape[1]
    g = scheme.group_length(k)
    if scale_shape == (1, 1) or g >= k:
        return 128
    tile = 128
    while tile >= (32 if scheme.bits == 4 else 16):
        if g % tile == 0:
            return tile
        tile //= 2
    return None


def supports(packed: PackedWeight) -> bool:
    scheme = packed.scheme
    return (scheme.format in _FORMAT_KINDS and not scheme.double_quant and packed.qdata.stride(-1) == 1
            and packed.scale.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and group_tile(packed) is not None)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# What the kernels' PTX needs of the GPU (compute capability), checked where a launch is planned: ptxas refuses
# an instruction the target lacks, so a kernel compiled with it would fail on the user's GPU at its first call.
PDL_CAPABILITY = (9, 0)  # griddepcontrol (programmatic dependent launch): Hopper and later
HALF_CAPABILITY = (8, 6)  # max.xorsign.abs, in half_dot_ptx's scaling of the activations: not on the A100 (8.0)
FP8_CAPABILITY = (8, 9)  # conversions from float8 e4m3 (and fp8 tensor-core products): Ada and Hopper
ASYNC_COPY_CAPABILITY = (8, 0)  # cp.async, the Gluon GEMV's ring (KernelConfig.stages > 1): Ampere and later
BF16_ASM_CAPABILITY = (8, 0)  # bfloat16 pair arithmetic (bf16x2) in the tensor-core kernel's inline-PTX decode


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    """The compute capability of a CUDA device, as (major, minor)."""
    return tuple(torch.cuda.get_device_capability(device_index))


def device_capability(device: torch.device) -> tuple[int, int]:
    """`capability` of the device a tensor lives on; (0, 0) off CUDA (Triton's interpreter: no GPU instruction)."""
    return capability(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else (0, 0)


PDL_KERNELS = True  # the decode-time kernels' PDL (pdl_launch); bench/decode.py turns it off to measure it


def pdl_launch(device: torch.device) -> bool:
    """Whether the decode-time kernels (norms, rotary embedding, KV writes, attention, activation) launch on
    `device` as programmatic dependent launches: on Hopper and later, not under the interpreter. Such a kernel,
    compiled with its constexpr PDL set, starts with

        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    it waits (griddepcontrol.wait) until the kernel before it has finished and its writes are visible, before it
    touches memory, then lets the next kernel launch (launch_dependents). The next kernel's launch, and a GEMV's
    first weight loads (gluon_gemv), then overlap this kernel instead of following its end. Every kernel launched
    this way must start with the wait: it is what orders the kernel after every earlier one, through the waits of
    those in between."""
    return (PDL_KERNELS and device.type == "cuda" and not _interpreting()
            and device_capability(device) >= PDL_CAPABILITY)


def for_capability(config: KernelConfig, cap: tuple[int, int]) -> KernelConfig:
    """`config` with what a GPU of compute capability `cap` cannot run turned off: PDL before Hopper, float16-pair
    products (KernelConfig.half) before 8.6, fp8-e4m3 conversions before 8.9 (decoded in integer arithmetic
    instead), the cp.async ring before 8.0 (the next step's words prefetched into registers instead). Everything
    else about the plan is the same."""
    changes = dict(pdl=config.pdl and cap >= PDL_CAPABILITY, half=config.half and cap >= HALF_CAPABILITY,
                   native_fp8=config.native_fp8 and cap >= FP8_CAPABILITY,
                   stages=config.stages if cap >= ASYNC_COPY_CAPABILITY else 1)
    if all(getattr(config, name) == value for name, value in changes.items()):
        return config
    return dataclasses.replace(config, **changes)


def _kernel_kind(scheme: WeightScheme, native_fp8: bool) -> tuple[int, int]:
    """(kernel kind, code zero) of a scheme's format, fp8-e4m3 decoded by bits where conversions are missing."""
    kind, zero = _FORMAT_KINDS[scheme.format]
    return (KIND_FP8E4_BITS if kind == KIND_FP8E4 and not native_fp8 else kind), zero


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


# GEMV tiles per kernel kind (bench/kernel_sweep.py --gemv on an H200, M = 1, 7B shapes): BN rows x SUB group
# tiles of at most 128 columns per loop step, num_warps, and the programs per multiprocessor that K is split
# towards (powers of two, keeping at least GEMV_MIN_STEPS loop steps per split). int4: BN 128, one tile per
# step, ~4 programs per SM was best or within 3% of best on all three shapes; nf4 (more decode work per
# weight) preferred 64 rows x 2 tiles and more splits. For the 8-bit formats the tensor-core kernel was
# faster than the GEMV at M = 1 (7B stack 3.18 vs 3.60 ms for fp8-e4m3, 3.36 vs 3.60 ms for int8), so the
# plan keeps them there; gemv8_kernel stays for explicit configs and the sweep.
GEMV_TILES = {0: (128, 1, 4, 4.0), 1: (64, 2, 4, 8.0)}  # kind -> (BN, SUB, num_warps, programs per SM)
GEMV_MIN_STEPS = 2


def gemv_plan(n: int, k: int, bkg: int, kind: int = 0, sms: int = 132, bn: int | None = None,
              sub: int | None = None, warps: int | None = None, programs_per_sm: float | None = None,
              min_steps: int = GEMV_MIN_STEPS, gluon: bool | None = None) -> KernelConfig:
    """GEMV tiles for M = 1: BN rows per program, SUB tiles of BKG (at most 128) columns per step, K split
    until the grid fills the machine. kind: the kernel kind (0 int4, 1 nf4; others take int4's tiles).
    4-bit kinds take the Gluon kernel (gluon_gemv_plan) where it can run, unless gluon=False or a tile
    argument asks for the Triton kernel's."""
    if gluon is None:
        gluon = kind <= 1 and bn is None and sub is None and warps is None and gluon_gemv_available()
    if gluon:
        return gluon_gemv_plan(n, k, bkg, sms, programs_per_sm or GLUON_PROGRAMS_PER_SM, min_steps)
    tile_bn, tile_sub, tile_warps, tile_programs = GEMV_TILES.get(kind, GEMV_TILES[0])
    bn, sub, warps = bn or tile_bn, sub or tile_sub, warps or tile_warps
    programs_per_sm = programs_per_sm or tile_programs
    step = min(bkg, 128)
    while sub > 1 and k < step * sub * min_steps:  # short rows: fewer sub-tiles rather than idle ones
        sub //= 2
    blocks = _cdiv(n, bn)
    split = 1
    while blocks * split * 2 <= programs_per_sm * sms and k // (step * sub * split * 2) >= min_steps:
        split *= 2
    return KernelConfig(BM=1, BN=bn, BKG=step, SUB=sub, SPLIT=split, num_warps=warps, num_stages=1, gemv=True)


# The Gluon GEMV's plan (bench/kernel_sweep.py --gluon and --gluon-pipelines on an H200, M = 1, 7B shapes, PDL on).
# Layout, ring depth and split moved the time by little on 4096-row shapes (within ~10% of each other for the good
# families) while more K splits past ~4 programs per SM, cp.async rings with fewer programs, and warps along K
# without split-K on long rows (4096x11008) were slower. Where the rows alone make >= 2.5 programs per SM
# (11008x4096), 16-64 rows per program with the 4 warps along K and no split-K won: 13.3 vs 14.9 µs int4, 16.9 vs
# 20.4 µs nf4, against the Triton GEMV. Otherwise 4 rows per thread, 2 group tiles per step, K split towards 4
# programs per SM (int4 4096x4096: 7.0 vs 8.0 µs).
GLUON_PROGRAMS_PER_SM = 4.0
GLUON_NO_SPLIT_PROGRAMS_PER_SM = 2.5


def gluon_rows(bkg: int, rows_per_thread: int, sub: int, warps: int, warps_k: int = 1) -> int:
    """The rows (BN) that gluon_gemv's layout covers exactly: 4 words per thread across a sub-tile of bkg
    columns, the remaining lanes across sub-tiles and rows, warps_k warps along K and the rest along rows."""
    words_threads = bkg // 32
    sub_threads = min(sub // warps_k, 32 // words_threads)
    return rows_per_thread * (32 // (words_threads * sub_threads)) * (warps // warps_k)


def gluon_gemv_plan(n: int, k: int, bkg: int, sms: int = 132, programs_per_sm: float = GLUON_PROGRAMS_PER_SM,
                    min_steps: int = GEMV_MIN_STEPS) -> KernelConfig:
    """Plan of the Gluon GEMV (see the table's comment above), launched with PDL."""
    step = min(bkg, 128)
    base = dict(BM=1, BKG=step, num_warps=4, num_stages=1, gemv=True, gluon=True, rows_per_thread=4, pdl=True)
    rows_k = gluon_rows(step, 4, 8, 4, 4)
    if _cdiv(n, rows_k) >= GLUON_NO_SPLIT_PROGRAMS_PER_SM * sms and k >= step * 8 * min_steps:
        return KernelConfig(BN=rows_k, SUB=8, SPLIT=1, warps_k=4, stages=4, **base)
    sub = 2 if k >= step * 2 * min_steps else 1
    bn = gluon_rows(step, 4, sub, 4)
    blocks, split = _cdiv(n, bn), 1
    while blocks * split * 2 <= programs_per_sm * sms and k // (step * sub * split * 2) >= min_steps:
        split *= 2
    return KernelConfig(BN=bn, SUB=sub, SPLIT=split, **base)


@functools.cache
def gluon_gemv_available() -> bool:
    """Whether the Gluon GEMV can run: Triton with Gluon, not under the interpreter (which runs no Gluon)."""
    if _interpreting() or not triton_available():
        return False
    try:
        from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: F401

        from modelpress.nn import gluon_gemv  # noqa: F401
    except ImportError:
        return False
    return True


# Tensor-core tiles for M <= 16 (one BM = 16 row tile): BN rows, SUB group tiles of at most 128 columns a loop
# step, num_warps, the programs per multiprocessor that K is split towards (powers of two) and the loop steps every
# split keeps. int4 weights in groups of 128 (bench/kernel_sweep.py --ms 16 --wide, H100, the four 7B shapes):
# 32 rows and two group tiles a step, split towards 3 programs per SM, 71.4 µs for the four against 80.2 for the
# tiles below (17.9 / 9.5 / 27.2 / 16.8 µs on 12288x4096, 4096x4096, 22016x4096, 4096x11008). Through generate, 16
# prompts, Llama-2-7B shape (bench/decode.py +oldtiles): int4/g128 3071.5 -> 3241.1 tok/s on the float KV cache,
# 3698.3 -> 3820.4 on the int8 one. NF4 in groups of 64 (the same sweep, --spec nf4/g64): the same tiles (two group
# tiles of 64 a step) 115.6 -> 110.1 µs for the four shapes (28.1 / 13.5 / 46.2 / 27.8 -> 27.3 / 12.4 / 44.5 / 26.0;
# 2264.1 -> 2353.0 tok/s through generate, float cache). int8 (groups of 128, or per channel), which runs these tiles
# at M = 1 too, gains on wide weights only (bench/kernel_sweep.py --against-old-tiles --spec int8/g128,int8/channel,
# H100, M = 1 / 16, µs): 12288x4096 27.5 / 29.3 -> 24.7 / 24.9, 22016x4096 45.2 / 50.2 -> 38.7 / 39.9, but
# 4096x4096 11.9 / 12.5 -> 13.5 / 13.6 and 4096x11008 24.1 / 25.8 -> 27.0 / 27.1 (32-row tiles of a narrow weight
# split K into short loops); so int8 takes them where its rows alone fill WIDE_8BIT_MIN_WAVES programs a
# multiprocessor: the four shapes 108.7 -> 99.4 µs at M = 1, 117.8 -> 103.0 at M = 16; through generate, int8/g128
# 242.7 -> 257.6 tok/s at batch 1, 2429.7 -> 2611.5 at 16 (float KV cache). fp8-e4m3 per channel under the same
# rule (--against-old-tiles --spec fp8-e4m3/channel): 12288x4096 26.1 / 28.1 -> 23.7 / 24.7 µs, 22016x4096 47.3 / 50.3
# -> 38.4 / 38.2, the four shapes 108.0 -> 96.7 at M = 1 and 114.9 -> 99.4 at M = 16; through generate, 16 prompts:
# 2491.3 -> 2657.3 tok/s. Other weights keep 64 rows, one tile a step and 8 programs per SM (NF4 in groups of 128
# and int4 in groups under 128 were not swept wide).
SMALL_M_TILES = (32, 2, 2, 3.0, 4)
SMALL_M_TILES_OTHER = (64, 1, 2, 8.0, 6)
# kernel kind (0 int4, 1 nf4, 2 int8, 3 fp8-e4m3: _FORMAT_KINDS) -> the group tile SMALL_M_TILES was swept at
SMALL_M_TILE_STEPS = {0: 128, 1: 64, 2: 128, KIND_FP8E4: 128}
# 8-bit kinds that take SMALL_M_TILES where wide (plan_for passes fp8-e4m3 as KIND_FP8E4 on every GPU)
WIDE_8BIT_KINDS = (KIND_INT8, KIND_FP8E4)
WIDE_8BIT_MIN_WAVES = 2


@functools.lru_cache(maxsize=4096)
def choose_plan(m: int, n: int, k: int, bkg: int, sms: int = 132, gemv_ok: bool = False, kind: int = 0
                ) -> KernelConfig:
    """Tiles by size of M. Up to GEMV_MAX_M, for weights the GEMV serves (gemv_ok) the CUDA-core GEMV
    (gemv_plan; kind: the kernel kind). Otherwise up to M = 64 the tensor-core kernel streams the weight once
    in (BM x BN) tiles, K split until the grid reaches a number of programs per multiprocessor (each keeps only
    a few tiles of memory in flight) while every split keeps a few loop steps: SMALL_M_TILES for M <= 16 (4-bit
    weights the GEMV serves and wide int8 and fp8 ones, in the group tiles swept: SMALL_M_TILE_STEPS), else
    SMALL_M_TILES_OTHER; BM = 32 / 64 tiles above 16 rows. Prefill dequantizes, then cuBLAS. Tuned on an H100
    with bench/kernel_sweep.py (--gemv for the GEMV)."""
    if m >= DEQUANT_MIN_M:
        return KernelConfig(dequant=True)
    if gemv_ok and m <= GEMV_MAX_M:
        return gemv_plan(n, k, bkg, kind, sms)
    step = min(bkg, 128)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    # 4-bit codes were swept where they view as words (gemv_ok); 8-bit codes, read as bytes either way, on wide
    # weights only
    wide_8bit = kind in WIDE_8BIT_KINDS and _cdiv(n, SMALL_M_TILES[0]) >= WIDE_8BIT_MIN_WAVES * sms
    swept = bm == 16 and (gemv_ok or wide_8bit) and SMALL_M_TILE_STEPS.get(kind) == step
    tiles = SMALL_M_TILES if swept else SMALL_M_TILES_OTHER
    bn, sub, warps, programs_per_sm, min_steps = tiles
    warps = warps if bm == 16 else 4
    blocks = _cdiv(m, bm) * _cdiv(n, bn)
    split = 1
    while blocks * split < programs_per_sm * sms and k // (step * sub * split * 2) >= min_steps:
        split *= 2
    return KernelConfig(BM=bm, BN=bn, BKG=step, SUB=sub, SPLIT=split, num_warps=warps, num_stages=3, pdl=True)


def plan_for(m: int, packed: PackedWeight, device: torch.device) -> KernelConfig:
    n, k = packed.shape
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 132
    kind = _FORMAT_KINDS.get(packed.scheme.format, (0,))[0]
    config = choose_plan(m, n, k, group_tile(packed) or 16, sms, gemv_supported(packed), kind)
    return for_capability(config, device_capability(device))


def gemv_supported(packed: PackedWeight) -> bool:
    """Whether the plan sends M = 1 to a GEMV kernel: a 4-bit format (int4, int4-asym, nf4; see GEMV_TILES for
    8-bit) whose qdata rows view as uint32 words (codes are decoded a word at a time)."""
    q = packed.qdata
    return (packed.scheme.format in _FORMAT_KINDS and packed.scheme.bits == 4 and q.dim() == 2
            and q.stride(1) == 1 and q.stride(0) % 4 == 0
            and q.shape[1] % 4 == 0 and q.storage_offset() % 4 == 0)


def _table(kind: int, device: torch.device, dtype: torch.dtype, cache: dict = {}) -> torch.Tensor:  # noqa: B006
    """NF4 levels as a small device tensor (a constant of the format, cached per device and dtype)."""
    key = (kind, device, dtype)
    if key not in cache:
        from modelpress.formats.base import get_format

        cache[key] = get_format("nf4").levels.to(device=device, dtype=dtype)
    return cache[key]


def _scale_strides(t: torch.Tensor) -> tuple[int, int]:
    return (0, 0) if t.shape == (1, 1) else (t.stride(0), t.stride(1))


def split_locks(device: torch.device, tiles: int, cache: dict = {}) -> torch.Tensor:  # noqa: B006
    """Per-device arrival counters for split-K launches, zero between launches (each launch's last program
    per tile resets its counter). Split-K launches on one device must not run concurrently."""
    locks = cache.get(device)
    if locks is None or locks.numel() < tiles:
        locks = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
        cache[device] = locks
    return locks


@dataclass(frozen=True)
class _Launch:
    """Everything about one fused launch that depends only on shapes, scheme and config (cached)."""

    grid: tuple[int, int, int]
    k_per_split: int
    group_size: int
    constants: dict


@functools.lru_cache(maxsize=4096)
def _launch(scheme: WeightScheme, shape: tuple[int, int], scale_shape: tuple[int, ...], m: int,
            has_perm: bool, has_bias: bool, config: KernelConfig) -> _Launch:
    n, k = shape
    kind, zero = _kernel_kind(scheme, config.native_fp8)
    bkg = min(config.BKG, _group_tile(scheme, shape, scale_shape) or 0)
    if bkg < (32 if kind <= 1 else 16):
        raise ValueError(f"{scheme.spec}: no tile of {config.BKG} columns fits its groups")
    step = bkg * config.SUB
    k_per_split = _cdiv(_cdiv(k, config.SPLIT), step) * step
    split = _cdiv(k, k_per_split)
    constants = dict(KIND=kind, ZERO=zero, AFFINE=scheme.qformat.affine, HAS_PERM=has_perm, HAS_BIAS=has_bias,
                     SPLIT_K=split > 1, EVEN_K=k % step == 0, BM=config.BM, BN=config.BN, BKG=bkg, SUB=config.SUB,
                     PDL=config.pdl, num_warps=config.num_warps, num_stages=config.num_stages,
                     launch_pdl=config.pdl)
    grid = (_cdiv(m, config.BM), _cdiv(n, config.BN), split)
    return _Launch(grid, k_per_split, scheme.group_length(k), constants)


@functools.lru_cache(maxsize=4096)
def _gemv_launch(scheme: WeightScheme, shape: tuple[int, int], scale_shape: tuple[int, ...], m: int,
                 has_perm: bool, has_bias: bool, config: KernelConfig) -> _Launch:
    n, k = shape
    kind, zero = _kernel_kind(scheme, config.native_fp8)
    if m != 1:
        raise ValueError(f"the GEMV kernels take one row of activations, got M = {m}")
    bkg = min(config.BKG, 128, _group_tile(scheme, shape, scale_shape) or 0)
    if bkg < 16:
        raise ValueError(f"{scheme.spec}: no tile of {config.BKG} columns fits its groups")
    step = bkg * config.SUB
    k_per_split = _cdiv(_cdiv(k, config.SPLIT), step) * step
    split = _cdiv(k, k_per_split)
    constants = {"KIND": kind, "ZERO": zero, "AFFINE": scheme.qformat.affine, "HAS_PERM": has_perm,
                 "HAS_BIAS": has_bias, "SPLIT_K": split > 1, "SPLITS": _pow2_at_least(split), "EVEN_K": k % step == 0,
                 "BN": config.BN, "BKG": bkg,
                 "SUB": config.SUB, "num_warps": config.num_warps, "num_stages": 1}
    if config.gluon:
        if kind > 1:
            raise ValueError(f"{scheme.spec}: the Gluon GEMV reads 4-bit codes only")
        constants.update(RPT=config.rows_per_thread, WARPS=config.num_warps, WARPS_K=config.warps_k,
                         STAGES=config.stages, PDL=config.pdl,
                         launch_pdl=config.pdl)
    grid = (1, _cdiv(n, config.BN), split)
    return _Launch(grid, k_per_split, scheme.group_length(k), constants)


HALF_PRODUCTS = True  # KernelConfig.half for every launch; bench/kernels.py turns it off to time the float32 ones
_EXPONENT_BITS = 0x4B000000  # float32 bits of 2**23, a run-time argument of gemv4_kernel


@functools.cache
def _half_asm(zero: int, affine: bool, bf16: bool) -> tuple[str, str]:
    from modelpress.nn import gluon_gemv

    return gluon_gemv.half_asm(zero, affine, bf16)


def split_workspace(device: torch.device, numel: int, cache: dict = {}) -> torch.Tensor:  # noqa: B006
    """Per-device float32 scratch for split-K partial sums (launches on one device run one after another).
    A larger one replaces it when needed; the old ones stay allocated, since captured CUDA graphs may hold
    their addresses."""
    held = cache.setdefault(device, [])
    if not held or held[-1].numel() < numel:
        held.append(torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device))
    return held[-1]


def _outputs(x2: torch.Tensor, n: int, plan: _Launch, out: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output y (M, N), and for split-K launches the float32 partial sums (split · M · N) and the tile locks
    (without split-K the kernel never touches them: y stands in)."""
    m = x2.shape[0]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype) if out is None else out
    split = plan.grid[2]
    if split == 1:
        return y, y, y
    return y, split_workspace(x2.device, split * m * n), split_locks(x2.device, plan.grid[0] * plan.grid[1])


def _kernel_call(x2: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, config: KernelConfig,
                 use_asm: bool | None, out: torch.Tensor | None) -> tuple:
    """(jit kernel, grid, positional arguments, keyword constants, y) of one fused launch: the GEMV kernels
    for a gemv config, else the tensor-core kernel."""
    from modelpress.nn import triton_gemv, triton_kernels

    m, k = x2.shape
    n = packed.shape[0]
    scale = packed.scale
    has_perm = packed.input_perm is not None
    cap = device_capability(x2.device)
    config = for_capability(config, cap)  # a config given by the caller, too
    launch = _gemv_launch if config.gemv else _launch
    plan = launch(packed.scheme, packed.shape, tuple(scale.shape), m, has_perm, bias is not None, config)
    y, workspace, locks = _outputs(x2, n, plan, out)
    kind = plan.constants["KIND"]
    stride_sn, stride_sg = _scale_strides(scale)
    offset = packed.offset if packed.offset is not None else scale
    perm = packed.input_perm if has_perm else scale
    table = _table(kind, x2.device, torch.float32 if config.gemv else x2.dtype) if kind == 1 else scale
    bias_arg = bias if bias is not None else scale
    if use_asm is None:
        use_asm = not _interpreting() and (config.gemv or x2.dtype != torch.bfloat16 or cap >= BF16_ASM_CAPABILITY)
    asm = {"USE_ASM": use_asm}
    if config.gemv and kind <= 1:
        words = packed.qdata.view(torch.int32)
        args = (x2, words, scale, offset, perm, table, bias_arg, y, workspace, locks, n, k, plan.group_size,
                plan.k_per_split, _EXPONENT_BITS, words.stride(0), stride_sn, stride_sg)
        if config.gluon:
            from modelpress.nn import gluon_gemv

            half = config.half and HALF_PRODUCTS and kind == 0 and asm["USE_ASM"] and not has_perm
            dot, pairs = _half_asm(plan.constants["ZERO"], plan.constants["AFFINE"],
                                   x2.dtype == torch.bfloat16) if half else ("", "")
            constants = {**plan.constants, **asm, "HALF": half, "DOT_ASM": dot, "PAIRS_ASM": pairs}
            return gluon_gemv.gemv4_gluon_kernel, plan.grid, args, constants, y
        return triton_gemv.gemv4_kernel, plan.grid, args, {**plan.constants, **asm}, y
    if config.gemv:
        args = (x2, packed.qdata, scale, offset, perm, bias_arg, y, workspace, locks, n, k, plan.group_size,
                plan.k_per_split, packed.qdata.stride(0), stride_sn, stride_sg)
        return triton_gemv.gemv8_kernel, plan.grid, args, plan.constants, y
    args = (x2, packed.qdata, scale, offset, perm, table, bias_arg, y, workspace, locks, m, n, k, plan.group_size,
            plan.k_per_split, x2.stride(0), packed.qdata.stride(0), stride_sn, stride_sg, y.stride(0))
    return triton_kernels.quant_matmul_kernel, plan.grid, args, {**plan.constants, **asm}, y


def fused_matmul(x2: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, config: KernelConfig,
                 use_asm: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x2 (M, K) @ W^T (+ bias) in one launch. `out`, if given, is an (M, N) tensor of x's dtype
    with unit column stride that receives y. A gemv config (M = 1) runs a GEMV kernel of triton_gemv.py."""
    kernel, grid, args, constants, y = _kernel_call(x2, packed, bias, config, use_asm, out)
    kernel[grid](*args, **constants)
    return y


def dequantize(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in stored column order, decoded on the GPU in one launch."""
    from modelpress.nn.triton_kernels import dequantize_kernel

    n, k = packed.shape
    kind, zero = _kernel_kind(packed.scheme, device_capability(packed.qdata.device) >= FP8_CAPABILITY)
    bkg = group_tile(packed)
    w = torch.empty((n, k), device=packed.qdata.device, dtype=dtype)
    scale = packed.scale
    stride_sn, stride_sg = _scale_strides(scale)
    table = _table(kind, w.device, torch.float32) if kind == 1 else scale
    bn = 32
    dequantize_kernel[(_cdiv(n, bn), _cdiv(k, bkg))](
        packed.qdata, scale, packed.offset if packed.offset is not None else scale, table, w,
        n, k, packed.scheme.group_length(k), packed.qdata.stride(0), stride_sn, stride_sg,
        KIND=kind, ZERO=zero, AFFINE=packed.offset is not None, EVEN_K=k % bkg == 0, BN=bn, BKG=bkg, num_warps=4,
    )
    return w


MMA_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with bfloat16 operands: Ampere and later
# the tensor-core GEMV's plan (bench/mma_gemv.py, H100): one 16-row tile a program, its 4 warps along K two 64-column
# chunks at a time each; it beats the CUDA-core GEMV where the tiles give each multiprocessor several programs
# (12288, 11008 and 22016 rows: 0.77-0.85x its time) and loses where they do not (4096 rows: 1.05x at best, all of K
# in a program)
MMA_CONFIG = dict(rows_per_thread=1, chunks_per_step=2, warps_rows=1, warps_k=4)
# NF4 (more instructions a weight) was fastest with four chunks a step on both large shapes (H200)
MMA_NF4_CONFIG = dict(MMA_CONFIG, chunks_per_step=4)
MMA_MIN_TILES_PER_SM = 3
# fewer row tiles than that: with MMA_SPLIT_K, K is split until the programs reach MMA_MIN_TILES_PER_SM per
# multiprocessor, each split keeping at least MMA_SPLIT_MIN_STEPS loop steps; without it (the default until the split
# kernel has run on a GPU and been timed against the CUDA-core GEMV) such weights stay on the CUDA-core GEMV
MMA_SPLIT_K = False
MMA_SPLIT_MIN_STEPS = 2
# formats decode re-lays for the tensor-core GEMV (NF4: generate's tokens with and without the re-layout agree on an
# H200, tests/inference/test_fusion.py; decode of the Llama-2-7B shape 301.4 -> 319.2 tok/s there)
MMA_FORMATS = ("int4", "int4-asym", "nf4")


def mma_plan(n: int, k: int, nf4: bool, sms: int) -> dict | None:
    """gluon_mma_gemv.launch's plan (rows_per_thread, chunks_per_step, warps_rows, warps_k, split) for an (n, k)
    weight on a GPU of `sms` multiprocessors, or None where the CUDA-core GEMV is the faster one (too few row tiles
    to fill the GPU, and K too short to split or splitting turned off)."""
    from modelpress.nn.mma_ptx import CHUNK, TILE

    config = MMA_NF4_CONFIG if nf4 else MMA_CONFIG
    tiles, wanted = _cdiv(n, TILE * config["rows_per_thread"] * config["warps_rows"]), MMA_MIN_TILES_PER_SM * sms
    if tiles >= wanted:
        return dict(config, split=1)
    step = config["chunks_per_step"] * config["warps_k"]
    split = min(_cdiv(wanted, tiles), k // CHUNK // (step * MMA_SPLIT_MIN_STEPS))
    return dict(config, split=split) if MMA_SPLIT_K and split > 1 else None


def mma_supported(packed: PackedWeight) -> bool:
    """Whether gluon_mma_gemv serves the weight once re-laid (mma_ptx.mma_layout, in place: the same bytes), and
    faster than the CUDA-core GEMV: a format of MMA_FORMATS with per-group or per-channel scales, groups of a
    multiple of 64 columns, no input permutation or double quantization, N a multiple of 16 and K of 64, codes
    stored densely on a CUDA device of compute capability 8.0 or later, and a plan (mma_plan)."""
    from modelpress.nn.mma_ptx import CHUNK, TILE

    n, k = packed.shape
    q = packed.qdata
    if not q.is_cuda or mma_plan(n, k, packed.scheme.format == "nf4", _sm_count(q.device.index or 0)) is None:
        return False  # too few row tiles to fill the GPU, and K too short to split: the CUDA-core GEMV is faster
    return (packed.scheme.format in MMA_FORMATS and packed.scheme.granularity != "tensor"
            and packed.input_perm is None and packed.scale_scale is None and n % TILE == 0 and k % CHUNK == 0
            and packed.scheme.group_length(k) % CHUNK == 0 and q.is_cuda and q.is_contiguous()
            and tuple(q.shape) == (n, k // 2) and packed.scale.dim() == 2 and triton_available()
            and gluon_gemv_available() and device_capability(q.device) >= MMA_CAPABILITY)


def mma_zero(packed: PackedWeight) -> int | None:
    """The code zero gluon_mma_gemv takes for the weight's format: 8 (int4), 0 (int4-asym), None (nf4)."""
    return None if packed.scheme.format == "nf4" else _FORMAT_KINDS[packed.scheme.format][1]


def mma_order(packed: PackedWeight) -> tuple[int, ...]:
    """The nibble order mma_ptx.mma_layout re-lays the weight's codes in."""
    from modelpress.nn.mma_ptx import NF4_NIBBLE_OF, NIBBLE_OF

    return NF4_NIBBLE_OF if packed.scheme.format == "nf4" else NIBBLE_OF


def prepared_mma_linear(x: torch.Tensor, words: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                        interleave: bool = False, act: bool = False, laid: bool = False
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(x) -> x @ W^T (+ bias) for activations of x's shape and dtype, W 4-bit codes re-laid in `words` (packed's
    qdata holds them; its scale and offset are read as stored). One activation row, or up to
    mma_ptx.MAX_ROWS of a weight whose rows are not interleaved: the tensor-core GEMV (gluon_mma_gemv),
    launched directly as prepared_linear's launchers are, with PDL on Hopper. More rows: the weight decoded from
    `words` (mma_dequantize), then cuBLAS. interleave: W is a gated MLP's [gate | up], its rows re-laid in
    mma_ptx.interleave_rows' order; act (no bias): fn(x) -> silu(gate) * up, (..., N / 2). laid: the rows mode
    reads x's copy in fragment order, `x.mma_laid` (mma_ptx.fragment_order(x), as nn/triton_norm.py writes it)."""
    n, k = packed.shape
    if act and bias is not None:
        raise ValueError("the tensor-core GEMV's activation takes a [gate | up] weight without a bias")
    from modelpress.nn.mma_ptx import MAX_ROWS

    rows = x.numel() // k if x.shape[-1] == k else 0
    if not (rows == 1 or 1 < rows <= MAX_ROWS and not interleave) or not x.is_contiguous() \
            or x.data_ptr() % 16 or x.dtype not in _ACT_DTYPES:
        if act:
            return lambda x: _silu_mul(F.linear(x, mma_dequantize(words, packed, x.dtype, interleave)))
        return lambda x: F.linear(x, mma_dequantize(words, packed, x.dtype, interleave), bias)
    from modelpress.nn import gluon_mma_gemv

    pdl = pdl_launch(x.device)
    bias = None if bias is None else bias.to(x.dtype)
    x2 = x.reshape(rows, k)
    zero = mma_zero(packed)
    config = mma_plan(n, k, zero is None, _sm_count(x.device.index or 0)) or dict(MMA_CONFIG, split=1)
    if act or rows > 1:
        config["split"] = 1
    width = n // 2 if act else n
    laid = laid and rows > 1
    kernel, grid, args, constants = gluon_mma_gemv.launch(x2, words, packed.scale, packed.offset, n,
                                                          packed.scheme.group_length(k), zero, pdl=pdl,
                                                          interleave=interleave, act=act,
                                                          laid=x.mma_laid if laid else None, **config)
    y = args[5]
    compiled = kernel[grid](*args, **constants)
    try:
        launch = _direct_launch(compiled, kernel.arg_names, (*grid, 1, 1)[:3], args, constants, y,
                                (*x.shape[:-1], width), bias)
        fn = (lambda x: launch(x.mma_laid)) if laid else launch
    except AttributeError:  # a Triton whose launcher is laid out otherwise: its own launch path
        def fn(x):
            return gluon_mma_gemv.mma_gemv(x.reshape(rows, k), words, packed.scale, packed.offset, n,
                                           packed.scheme.group_length(k), zero, pdl=pdl, interleave=interleave,
                                           act=act, laid=x.mma_laid if laid else None,
                                           **config).view(*x.shape[:-1], width)
    if bias is None:
        return fn
    return lambda x: fn(x).add_(bias)


def _silu_mul(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up], as fusion's gated MLP computes it."""
    from modelpress.nn.triton_act import silu_mul

    y = silu_mul(h)
    if y is None:
        width = h.shape[-1] // 2
        y = F.silu(h[..., :width]) * h[..., width:]
    return y


def mma_dequantize(words: torch.Tensor, packed: PackedWeight, dtype: torch.dtype, interleave: bool = False
                   ) -> torch.Tensor:
    """The (N, K) weight of `packed` (int4, int4-asym or nf4) from its codes re-laid by mma_ptx.mma_layout
    (`words`; packed.qdata is not read), decoded in one launch; interleave: rows re-laid in
    mma_ptx.interleave_rows' order, written back in the stored order."""
    from modelpress.nn.triton_kernels import mma_dequantize_kernel

    n, k = packed.shape
    w = torch.empty((n, k), device=words.device, dtype=dtype)
    stride_sn, stride_sg = _scale_strides(packed.scale)
    affine = packed.offset is not None
    kind, zero = _FORMAT_KINDS[packed.scheme.format]
    table = _table(kind, w.device, torch.float32) if kind == 1 else packed.scale
    mma_dequantize_kernel[(words.shape[0], words.shape[1])](
        words, packed.scale, packed.offset if affine else packed.scale, table, w, n, k,
        packed.scheme.group_length(k), stride_sn, stride_sg, KIND=kind, ZERO=zero, AFFINE=affine,
        INTERLEAVE=interleave, num_warps=4)
    return w


def quantized_matmul(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                     config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) for any M, through the plan `choose_plan` picks (or `config`)."""
    k = packed.shape[1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    bias = None if bias is None else bias.to(x.dtype)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], packed.shape[0]))
    if config is None:
        config = plan_for(x2.shape[0], packed, x.device)
    if config.dequant:
        if packed.input_perm is not None:
            x2 = x2[:, packed.input_perm.long()]
        y = F.linear(x2, dequantize(packed, x.dtype), bias)
    else:
        y = fused_matmul(x2, packed, bias, config)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], packed.shape[0])


def triton_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Backend entry (see backends.py): None whenever the kernels cannot serve this call."""
    if not x.is_cuda or x.dtype not in _ACT_DTYPES or x.shape[-1] == 0 or not packed.qdata.is_cuda:
        return None
    if not supports(packed) or not triton_available():
        return None
    return quantized_matmul(x, packed, bias)


def prepared_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None
                    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """fn(x) -> triton_linear(x, packed, bias) for activations of x's shape and dtype on x's device (contiguous,
    16-byte aligned, as x is), with every host decision taken now; None where triton_linear would not serve x.

    Decode-sized calls (the fused kernels) launch the compiled kernel directly: the plan, grid, constants and
    every pointer but x's and y's are fixed here, so a call costs an output allocation and one launcher call
    (a few µs) instead of the backend chain and Triton's argument binding. The caller keeps `packed` and
    `bias` alive while it uses fn (fn holds raw pointers to them); `QuantLinear` does."""
    if not x.is_cuda or x.dtype not in _ACT_DTYPES or x.shape[-1] == 0 or not packed.qdata.is_cuda:
        return None
    if not supports(packed) or not triton_available():
        return None
    n, k = packed.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    config = plan_for(m, packed, x.device) if m else KernelConfig(dequant=True)
    if config.dequant or _interpreting() or not x2.is_contiguous() or x2.data_ptr() % 16:
        return functools.partial(quantized_matmul, packed=packed, bias=bias)
    bias = None if bias is None else bias.to(x.dtype)
    kernel, grid, args, constants, y = _kernel_call(x2, packed, bias, config, None, None)
    compiled = kernel[grid](*args, **constants)  # compiles on first use; launches once
    try:
        return _direct_launch(compiled, kernel.arg_names, grid, args, constants, y, (*x.shape[:-1], n), bias)
    except AttributeError:  # a Triton whose launcher is laid out otherwise: its own (slower) launch path
        return functools.partial(quantized_matmul, packed=packed, bias=bias)


def _direct_launch(compiled, arg_names: list[str], grid: tuple[int, int, int], args: tuple, constants: dict,
                   y: torch.Tensor, out_shape: tuple[int, ...], keep: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """A launcher of `compiled` (what Triton's JIT returned) taking only x: the argument list as Triton binds it
    (every parameter in order, constants included), tensors other than x and y replaced by their addresses."""
    y_slots = [i for i, arg in enumerate(args) if arg is y]  # y also stands in for unused split-K buffers
    template = [arg.data_ptr() if isinstance(arg, torch.Tensor) else arg for arg in args]
    template += [constants[name] for name in arg_names[len(args):]]
    if _launch_hooks_set():  # a profiler's launch hooks expect Triton's own launch path
        return functools.partial(_bound_call, compiled, grid, template, y_slots, out_shape, keep)
    stream = torch._C._cuda_getCurrentRawStream
    device, index, dtype = y.device, y.device.index, y.dtype
    gx, gy, gz = grid
    launch, function, head, meta = _launch_parts(compiled)

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(out_shape, dtype=dtype, device=device)
        values = template.copy()
        values[0] = x
        for slot in y_slots:
            values[slot] = out
        launch(gx, gy, gz, stream(index), function, *head, *meta, *values)
        return out

    fn.keep = keep  # type: ignore[attr-defined]  # the converted bias, if any, lives as long as fn
    return fn


def _launch_parts(compiled) -> tuple:
    """(launch, function, head, meta) of a compiled kernel: launch(gx, gy, gz, stream, function, *head, *meta,
    *every parameter's value) starts it as Triton's CudaLauncher would. AttributeError from a Triton laid out
    otherwise."""
    runner = compiled.run
    meta = (compiled.packed_metadata, None, None, None)
    if runner.global_scratch_size or runner.profile_scratch_size:  # Triton's launcher allocates the scratch
        return runner, compiled.function, (), meta
    # the compiled C launch function itself, as CudaLauncher.__call__ would call it
    return runner.launch, compiled.function, (runner.launch_cooperative_grid, runner.launch_pdl, None, None), meta


def direct_launcher(kernel, grid: tuple, args: tuple, constants: dict) -> Callable[..., None] | None:
    """Launch `kernel` once through Triton's JIT (compiling it on first use), then return launch(*values): the
    same compiled kernel on the same grid, `values` in place of `args` (tensors or ints, specialized as `args`
    were: same dtypes, 16-byte aligned pointers, the same integers' divisibility), without the JIT's per-call
    argument binding. None where a profiler hooks launches or this Triton's launcher is laid out otherwise."""
    compiled = kernel[grid](*args, **constants)
    if _launch_hooks_set():
        return None
    try:
        launch, function, head, meta = _launch_parts(compiled)
    except AttributeError:
        return None
    fixed = [constants[name] for name in kernel.arg_names[len(args):]]
    stream = torch._C._cuda_getCurrentRawStream
    gx, gy, gz = (*grid, 1, 1)[:3]
    index = next(a for a in args if isinstance(a, torch.Tensor)).device.index

    def run(*values) -> None:
        launch(gx, gy, gz, stream(index), function, *head, *meta, *values, *fixed)

    return run


def _bound_call(compiled, grid, template, y_slots, out_shape, keep, x):
    """The slow twin of _direct_launch's fn, through CompiledKernel's own launch (which runs launch hooks)."""
    out = x.new_empty(out_shape)
    values = template.copy()
    values[0] = x
    for slot in y_slots:
        values[slot] = out
    compiled[grid](*values)
    return out


def _launch_hooks_set() -> bool:
    """Whether a profiler hooks Triton's launches (Triton 3.6 keeps an empty HookChain when none does)."""
    from triton import knobs

    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def _register() -> None:
    from modelpress.nn.backends import backend_names, register_backend

    if "triton" not in backend_names():
        register_backend("triton", triton_linear)


_register()
