"""Ternary weights {-1, 0, +1} with an absmean scale (BitNet b1.58, Ma et al. 2024).

w ≈ scale · q with q = clamp(round(w / scale), -1, 1) and scale = mean |w| over the group (per tensor in
the paper; any granularity here). Codes 0, 1, 2 stand for -1, 0, +1 and are stored at 2 bits each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.formats.base import QFormat, register_format


@dataclass(frozen=True)
class TernaryFormat(QFormat):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(x), -1, 1) + 1).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        # code 3 is never produced; it decodes to 0 rather than to garbage
        return torch.where(codes < 3, codes.to(torch.float32) - 1, torch.zeros((), device=codes.device))

    def scale_for(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mean_abs = groups.abs().mean(dim=-1)
        return torch.where(mean_abs > 0, mean_abs, torch.ones_like(mean_abs)), None


register_format(TernaryFormat(name="ternary", bits=2))
