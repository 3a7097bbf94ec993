"""Integer formats INT2..INT8 (2, 3, 4, 5, 6 and 8 bits), symmetric and asymmetric.

INT5 and INT6 exist for the GGUF k-quants (Q5_K, Q6_K; export/kquants.py), whose codes they describe.

Symmetric int-b: code u = q + 2**(b-1) for q in [-2**(b-1), 2**(b-1) - 1]; w ≈ scale · q, with the default
scale absmax / (2**(b-1) - 1) so that ±absmax are both exact (the extra negative level is there for
solvers such as GPTQ that may use it).
Asymmetric int-b: code u in [0, 2**b - 1]; w ≈ scale · u + offset, default offset = group min and
scale = (max - min) / (2**b - 1), so both ends of every group are exact. Zero need not be representable:
this is the convention of llama.cpp's Q4_1 and of HQQ, and it reproduces Q4_1 weights exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.formats.base import QFormat, absmax_scale, register_format


@dataclass(frozen=True)
class IntFormat(QFormat):
    @property
    def _half(self) -> int:
        return 2 ** (self.bits - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine:
            return torch.clamp(torch.round(x), 0, 2**self.bits - 1).to(torch.uint8)
        q = torch.clamp(torch.round(x), -self._half, self._half - 1)
        return (q + self._half).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        values = codes.to(torch.float32)
        return values if self.affine else values - self._half

    def scale_for(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.affine:
            return absmax_scale(groups, self._half - 1), None
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        span = high - low
        scale = torch.where(span > 0, span / (2**self.bits - 1), torch.ones_like(span))
        return scale, low


for _bits in (8, 6, 5, 4, 3, 2):
    register_format(IntFormat(name=f"int{_bits}", bits=_bits))
    register_format(IntFormat(name=f"int{_bits}-asym", bits=_bits, affine=True))
