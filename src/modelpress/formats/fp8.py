"""FP8 formats E4M3 (the `fn` variant: no infinities, max 448) and E5M2 (max 57344).

Codes are the formats' own bit patterns, so a kernel can reinterpret the bytes as float8 directly.
Rounding is PyTorch's float8 cast (round to nearest even) after clamping to the finite range, so NaN and
infinity codes are never produced.

Scales map a group's absmax onto 448 for both formats (E4M3's largest value). For E5M2 this is not its
largest value (57344), and deliberately so: absmax / 57344 is ~1e-6 for ordinary weights, which lies in
fp16's subnormal range where a stored scale keeps only a few significant bits. At 448 the scale stays a
normal fp16 number, and E5M2 still has 22 binades of normal numbers below 448, far more than weights use.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

from modelpress.formats.base import QFormat, absmax_scale, register_format


@dataclass(frozen=True)
class Float8Format(QFormat):
    dtype_name: str = "float8_e4m3fn"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.dtype).max)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        clamped = x.float().clamp(-self.max_value, self.max_value)
        return clamped.to(self.dtype).view(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.is_cpu:   # the CPU converts float8 in software: a 256-entry table of the same values is 5x faster
            table = _cpu_table(self.dtype_name)
            return table.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
        return codes.contiguous().view(self.dtype).to(torch.float32)

    def scale_for(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return absmax_scale(groups, SCALE_TARGET), None


SCALE_TARGET = 448.0


@functools.cache
def _cpu_table(dtype_name: str) -> torch.Tensor:
    """float32 value of every code of a float8 dtype, converted by PyTorch itself (NaNs included)."""
    return torch.arange(256, dtype=torch.uint8).view(getattr(torch, dtype_name)).to(torch.float32)


register_format(Float8Format(name="fp8-e4m3", bits=8, dtype_name="float8_e4m3fn"))
register_format(Float8Format(name="fp8-e5m2", bits=8, dtype_name="float8_e5m2"))
