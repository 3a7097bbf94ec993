"""GGUF k-quants (Q2_K..Q6_K) written by modelpress: a searched grid, codes on it, and ggml's block bytes.

A k-quant stores a row in super-blocks of 256 weights. Each super-block holds an fp16 scale `d` (and, for
the asymmetric types, an fp16 `dmin`) and per sub-block a small integer scale `sc` (and min `m`):
- asymmetric (Q2_K, Q4_K, Q5_K): value = (d·sc)·u − dmin·m,  code u in 0..2**bits − 1
- symmetric  (Q3_K, Q6_K):       value = (d·sc)·(u − 2**(bits−1)),  signed sc
The effective float32 per-sub-block scale/offset are computed exactly as ggml's decoder does, so
`dequantize_kquant` matches llama.cpp (and gguf-py) bit for bit.

Three steps, usable apart so that a calibrated solver (GPTQ, AWQ) can work on a fixed k-quant grid:
    grid = kquant_grid(weight, "Q4_K", importance)   # search the header (kquant_search.py, kquant_header.py)
    codes = kquant_codes(weight, grid)                # or a solver's own codes on that grid
    data = pack_kquant(codes, grid)                   # ggml's block layout (kquant_layout.py)
`grid_from_scales` says whether per-group scales/offsets that modelpress already holds are exactly a k-quant
header, and `kquant_from_packed` does so for a whole PackedWeight: that is a lossless export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from modelpress.errors import ModelpressError
from modelpress.export.kquant_header import affine_header, symmetric_header
from modelpress.export.kquant_layout import pack_kquant
from modelpress.export.kquant_search import (
    AffineHeader,
    SymmetricHeader,
    affine_codes,
    fit_affine,
    fit_symmetric,
    symmetric_codes,
)
from modelpress.formats.packed import PackedWeight

SUPER_BLOCK = 256   # ggml's QK_K

__all__ = ["KQUANTS", "KQuantGrid", "KQuantSpec", "dequantize_kquant", "grid_from_scales", "kquant_codes",
           "kquant_from_packed", "kquant_grid", "kquant_spec", "pack_kquant", "quantize_kquant"]


@dataclass(frozen=True)
class KQuantSpec:
    name: str            # GGML type name
    bits: int            # bits per code
    sub_block: int       # weights per sub-block
    affine: bool         # value = scale·u + offset (else scale·(u − half))
    scale_range: tuple[int, int]   # stored integer sub-scale range (sub-mins, when affine, are 0..scale_range[1])
    block_bytes: int     # bytes per super-block of 256 weights

    @property
    def sub_blocks(self) -> int:
        return SUPER_BLOCK // self.sub_block

    @property
    def half(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def nmax(self) -> int:
        return 2**self.bits - 1

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / SUPER_BLOCK


KQUANTS: dict[str, KQuantSpec] = {spec.name: spec for spec in (
    KQuantSpec("Q2_K", 2, 16, True, (0, 15), 84),
    KQuantSpec("Q3_K", 3, 16, False, (-32, 31), 110),
    KQuantSpec("Q4_K", 4, 32, True, (0, 63), 144),
    KQuantSpec("Q5_K", 5, 32, True, (0, 63), 176),
    KQuantSpec("Q6_K", 6, 16, False, (-128, 127), 210),
)}


def kquant_spec(qtype) -> KQuantSpec:
    """The spec of a k-quant named as a string ("q4_k") or a gguf.GGMLQuantizationType."""
    name = str(getattr(qtype, "name", qtype)).upper()
    if name not in KQUANTS:
        raise ModelpressError(f"unknown k-quant type {qtype!r}; choose from {', '.join(KQUANTS)}")
    return KQUANTS[name]


@dataclass(frozen=True)
class KQuantGrid:
    """The stored header of an (N, K) k-quant tensor, and the effective per-sub-block scale/offset."""

    qtype: str
    d: torch.Tensor                        # float16 (N, K/256)
    sub_scales: torch.Tensor               # int16 (N, K/sub_block)
    dmin: torch.Tensor | None = None       # float16 (N, K/256), asymmetric types only
    sub_mins: torch.Tensor | None = None   # int16 (N, K/sub_block), asymmetric types only

    def __post_init__(self) -> None:
        spec = kquant_spec(self.qtype)
        object.__setattr__(self, "qtype", spec.name)
        rows, supers = self.d.shape
        wanted = (rows, supers * spec.sub_blocks)
        fields = [("sub_scales", self.sub_scales)] + [("dmin", self.dmin), ("sub_mins", self.sub_mins)] * spec.affine
        for name, value in fields:
            expected = (rows, supers) if name == "dmin" else wanted
            if value is None or tuple(value.shape) != expected:
                raise ModelpressError(f"{spec.name} grid: {name} must have shape {expected}, got "
                                      f"{None if value is None else tuple(value.shape)}")
        if not spec.affine and (self.dmin is not None or self.sub_mins is not None):
            raise ModelpressError(f"{spec.name} is symmetric: its grid has no dmin or sub_mins")

    @property
    def spec(self) -> KQuantSpec:
        return KQUANTS[self.qtype]

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * SUPER_BLOCK

    @property
    def scale(self) -> torch.Tensor:
        """float32 (N, K/sub_block): d·sc in float32, as ggml's decoder rounds it."""
        per = self.spec.sub_blocks
        return self.d.float().repeat_interleave(per, dim=1) * self.sub_scales.float()

    @property
    def offset(self) -> torch.Tensor | None:
        """float32 (N, K/sub_block): −dmin·m (the value of code 0); None for symmetric types."""
        if self.dmin is None or self.sub_mins is None:
            return None
        per = self.spec.sub_blocks
        return -(self.dmin.float().repeat_interleave(per, dim=1) * self.sub_mins.float())


# ---------------------------------------------------------------- the three steps

def kquant_grid(weight: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> KQuantGrid:
    """Search a k-quant header for `weight` (N, K), K a multiple of 256, minimising Σ importance_k·(w − ŵ)².

    `importance` (K,) is a per-input-column weight such as E[x²] from calibration (llama.cpp's imatrix);
    without it every weight counts the same, i.e. the plain squared error is minimised."""
    spec = kquant_spec(qtype)
    x = _checked_weight(weight, spec)
    n, k = x.shape
    blocks = x.reshape(n, k // SUPER_BLOCK, spec.sub_blocks, spec.sub_block)   # (N, SB, P, S)
    w = _checked_importance(importance, k, x.device)
    if w is not None:
        w = w.reshape(1, k // SUPER_BLOCK, spec.sub_blocks, spec.sub_block)
    lo, hi = spec.scale_range
    if spec.affine:
        scale, offset = fit_affine(blocks, w, spec.nmax)
        header: AffineHeader | SymmetricHeader = affine_header(blocks, w, scale, offset, spec.nmax, hi)
    else:
        header = symmetric_header(blocks, w, fit_symmetric(blocks, w, spec.half), spec.half, lo, hi)
    grid = _header_grid(spec, header, n)
    for name in ("d", "dmin"):
        value = getattr(grid, name)
        if value is not None and not torch.isfinite(value).all():
            raise ModelpressError(f"{spec.name}: the weight's range (max |w| = {x.abs().max().item():.3g}) "
                                  f"overflows the fp16 super-block {name}; k-quants cannot hold it")
    return grid


def _header_grid(spec: KQuantSpec, header: AffineHeader | SymmetricHeader, rows: int) -> KQuantGrid:
    """The searched header as a grid; a zero fp16 scale is stored as +0 (what factoring it back gives)."""
    def plus_zero(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.zeros_like(d), d)

    if isinstance(header, AffineHeader):
        return KQuantGrid(spec.name, plus_zero(header.d), header.sc.reshape(rows, -1), plus_zero(header.dmin),
                          header.m.reshape(rows, -1))
    return KQuantGrid(spec.name, plus_zero(header.d), header.sc.reshape(rows, -1))


def kquant_codes(weight: torch.Tensor, grid: KQuantGrid) -> torch.Tensor:
    """(N, K) uint8 codes: every weight rounded to the nearest level of its sub-block on `grid`."""
    spec = grid.spec
    x = _checked_weight(weight, spec)
    if tuple(x.shape) != grid.shape:
        raise ModelpressError(f"weight shape {tuple(x.shape)} does not match the {spec.name} grid's {grid.shape}")
    n, k = x.shape
    blocks = x.reshape(n, k // spec.sub_block, spec.sub_block)
    if spec.affine:
        codes = affine_codes(blocks, grid.scale, grid.offset, spec.nmax)  # type: ignore[arg-type]
    else:
        codes = symmetric_codes(blocks, grid.scale, spec.half) + spec.half
    return codes.reshape(n, k).to(torch.uint8)


def dequantize_kquant(grid: KQuantGrid, codes: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 weight, bit for bit what ggml decodes from the packed blocks."""
    spec = grid.spec
    n, k = grid.shape
    values = codes.reshape(n, k // spec.sub_block, spec.sub_block).float()
    if spec.affine:
        weight = grid.scale.unsqueeze(-1) * values + grid.offset.unsqueeze(-1)  # type: ignore[union-attr]
    else:
        weight = grid.scale.unsqueeze(-1) * (values - spec.half)
    return weight.reshape(n, k)


def quantize_kquant(weight: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> np.ndarray:
    """Search, round and pack: uint8 (N, K/256 · block_bytes), the tensor's bytes in a GGUF file."""
    grid = kquant_grid(weight, qtype, importance)
    return pack_kquant(kquant_codes(weight, grid), grid)


# ---------------------------------------------------------------- exact factoring of given scales

def grid_from_scales(scale: torch.Tensor, offset: torch.Tensor | None, qtype) -> KQuantGrid | None:
    """The k-quant header whose effective scale (and offset) equal the given float32 per-group ones exactly,
    or None when they do not factor into fp16 × stored integers.

    scale, offset: (N, K/sub_block) per group of `sub_block` weights along K (offset = the value of code 0,
    the asymmetric formats' convention; None for symmetric types, whose codes mean u − 2**(bits−1))."""
    spec = kquant_spec(qtype)
    if spec.affine != (offset is not None):
        raise ModelpressError(f"{spec.name} is {'asymmetric' if spec.affine else 'symmetric'}: "
                              f"{'pass' if spec.affine else 'do not pass'} a per-group offset")
    n, groups = scale.shape
    if groups % spec.sub_blocks:
        raise ModelpressError(f"{spec.name} needs {spec.sub_blocks} groups of {spec.sub_block} per 256 weights; "
                              f"got {groups} groups per row")
    lo, hi = spec.scale_range
    factored = _factor(scale.float().reshape(n, -1, spec.sub_blocks), lo, hi)
    if factored is None:
        return None
    if offset is None:
        return KQuantGrid(spec.name, factored[0], factored[1].reshape(n, -1))
    mins = _factor(-offset.float().reshape(n, -1, spec.sub_blocks), 0, hi)
    if mins is None:
        return None
    return KQuantGrid(spec.name, factored[0], factored[1].reshape(n, -1), mins[0], mins[1].reshape(n, -1))


# modelpress schemes whose codes and groups are exactly a k-quant's (format, group size) -> GGML type
SCHEME_KQUANTS = {("int2-asym", 16): "Q2_K", ("int3", 16): "Q3_K", ("int4-asym", 32): "Q4_K",
                  ("int5-asym", 32): "Q5_K", ("int6", 16): "Q6_K"}


def kquant_from_packed(packed: PackedWeight) -> tuple[KQuantGrid, torch.Tensor] | None:
    """The k-quant grid and (N, K) codes that decode bit for bit to `packed`, or None when its scheme is not
    a k-quant's (format and group size in SCHEME_KQUANTS, no input permutation, K a multiple of 256) or its
    scales/offsets do not factor into a k-quant header."""
    scheme = packed.scheme
    qtype = SCHEME_KQUANTS.get((scheme.format, scheme.group_size if scheme.granularity == "group" else None))
    if qtype is None or packed.input_perm is not None or packed.shape[1] % SUPER_BLOCK:
        return None
    offset = None if packed.offset is None else packed.offset.float()
    grid = grid_from_scales(packed.group_scales(), offset, qtype)
    return None if grid is None else (grid, packed.codes())


def _factor(values: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp16 d (N, SB) and integers (N, SB, P) in lo..hi with float32(d)·ints == values, or None.

    The largest-magnitude value of a super-block is d·t for some integer t; every t is tried, longest first."""
    peak = values.gather(-1, values.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = torch.zeros_like(peak, dtype=torch.float16)
    ints = torch.zeros_like(values, dtype=torch.int16)
    done = peak == 0    # an all-zero super-block is d = 0, ints = 0
    for t in sorted({t for t in range(lo, hi + 1) if t}, key=lambda t: (-abs(t), t)):
        if done.all():
            break
        d_t = (peak / t).to(torch.float16)
        step = d_t.float().unsqueeze(-1)
        live = (step != 0) & torch.isfinite(step)
        ratio = torch.round(values / torch.where(live, step, torch.ones_like(step)))
        exact = live & (ratio >= lo) & (ratio <= hi) & (step * ratio == values)
        fits = exact.all(-1) & ~done
        d = torch.where(fits, d_t, d)
        ints = torch.where(fits.unsqueeze(-1), ratio.to(torch.int16), ints)
        done = done | fits
    return (d, ints) if bool(done.all()) else None


# ---------------------------------------------------------------- input checks

def _checked_weight(weight: torch.Tensor, spec: KQuantSpec) -> torch.Tensor:
    if weight.dim() != 2 or weight.shape[1] % SUPER_BLOCK or weight.shape[1] == 0:
        raise ModelpressError(f"{spec.name} needs a 2-D weight whose in_features is a multiple of {SUPER_BLOCK}; "
                              f"got shape {tuple(weight.shape)}")
    x = weight.detach().float()
    if not torch.isfinite(x).all():
        raise ModelpressError(f"{spec.name}: the weight holds {int((~torch.isfinite(x)).sum())} NaN/Inf values")
    return x


def _checked_importance(importance: torch.Tensor | None, k: int, device: torch.device) -> torch.Tensor | None:
    """(K,) weights of the squared error, or None when every column counts the same."""
    if importance is None:
        return None
    imp = importance.detach().float().to(device).reshape(-1)
    if imp.numel() != k or not torch.isfinite(imp).all() or (imp < 0).any():
        raise ModelpressError(f"importance must be {k} finite non-negative values (one per input column); "
                              f"got shape {tuple(importance.shape)}")
    if not (imp > 0).any():
        return None
    # a small floor keeps every sub-block's least-squares fit well posed where calibration saw no signal
    return imp + 1e-6 * imp.mean()
