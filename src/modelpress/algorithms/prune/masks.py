"""Which weights a pruning method keeps, given a score per weight (larger = more important).

Masks are boolean tensors shaped like the weight, True where the weight is kept. Every selector prunes an
exact count (ties broken by position), so a requested sparsity is met exactly, not approximately:
- `layer_mask`: the lowest-scoring round(s·N·K) weights of the whole matrix;
- `row_mask`: round(s·K) weights in every output row (Wanda compares weights within a row);
- `nm_mask`: N kept out of every M consecutive inputs of a row (2:4, 4:8), what sparse tensor cores run;
- `global_masks`: one threshold over several matrices (magnitude pruning across the whole model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelpress.errors import ModelpressError


@dataclass(frozen=True)
class NMPattern:
    """N weights kept in every group of M consecutive inputs of a row (N:M; 2:4 keeps half)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ModelpressError(f"an N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, spec: str) -> NMPattern:
        parts = spec.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ModelpressError(f"cannot read sparsity pattern {spec!r}; expected N:M such as 2:4 or 4:8")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    @property
    def spec(self) -> str:
        return f"{self.n}:{self.m}"


def check_sparsity(sparsity: float, what: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ModelpressError(f"{what} must be a fraction strictly between 0 and 1, got {sparsity!r}")


def resolve_sparsity(sparsity: float | None, pattern: NMPattern | None) -> float:
    """The sparsity a config stands for: given, implied by an N:M pattern, or an error when they disagree."""
    if pattern is None:
        if sparsity is None:
            raise ModelpressError("give a sparsity (fraction of weights to remove, e.g. 0.5) or an N:M pattern")
        check_sparsity(sparsity)
        return float(sparsity)
    if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
        raise ModelpressError(f"sparsity {sparsity} disagrees with pattern {pattern.spec} "
                              f"(which removes {pattern.sparsity:g}); give one or the other")
    return pattern.sparsity


def pruned_count(total: int, sparsity: float) -> int:
    """How many of `total` weights a sparsity removes: round half up, so 0.5 of 9 removes 5."""
    return min(total, int(total * sparsity + 0.5))


def _prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask over (R, n) scores with the `count` lowest of every row dropped; ties at the threshold go
    by position (earlier first). kthvalue finds the threshold without sorting the row."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if count <= 0:
        return keep
    threshold = score.kthvalue(count, dim=1, keepdim=True).values
    below = score < threshold
    ties = score == threshold
    ties_to_drop = count - below.sum(dim=1, keepdim=True)
    return ~(below | (ties & (ties.cumsum(dim=1) <= ties_to_drop)))


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(N, K) score -> keep-mask with exactly round(s·N·K) entries pruned over the whole matrix."""
    return _prune_lowest(score.reshape(1, -1), pruned_count(score.numel(), sparsity)).reshape(score.shape)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(N, K) score -> keep-mask with exactly round(s·K) entries pruned in every row."""
    return _prune_lowest(score, pruned_count(score.shape[1], sparsity))


def check_nm_shape(in_features: int, pattern: NMPattern, name: str = "layer") -> None:
    if in_features % pattern.m:
        raise ModelpressError(f"{name}: {in_features} inputs do not split into groups of {pattern.m} for "
                              f"pattern {pattern.spec}; skip this layer or use unstructured sparsity")


def nm_mask(score: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """(N, K) score -> keep-mask holding the N highest scores of every M consecutive inputs of a row."""
    rows, k = score.shape
    check_nm_shape(k, pattern)
    groups = score.reshape(rows, k // pattern.m, pattern.m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : pattern.n], True)
    return keep.reshape(rows, k)


def is_nm(mask: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every group of M consecutive inputs of every row keeps at most N weights."""
    rows, k = mask.shape
    if k % pattern.m:
        return False
    return bool((mask.reshape(rows, k // pattern.m, pattern.m).sum(-1) <= pattern.n).all())


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over every matrix: exactly round(s·total) of all entries pruned, wherever they lie.
    The threshold is found with kthvalue (no full sort of the concatenated scores); ties at the threshold
    are pruned in the order the matrices and their entries come."""
    total = sum(s.numel() for s in scores.values())
    count = pruned_count(total, sparsity)
    if count == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    threshold = flat.kthvalue(count).values
    below = int((flat < threshold).sum())
    ties_left = count - below
    masks = {}
    for name, score in scores.items():
        s = score.detach().float()
        keep = s > threshold
        at = (s == threshold).reshape(-1)
        if ties_left > 0 and at.any():
            tie_positions = at.nonzero().squeeze(1)
            take = tie_positions[:ties_left]
            flat_keep = keep.reshape(-1)
            flat_keep[tie_positions] = True
            flat_keep[take] = False
            ties_left -= take.numel()
        else:
            keep |= s == threshold
        masks[name] = keep
    return masks

