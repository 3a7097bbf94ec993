"""Quantizing key/value states, the pure math: (B, H, T, D) float tensors in, stored codes and scales out.

Three ways of grouping values under one scale, all on modelpress number formats:
- per token: one absmax scale per (batch, head, token) over the D channels of the head vector.
  Used with int8 and fp8-e4m3; every token is quantized on its own, so states can be appended one at a
  time and cropped exactly.
- per channel (KIVI keys, Liu et al. 2024): one scale and offset per (batch, head, channel) over a group of
  G consecutive tokens. Keys have outlier channels, so grouping along tokens keeps the error of the normal
  channels small; the catch is that only whole groups of G tokens can be quantized.
- per token in channel groups (KIVI values): one scale and offset per (batch, head, token) over groups of
  `group` channels.
Sub-byte codes are bit-packed along the channel axis with modelpress's packing layout (packing.py).
Scales and offsets are stored as float16 and codes are computed from the stored (rounded) values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from modelpress.formats.base import QFormat
from modelpress.formats.packing import pack_codes, packed_row_bytes, unpack_codes

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantizedStates:
    """Stored form of (B, H, T, D) states.

    qdata   uint8 (B, H, T, row_bytes)  codes, packed along D when bits < 8
    scale   float16 (B, H, T, Gd)       per-token layouts: Gd channel groups per token (1 for per-token absmax)
            float16 (B, H, T // G, D)   per-channel layout: one scale per channel and group of G tokens
    offset  float16, shaped like scale  affine formats only (value of code 0)
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    head_dim: int

    @property
    def length(self) -> int:
        return self.qdata.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qdata, self.scale, self.offset) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn) -> QuantizedStates:
        """Apply `fn` to every stored tensor (batch reordering, device moves)."""
        changed = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changed)


def concat(parts: list[QuantizedStates]) -> QuantizedStates:
    """Join stored states along tokens; all parts must share one layout."""
    first = parts[0]
    if len(parts) == 1:
        return first
    offset = None if first.offset is None else torch.cat([p.offset for p in parts], dim=2)  # type: ignore[misc]
    return QuantizedStates(qdata=torch.cat([p.qdata for p in parts], dim=2),
                           scale=torch.cat([p.scale for p in parts], dim=2), offset=offset, head_dim=first.head_dim)


def _store_scales(scale: torch.Tensor, offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    finfo = torch.finfo(SCALE_DTYPE)
    stored = scale.float().clamp(finfo.tiny, finfo.max).to(SCALE_DTYPE)
    if offset is not None:
        offset = offset.float().clamp(-finfo.max, finfo.max).to(SCALE_DTYPE)
    return stored, offset


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(B, H, T, D) uint8 codes -> (B, H, T, row_bytes), packed along D."""
    b, h, t, d = codes.shape
    return pack_codes(codes.reshape(b * h * t, d), bits).view(b, h, t, packed_row_bytes(d, bits))


def _unpack(qdata: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    b, h, t, row = qdata.shape
    return unpack_codes(qdata.reshape(b * h * t, row), bits, head_dim).view(b, h, t, head_dim)


def _channel_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, T, D // group, group)."""
    b, h, t, d = x.shape
    if d % group:
        raise ValueError(f"head dim {d} is not a multiple of the channel group {group}")
    return x.reshape(b, h, t, d // group, group)


def quantize_per_token(x: torch.Tensor, fmt: QFormat, group: int | None = None) -> QuantizedStates:
    """Scales (and offsets for affine formats) per (B, H, T) and group of `group` channels (default: all D)."""
    d = x.shape[-1]
    grouped = _channel_groups(x.float(), group or d)                  # (B, H, T, Gd, g)
    scale, offset = _store_scales(*fmt.scale_for(grouped))            # (B, H, T, Gd)
    shifted = grouped if offset is None else grouped - offset.float().unsqueeze(-1)
    codes = fmt.encode(shifted / scale.float().unsqueeze(-1)).reshape(x.shape)
    return QuantizedStates(qdata=_pack(codes, fmt.bits), scale=scale, offset=offset, head_dim=d)


def dequantize_per_token(q: QuantizedStates, fmt: QFormat, dtype: torch.dtype) -> torch.Tensor:
    values = fmt.decode(_unpack(q.qdata, fmt.bits, q.head_dim))      # (B, H, T, D)
    gd = q.scale.shape[-1]
    grouped = _channel_groups(values, q.head_dim // gd) * q.scale.float().unsqueeze(-1)
    if q.offset is not None:
        grouped = grouped + q.offset.float().unsqueeze(-1)
    return grouped.reshape(values.shape).to(dtype)


def quantize_per_channel(x: torch.Tensor, fmt: QFormat, group: int) -> QuantizedStates:
    """Scales per (B, H, channel) over groups of `group` tokens; T must be a multiple of `group`."""
    b, h, t, d = x.shape
    if t % group:
        raise ValueError(f"{t} tokens do not split into groups of {group}")
    grouped = x.float().reshape(b, h, t // group, group, d).transpose(-1, -2)  # (B, H, T/G, D, G)
    scale, offset = _store_scales(*fmt.scale_for(grouped))                      # (B, H, T/G, D)
    shifted = grouped if offset is None else grouped - offset.float().unsqueeze(-1)
    codes = fmt.encode(shifted / scale.float().unsqueeze(-1)).transpose(-1, -2).reshape(b, h, t, d)
    return QuantizedStates(qdata=_pack(codes, fmt.bits), scale=scale, offset=offset, head_dim=d)


def dequantize_per_channel(q: QuantizedStates, fmt: QFormat, dtype: torch.dtype) -> torch.Tensor:
    b, h, t, _ = q.qdata.shape
    d = q.head_dim
    groups = q.scale.shape[2]
    values = fmt.decode(_unpack(q.qdata, fmt.bits, d)).view(b, h, groups, t // max(groups, 1), d)
    values = values * q.scale.float().unsqueeze(3)
    if q.offset is not None:
        values = values + q.offset.float().unsqueeze(3)
    return values.reshape(b, h, t, d).to(dtype)


def slice_tokens(q: QuantizedStates, end: int, tokens_per_scale_row: int = 1) -> QuantizedStates:
    """The first `end` tokens; for per-channel layouts `end` must be a multiple of the token group."""
    if end % tokens_per_scale_row:
        raise ValueError(f"cannot cut grouped states at token {end} (groups of {tokens_per_scale_row})")
    rows = end // tokens_per_scale_row
    offset = None if q.offset is None else q.offset[:, :, :rows]
    return QuantizedStates(qdata=q.qdata[:, :, :end], scale=q.scale[:, :, :rows], offset=offset, head_dim=q.head_dim)
