"""What a number format is, and the registry that maps names to formats.

A format turns *scaled* values into integer codes and back. It never sees a whole weight matrix:
how values are grouped and where scales come from is `WeightScheme`'s business (scheme.py).

Two kinds of format exist:
- scale-only formats (symmetric ints, NF4, FP8, FP4, ternary): w ≈ scale · decode(code)
- affine formats (asymmetric ints): w ≈ scale · decode(code) + offset, offset being the value of code 0
  (llama.cpp's `m` in Q4_1; equal to −scale·zero_point in the zero-point convention)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.errors import ModelpressError


@dataclass(frozen=True)
class QFormat:
    """Base class. Subclasses fill in `encode`, `decode` and `scale_for`."""

    name: str
    bits: int
    affine: bool = False

    # scaled values -> integer codes in [0, 2**bits), dtype uint8
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    # codes -> the format's values as float32 (before multiplying by the scale)
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement decode")

    def scale_for(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Default scale (and offset for affine formats) for values shaped (..., group)."""
        raise NotImplementedError(f"{type(self).__name__} must implement scale_for")

    @property
    def levels(self) -> torch.Tensor:
        """Every representable value, indexed by code (float32, length 2**bits)."""
        return self.decode(torch.arange(2**self.bits, dtype=torch.int32).to(torch.uint8))


_REGISTRY: dict[str, QFormat] = {}


def register_format(fmt: QFormat) -> QFormat:
    if fmt.name in _REGISTRY:
        raise ValueError(f"number format {fmt.name!r} is already registered")
    if not 1 <= fmt.bits <= 8:
        raise ValueError(f"format {fmt.name!r}: bits must be in 1..8, got {fmt.bits}")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> QFormat:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelpressError(f"unknown number format {name!r}; known formats: {known}") from None


def format_names() -> list[str]:
    return sorted(_REGISTRY)


def absmax_scale(groups: torch.Tensor, max_level: float) -> torch.Tensor:
    """Scale that maps each group's largest magnitude onto `max_level`; 1.0 for all-zero groups."""
    amax = groups.abs().amax(dim=-1)
    return torch.where(amax > 0, amax / max_level, torch.ones_like(amax))


def nearest_level_encoder(levels: torch.Tensor):
    """Encode to the code whose level is nearest (ties to the lower level), for codebook formats.

    A table with both +0 and -0 (FP4) always encodes zero as +0: otherwise the zero code would depend on
    the side a value came from, and re-encoding a decoded -0 would change the code."""
    order = torch.argsort(levels, stable=True)
    sorted_levels = levels[order]
    midpoints = (sorted_levels[1:] + sorted_levels[:-1]) / 2
    code_at = order.clone()
    zero = sorted_levels == 0
    if zero.any():
        plus = zero & ~torch.signbit(sorted_levels)
        code_at[zero] = order[plus if plus.any() else zero][0]

    def encode(x: torch.Tensor) -> torch.Tensor:
        position = torch.bucketize(x.float().contiguous(), midpoints.to(x.device), right=False)
        return code_at.to(x.device)[position].to(torch.uint8)

    return encode
