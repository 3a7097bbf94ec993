"""Wanda (Sun et al. 2024): prune by |W_ij| · ‖X_j‖₂, the weight's magnitude times the L2 norm of its input
channel over the calibration tokens, comparing weights within each output row (or within each N:M group
of a row). No weight update: the kept weights are the original ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.algorithms.prune.common import SparsityTarget
from modelpress.algorithms.prune.masks import NMPattern, nm_mask, row_mask
from modelpress.nn.layers import DEFAULT_SKIP


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """(N, K) |W| scaled by the per-input-channel activation norm (K,)."""
    return weight.detach().abs().float() * input_norm.float().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float,
               pattern: NMPattern | None = None) -> torch.Tensor:
    score = wanda_score(weight, input_norm)
    return nm_mask(score, pattern) if pattern is not None else row_mask(score, sparsity)


class SquaredNormSum:
    """Running Σ_tokens x_j² per input channel (float64: sums over many tokens)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        self.sum += x.double().pow(2).sum(dim=0)
        self.rows += x.shape[0]

    def reduce(self, ranks) -> None:
        """Sum and row count over all ranks (engine/distributed.py)."""
        ranks.sum_(self.sum)
        self.rows = ranks.sum_ints([self.rows])[0]

    def norm(self) -> torch.Tensor:
        return self.sum.sqrt().float()


@dataclass(frozen=True)
class WandaConfig(SparsityTarget):
    skip: tuple[str, ...] = DEFAULT_SKIP
    compress: bool = True                  # store SparseLinear layers (False: zeros in dense layers)
