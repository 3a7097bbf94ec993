"""Formats defined by a table of 16 values: NF4 and FP4 (E2M1).

NF4 (QLoRA, Dettmers et al. 2023): the quantiles of a standard normal, normalised to [-1, 1], with an
exact zero; built here from the normal quantile function rather than typed in.
FP4 E2M1 (OCP MX spec): sign, 2 exponent bits, 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
Codes follow the spec's bit layout (bit 3 = sign), so they are valid E2M1 bit patterns.
Both use absmax scaling: scale = absmax / largest level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modelpress.formats.base import QFormat, absmax_scale, nearest_level_encoder, register_format


def normal_float_levels(bits: int = 4, offset: float = 0.9677083) -> tuple[float, ...]:
    """2**bits values: 2**(bits-1) positive normal quantiles, 2**(bits-1) - 1 negative ones, and 0."""
    n = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, n + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, n, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = torch.sort(values / values.abs().max()).values
    return tuple(float(v) for v in values.float())


FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class CodebookFormat(QFormat):
    table: tuple[float, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if len(self.table) != 2**self.bits:
            raise ValueError(f"format {self.name!r}: table has {len(self.table)} values, needs {2**self.bits}")
        object.__setattr__(self, "_encode", nearest_level_encoder(torch.tensor(self.table)))
        object.__setattr__(self, "_tables", {})   # device -> the table there: no host copy per call (CUDA graphs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)  # type: ignore[attr-defined]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        table = self._tables.get(codes.device)  # type: ignore[attr-defined]
        if table is None:
            table = self._tables[codes.device] = torch.tensor(self.table, device=codes.device)  # type: ignore[attr-defined]
        if codes.is_cpu:   # index_select: 4x faster than advanced indexing on the CPU, the same values
            return table.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
        return table[codes.long()]

    def scale_for(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return absmax_scale(groups, max(abs(v) for v in self.table)), None


register_format(CodebookFormat(name="nf4", bits=4, table=normal_float_levels()))
register_format(
    CodebookFormat(name="fp4", bits=4, table=FP4_E2M1_MAGNITUDES + tuple(-m for m in FP4_E2M1_MAGNITUDES))
)
