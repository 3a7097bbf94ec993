"""The CUDA matmul backend: QuantLinear on a CUDA device runs the Triton kernels of triton_kernels.py.

`triton_linear(x, packed, bias)` returns None (so the next backend is tried) unless x is a float16 or
bfloat16 CUDA tensor, Triton imports, and the weight's scheme is one the kernels read: int4 and int8
(symmetric or asymmetric), nf4, fp8-e4m3 and fp8-e5m2, with group sizes whose largest power-of-two
divisor is at least 32 for 4-bit formats and 16 for 8-bit ones (or per-channel / per-tensor scales),
without double quantization. Nothing is converted or cached per layer: the kernels read the stored qdata,
scale and offset tensors directly.

Up to M = 64 (decode, small batches) one fused kernel streams the weight once; from M = 65 up (prefill) a
dequantize kernel writes the weight in the activation dtype and cuBLAS multiplies (`choose_plan`). For the
4-bit integer formats at the smallest M (decode) a CUDA-core GEMV kernel (gemv_int4_kernel) replaces the
tensor-core one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelpress.formats.packed import PackedWeight
from modelpress.formats.scheme import WeightScheme

_FORMAT_KINDS = {  # format name -> (kernel kind, code zero)
    "int4": (0, 8), "int4-asym": (0, 0), "nf4": (1, 0),
    "int8": (2, 128), "int8-asym": (2, 0), "fp8-e4m3": (3, 0), "fp8-e5m2": (4, 0),
}
_ACT_DTYPES = (torch.float16, torch.bfloat16)
DEQUANT_MIN_M = 65  # from here up, dequantize-then-cuBLAS beats the fused kernel (bench/kernel_sweep.py, H100)
GEMV_MAX_M = 1  # up to here the GEMV kernel serves int4 / int4-asym (bench/kernel_sweep.py --gemv, H100: at
# M = 4 it was 1.3-1.8x slower than the tensor-core kernel, which costs the same at any M up to 16)
GEMV_KINDS = (0,)  # kernel kinds the GEMV kernel decodes (int4, symmetric or asymmetric)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch options of one fused launch (BKG: columns per group sub-tile, SUB sub-tiles
    per loop step, SPLIT ways of splitting K; dequant=True means dequantize then cuBLAS instead; gemv=True
    means the CUDA-core GEMV kernel, 4-bit integer formats only, which uses BM, BN, BKG, SPLIT, num_warps)."""

    BM: int = 16
    BN: int = 64
    BKG: int = 128
    SUB: int = 1
    SPLIT: int = 1
    num_warps: int = 2
    num_stages: int = 3
    dequant: bool = False
    gemv: bool = False


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


# GEMV tiles: BN rows per program and warps; K is split (powers of two) into the most splits that keep the
# grid within GEMV_PROGRAMS_PER_SM programs per multiprocessor and at least GEMV_MIN_STEPS loop steps per
# split (bench/kernel_sweep.py --gemv on an H100, M = 1: BN 64 with 4 warps was best or within 3% of best
# on every Llama-2/3 shape, at the split this rule picks: 8 for 4096x4096 and 4096x11008, 4 for 11008x4096
# and 14336x4096, 2 for 28672x8192).
GEMV_BN = 64
GEMV_WARPS = 4
GEMV_PROGRAMS_PER_SM = 7.0
GEMV_MIN_STEPS = 2


def gemv_plan(m: int, n: int, k: int, bkg: int, sms: int = 132, bn: int = GEMV_BN, warps: int = GEMV_WARPS,
              programs_per_sm: float = GEMV_PROGRAMS_PER_SM, min_steps: int = GEMV_MIN_STEPS) -> KernelConfig:
    """GEMV tiles for small M: BM = M rounded up to a power of two, BN rows per program, BKG columns (at most
    128) per step, K split until the grid fills the machine."""
    step = min(bkg, 128)
    bm = _pow2_at_least(m)
    blocks = _cdiv(m, bm) * _cdiv(n, bn)
    split = 1
    while blocks * split * 2 <= programs_per_sm * sms and k // (step * split * 2) >= min_steps:
        split *= 2
    return KernelConfig(BM=bm, BN=bn, BKG=step, SPLIT=split, num_warps=warps, num_stages=1, gemv=True)


@functools.lru_cache(maxsize=4096)
def choose_plan(m: int, n: int, k: int, bkg: int, sms: int = 132, gemv_ok: bool = False) -> KernelConfig:
    """Tiles by size of M. Up to GEMV_MAX_M, for formats the GEMV kernel decodes (gemv_ok), the CUDA-core
    GEMV (gemv_plan). Otherwise up to M = 64 the tensor-core kernel streams the weight once in (BM x 64)
    tiles, K split until there are about eight programs per multiprocessor (each keeps only two tiles of
    memory in flight) while every split keeps at least six tiles to stream. Prefill dequantizes, then
    cuBLAS. Tuned on an H100 with bench/kernel_sweep.py (--gemv for the GEMV)."""
    if m >= DEQUANT_MIN_M:
        return KernelConfig(dequant=True)
    if gemv_ok and m <= GEMV_MAX_M:
        return gemv_plan(m, n, k, bkg, sms)
    step = min(bkg, 128)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    blocks = _cdiv(m, bm) * _cdiv(n, 64)
    split = 1
    while blocks * split < 8 * sms and k // (step * split * 2) >= 6:
        split *= 2
    return KernelConfig(BM=bm, BN=64, BKG=step, SPLIT=split, num_warps=2 if m <= 16 else 4, num_stages=3)


def plan_for(m: int, packed: PackedWeight, device: torch.device) -> KernelConfig:
    n, k = packed.shape
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 132
    return choose_plan(m, n, k, group_tile(packed) or 16, sms, gemv_supported(packed))


def gemv_supported(packed: PackedWeight) -> bool:
    """Whether the GEMV kernel reads this weight: a 4-bit integer format whose qdata views as int32 rows."""
    kind = _FORMAT_KINDS.get(packed.scheme.format, (None,))[0]
    q = packed.qdata
    return (kind in GEMV_KINDS and q.dim() == 2 and q.stride(1) == 1 and q.stride(0) % 4 == 0
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


def _split_locks(device: torch.device, tiles: int, cache: dict = {}) -> torch.Tensor:  # noqa: B006
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
    kind, zero = _FORMAT_KINDS[scheme.format]
    bkg = min(config.BKG, _group_tile(scheme, shape, scale_shape) or 0)
    if bkg < (32 if kind <= 1 else 16):
        raise ValueError(f"{scheme.spec}: no tile of {config.BKG} columns fits its groups")
    step = bkg * config.SUB
    k_per_split = _cdiv(_cdiv(k, config.SPLIT), step) * step
    split = _cdiv(k, k_per_split)
    constants = dict(KIND=kind, ZERO=zero, AFFINE=scheme.qformat.affine, HAS_PERM=has_perm, HAS_BIAS=has_bias,
                     SPLIT_K=split > 1, EVEN_K=k % step == 0, BM=config.BM, BN=config.BN, BKG=bkg, SUB=config.SUB,
                     num_warps=config.num_warps, num_stages=config.num_stages)
    grid = (_cdiv(m, config.BM), _cdiv(n, config.BN), split)
    return _Launch(grid, k_per_split, scheme.group_length(k), constants)


@functools.lru_cache(maxsize=4096)
def _gemv_launch(scheme: WeightScheme, shape: tuple[int, int], scale_shape: tuple[int, ...], m: int,
                 has_perm: bool, has_bias: bool, config: KernelConfig) -> _Launch:
    n, k = shape
    kind, zero = _FORMAT_KINDS[scheme.format]
    if kind not in GEMV_KINDS:
        raise ValueError(f"{scheme.spec}: the GEMV kernel reads int4 and int4-asym only")
    bkg = min(config.BKG, 128, _group_tile(scheme, shape, scale_shape) or 0)
    if bkg < 8:
        raise ValueError(f"{scheme.spec}: no tile of {config.BKG} columns fits its groups")
    k_per_split = _cdiv(_cdiv(k, config.SPLIT), bkg) * bkg
    split = _cdiv(k, k_per_split)
    constants = {"ZERO": zero, "AFFINE": scheme.qformat.affine, "HAS_PERM": has_perm, "HAS_BIAS": has_bias,
                 "SPLIT_K": split > 1, "EVEN_K": k % bkg == 0, "BM": config.BM, "BN": config.BN, "BKG": bkg,
                 "num_warps": config.num_warps, "num_stages": 1}
    grid = (_cdiv(m, config.BM), _cdiv(n, config.BN), split)
    return _Launch(grid, k_per_split, scheme.group_length(k), constants)


_EXPONENT_BITS = 0x4B000000  # float32 bits of 2**23, a run-time argument of gemv_int4_kernel


def _outputs(x2: torch.Tensor, n: int, plan: _Launch, out: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output y (M, N), and for split-K launches the float32 partial sums (split, M, N) and the tile locks
    (without split-K the kernel never touches them: y stands in)."""
    m = x2.shape[0]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype) if out is None else out
    split = plan.grid[2]
    if split == 1:
        return y, y, y
    workspace = torch.empty((split, m, n), device=x2.device, dtype=torch.float32)
    return y, workspace, _split_locks(x2.device, plan.grid[0] * plan.grid[1])


def gemv_matmul(x2: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, config: KernelConfig,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x2 (M, K) @ W^T (+ bias) through the GEMV kernel (config.gemv; int4 formats)."""
    from modelpress.nn.triton_kernels import gemv_int4_kernel

    m, k = x2.shape
    n = packed.shape[0]
    scale = packed.scale
    plan = _gemv_launch(packed.scheme, packed.shape, tuple(scale.shape), m, packed.input_perm is not None,
                        bias is not None, config)
    y, workspace, locks = _outputs(x2, n, plan, out)
    words = packed.qdata.view(torch.int32)
    stride_sn, stride_sg = _scale_strides(scale)
    gemv_int4_kernel[plan.grid](
        x2, words, scale, packed.offset if packed.offset is not None else scale,
        packed.input_perm if packed.input_perm is not None else scale,
        bias if bias is not None else scale, y, workspace, locks,
        m, n, k, plan.group_size, plan.k_per_split, _EXPONENT_BITS,
        x2.stride(0), words.stride(0), stride_sn, stride_sg, y.stride(0),
        **plan.constants,
    )
    return y


def fused_matmul(x2: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, config: KernelConfig,
                 use_asm: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x2 (M, K) @ W^T (+ bias) in one launch. `out`, if given, is an (M, N) tensor of x's dtype
    with unit column stride that receives y. A gemv config goes to gemv_matmul (use_asm does not apply)."""
    from modelpress.nn.triton_kernels import quant_matmul_kernel

    if config.gemv:
        return gemv_matmul(x2, packed, bias, config, out=out)

    m, k = x2.shape
    n = packed.shape[0]
    scale = packed.scale
    plan = _launch(packed.scheme, packed.shape, tuple(scale.shape), m, packed.input_perm is not None,
                   bias is not None, config)
    y, workspace, locks = _outputs(x2, n, plan, out)
    kind = plan.constants["KIND"]
    stride_sn, stride_sg = _scale_strides(scale)
    quant_matmul_kernel[plan.grid](
        x2, packed.qdata, scale, packed.offset if packed.offset is not None else scale,
        packed.input_perm if packed.input_perm is not None else scale,
        _table(kind, x2.device, x2.dtype) if kind == 1 else scale,
        bias if bias is not None else scale, y, workspace, locks,
        m, n, k, plan.group_size, plan.k_per_split,
        x2.stride(0), packed.qdata.stride(0), stride_sn, stride_sg, y.stride(0),
        USE_ASM=(not _interpreting()) if use_asm is None else use_asm, **plan.constants,
    )
    return y


def dequantize(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in stored column order, decoded on the GPU in one launch."""
    from modelpress.nn.triton_kernels import dequantize_kernel

    n, k = packed.shape
    kind, zero = _FORMAT_KINDS[packed.scheme.format]
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


def _register() -> None:
    from modelpress.nn.backends import backend_names, register_backend

    if "triton" not in backend_names():
        register_backend("triton", triton_linear)


_register()
