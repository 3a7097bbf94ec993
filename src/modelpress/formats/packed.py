"""PackedWeight: what a quantized weight matrix really stores, and round-to-nearest quantization into it.

Tensors of one packed (out_features N, in_features K) matrix under a scheme with G groups per row:
- qdata        uint8 (N, row_bytes)   codes, densely bit-packed per row (packing.py gives the layout)
- scale        (N, G) scale dtype     per-group scale; (1, 1) for per-tensor.  With double quantization:
                                      int8 codes of (scale - scale_mean), see below
- offset       (N, G) scale dtype     affine formats only: the value of code 0 in each group
- scale_scale  float32 (ceil(N·G/B),) double quantization only: one scale per block of B group scales
- scale_mean   float32 (1,)           double quantization only: mean of the group scales
- input_perm   int32 (K,)             optional: stored column j holds input column input_perm[j]
                                      (GPTQ activation order); groups are contiguous in stored order,
                                      so a kernel gathers x[..., input_perm] once and streams the rest.
Dequantized weight (stored order): W[n, k] = scale[n, k // g] · decode(code[n, k]) + offset[n, k // g].
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch

from modelpress.errors import ModelpressError
from modelpress.formats.packing import pack_codes, unpack_codes
from modelpress.formats.scheme import WeightScheme


@dataclass
class PackedWeight:
    scheme: WeightScheme
    shape: tuple[int, int]
    qdata: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    scale_scale: torch.Tensor | None = None
    scale_mean: torch.Tensor | None = None
    input_perm: torch.Tensor | None = None

    TENSOR_NAMES = ("qdata", "scale", "offset", "scale_scale", "scale_mean", "input_perm")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSOR_NAMES if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes in stored column order."""
        return unpack_codes(self.qdata, self.scheme.bits, self.shape[1])

    def group_scales(self) -> torch.Tensor:
        """(N, G) or (1, 1) float32 scales, double quantization undone."""
        if self.scale_scale is None:
            return self.scale.float()
        return dequantize_scales(self.scale, self.scale_scale, self.scale_mean,  # type: ignore[arg-type]
                                 self.scheme.double_quant_block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) weight in the layer's own column order."""
        n, k = self.shape
        fmt = self.scheme.qformat
        g = self.scheme.group_length(k)
        values = fmt.decode(self.codes())
        weight = values * expand_groups(self.group_scales(), n, k, g)
        if self.offset is not None:
            weight = weight + expand_groups(self.offset.float(), n, k, g)
        if self.input_perm is not None:
            weight = weight[:, torch.argsort(self.input_perm.long())]
        return weight.to(dtype)

    def to(self, device: torch.device | str) -> PackedWeight:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, tensor in self.tensors().items():
            moved[name] = tensor.to(device)
        return PackedWeight(**moved)


def expand_groups(per_group: torch.Tensor, rows: int, cols: int, group: int) -> torch.Tensor:
    """(N, G) -> (N, K), each group value repeated over its columns; (1, 1) broadcasts."""
    if per_group.shape == (1, 1):
        return per_group.expand(rows, cols)
    return per_group.repeat_interleave(group, dim=1)[:, :cols]


def group_view_reduce(weight: torch.Tensor, scheme: WeightScheme, reduce) -> tuple:
    """Apply `reduce(groups (..., g)) -> tuple of (...,) tensors or None` to every group of a row,
    the ragged last group included. Returns a tuple of (N, G) tensors ((1, 1) per tensor) or None."""
    n, k = weight.shape
    if scheme.granularity == "tensor":
        return tuple(None if t is None else t.reshape(1, 1) for t in _as_tuple(reduce(weight.reshape(1, n * k))))
    g = scheme.group_length(k)
    full = k // g
    pieces = []
    if full:
        pieces.append(_as_tuple(reduce(weight[:, : full * g].reshape(n, full, g))))
    if full * g < k:
        tail = _as_tuple(reduce(weight[:, full * g :]))
        pieces.append(tuple(None if t is None else t.unsqueeze(1) for t in tail))
    return tuple(None if parts[0] is None else torch.cat(parts, dim=1) for parts in zip(*pieces))


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def quantize_scales(scale: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: int8 codes of (scale - mean) with one float32 absmax scale per block."""
    flat = scale.float().reshape(-1)
    mean = flat.mean().reshape(1)
    centered = flat - mean
    blocks = (flat.numel() + block - 1) // block
    padded = torch.zeros(blocks * block, device=flat.device)
    padded[: flat.numel()] = centered
    absmax = padded.view(blocks, block).abs().amax(dim=1)
    block_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    codes = torch.round(padded.view(blocks, block) / block_scale[:, None]).clamp(-127, 127)
    return codes.reshape(-1)[: flat.numel()].reshape(scale.shape).to(torch.int8), block_scale, mean


def dequantize_scales(codes: torch.Tensor, block_scale: torch.Tensor, mean: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of quantize_scales. A scale that rounding pushed to zero or below is clamped to a tiny
    positive value, identically when encoding and decoding."""
    flat = codes.float().reshape(-1)
    per_element = block_scale.float().repeat_interleave(block)[: flat.numel()]
    return (flat * per_element + mean.float()).clamp(min=MIN_DOUBLE_QUANT_SCALE).reshape(codes.shape)


MIN_DOUBLE_QUANT_SCALE = 1e-10


def check_finite(weight: torch.Tensor, what: str) -> None:
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ModelpressError(f"{what} has {bad} NaN/Inf values; refusing to quantize a broken weight")


def check_finite_tensors(named: Iterable[tuple[str, torch.Tensor]], action: str) -> None:
    """Refuse, before any work, tensors holding NaN/Inf (a broken model), naming the first one."""
    for name, tensor in named:
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelpressError(f"{name} has {bad} NaN/Inf values; refusing to {action} a broken model")


def quantize_weight(
    weight: torch.Tensor,
    scheme: WeightScheme,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    input_perm: torch.Tensor | None = None,
    name: str = "weight",
) -> PackedWeight:
    """Round-to-nearest quantization of an (N, K) weight under `scheme`.

    `scale`/`offset` ((N, G), or (1, 1) per tensor) override the format's default choice (AWQ clipping,
    GPTQ's own groups). With `input_perm`, columns are stored in that order and groups follow it.
    """
    if weight.dim() != 2:
        raise ModelpressError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_finite(weight, name)
    n, k = weight.shape
    w = weight.detach().float()
    if input_perm is not None:
        w = w[:, input_perm.long()]
    fmt = scheme.qformat
    if scale is None:
        scale, offset = group_view_reduce(w, scheme, fmt.scale_for)
    scale, offset, extra = _stored_scales(scale, offset, scheme, name)
    g = scheme.group_length(k)
    real_scale = extra.pop("_real_scale")
    shifted = w - expand_groups(offset.float(), n, k, g) if offset is not None else w
    codes = fmt.encode(shifted / expand_groups(real_scale, n, k, g))
    return PackedWeight(
        scheme=scheme,
        shape=(n, k),
        qdata=pack_codes(codes, scheme.bits),
        scale=scale,
        offset=offset,
        input_perm=None if input_perm is None else input_perm.to(torch.int32),
        **extra,
    )


def fake_quantize(weight: torch.Tensor, scheme: WeightScheme, name: str = "weight") -> torch.Tensor:
    """quantize_weight(weight, scheme).dequantize() without packing: the (N, K) float32 weight the packed layer
    would compute with, equal bit for bit (quantization-aware training runs its forward on this)."""
    check_finite(weight, name)
    n, k = weight.shape
    w = weight.detach().float()
    scale, offset = group_view_reduce(w, scheme, scheme.qformat.scale_for)
    _, offset, extra = _stored_scales(scale, offset, scheme, name)
    g = scheme.group_length(k)
    real_scale = expand_groups(extra["_real_scale"], n, k, g)
    full_offset = None if offset is None else expand_groups(offset.float(), n, k, g)
    return scheme.round_trip(w, real_scale, full_offset)


def _stored_scales(scale, offset, scheme: WeightScheme, name: str):
    """Round scales (and offsets) to their storage dtype; codes must be computed from the stored values."""
    scale, offset = scheme.stored_ranges(scale, offset, name)
    extra: dict = {}
    if scheme.double_quant:
        codes, block_scale, mean = quantize_scales(scale, scheme.double_quant_block)
        real = dequantize_scales(codes, block_scale, mean, scheme.double_quant_block)
        extra.update(scale_scale=block_scale, scale_mean=mean, _real_scale=real)
        return codes, offset, extra
    extra["_real_scale"] = scale.float()
    return scale, offset, extra


def empty_packed(scheme: WeightScheme, shape: tuple[int, int], has_perm: bool = False,
                 device: torch.device | str = "cpu") -> PackedWeight:
    """Correctly shaped, uninitialised tensors for `scheme` and `shape` (to be filled from a file)."""
    from modelpress.formats.packing import packed_row_bytes

    n, k = shape
    groups = (1, 1) if scheme.granularity == "tensor" else (n, scheme.num_groups(k))
    dtype = scheme.torch_scale_dtype
    extra: dict = {}
    if scheme.double_quant:
        count = groups[0] * groups[1]
        blocks = (count + scheme.double_quant_block - 1) // scheme.double_quant_block
        extra = dict(scale_scale=torch.empty(blocks, device=device), scale_mean=torch.empty(1, device=device))
        scale = torch.empty(groups, dtype=torch.int8, device=device)
    else:
        scale = torch.empty(groups, dtype=dtype, device=device)
    return PackedWeight(
        scheme=scheme,
        shape=shape,
        qdata=torch.empty(n, packed_row_bytes(k, scheme.bits), dtype=torch.uint8, device=device),
        scale=scale,
        offset=torch.empty(groups, dtype=dtype, device=device) if scheme.qformat.affine else None,
        input_perm=torch.empty(k, dtype=torch.int32, device=device) if has_perm else None,
        **extra,
    )


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """One packed matrix holding `parts`' rows one after another (sibling projections fused into one matmul).
    Exact: every stored tensor keeps one row (or one row of groups) per output row. Refused, naming why, where
    the rows do not stand alone: per-tensor scales, double-quantized scales (blocks run across rows and share
    one mean), different schemes, input widths or input permutations."""
    first = parts[0]
    scheme, k = first.scheme, first.shape[1]
    for part in parts[1:]:
        if part.scheme != scheme:
            raise ModelpressError(f"cannot stack rows of {scheme.spec} and {part.scheme.spec} weights")
        if part.shape[1] != k:
            raise ModelpressError(f"cannot stack rows of weights {k} and {part.shape[1]} inputs wide")
        if (part.input_perm is None) != (first.input_perm is None) or (
                part.input_perm is not None and not torch.equal(part.input_perm, first.input_perm)):
            raise ModelpressError("cannot stack rows of weights whose inputs are permuted differently")
    if scheme.double_quant:
        raise ModelpressError("cannot stack rows of double-quantized scales (their blocks and mean span the matrix)")
    if any(p.scale.shape[0] != p.shape[0] for p in parts):
        raise ModelpressError("cannot stack rows of weights with one scale per tensor")
    stacked = {name: torch.cat([getattr(p, name) for p in parts]) for name in ("qdata", "scale", "offset")
               if getattr(first, name) is not None}
    return PackedWeight(scheme=scheme, shape=(sum(p.shape[0] for p in parts), k), input_perm=first.input_perm,
                        **stacked)


def row_slices(packed: PackedWeight, rows: list[int]) -> list[PackedWeight]:
    """`packed` cut into consecutive blocks of `rows` output rows, as views (concat_rows' inverse)."""
    if sum(rows) != packed.shape[0]:
        raise ModelpressError(f"{sum(rows)} rows asked of a weight with {packed.shape[0]}")
    slices, start = [], 0
    for n in rows:
        cut = {name: getattr(packed, name)[start:start + n] for name in ("qdata", "scale", "offset")
               if getattr(packed, name) is not None}
        slices.append(PackedWeight(scheme=packed.scheme, shape=(n, packed.shape[1]), input_perm=packed.input_perm,
                                   **cut))
        start += n
    return slices
