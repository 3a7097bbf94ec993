"""What every unstructured pruning method shares: the sparsity target, the report, and turning a layer's
mask (and kept values) into a SparseLinear in the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.algorithms.prune.masks import NMPattern, resolve_sparsity
from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight
from modelpress.nn.layers import find_linear_layers, is_conv1d, linear_weight, replace_module
from modelpress.nn.sparse_linear import SparseLinear


@dataclass(frozen=True)
class SparsityTarget:
    """Fraction of weights to remove, or an N:M pattern (which implies it). `pattern` may be given as "2:4"."""

    sparsity: float | None = None
    pattern: NMPattern | str | None = None

    def __post_init__(self) -> None:
        pattern = NMPattern.parse(self.pattern) if isinstance(self.pattern, str) else self.pattern
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "sparsity", resolve_sparsity(self.sparsity, pattern))

    @property
    def spec(self) -> str:
        return self.pattern.spec if self.pattern is not None else f"{self.sparsity:g}"  # type: ignore[union-attr]


@dataclass
class LayerPruneInfo:
    kept: int
    total: int
    stored_bytes: int              # bytes of the layer as saved (mask + values), or dense bytes if left dense
    dense_bytes: int               # bytes of the original dense weight
    notes: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1 - self.kept / self.total


@dataclass
class PruneReport:
    method: str
    target: str                                  # "0.5" or "2:4"
    layers: dict[str, LayerPruneInfo] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # layer -> why it was left dense
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Weights removed over the pruned layers."""
        total = sum(i.total for i in self.layers.values())
        return 1 - sum(i.kept for i in self.layers.values()) / max(total, 1)

    def summary(self) -> dict:
        stored = sum(i.stored_bytes for i in self.layers.values())
        dense = sum(i.dense_bytes for i in self.layers.values())
        return {"method": self.method, "target": self.target, "layers": len(self.layers),
                "sparsity": round(self.sparsity, 6), "stored_bytes": stored, "dense_bytes": dense,
                "bytes_ratio": round(stored / dense, 4) if dense else None, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), **self.extra}


def check_pattern_fits(model: nn.Module, target: SparsityTarget, skip: tuple[str, ...]) -> None:
    """Refuse, before any work, an N:M pattern that no layer to prune can tile (every row length, K, must
    split into groups of M); layers it does not tile are left dense and noted in the report."""
    if target.pattern is None:
        return
    lengths = sorted({linear_weight(module).shape[1] for module in find_linear_layers(model, skip).values()})
    if lengths and all(k % target.pattern.m for k in lengths):
        raise ModelpressError(f"pattern {target.pattern.spec}: no layer's rows ({', '.join(map(str, lengths))} inputs) "
                              f"split into groups of {target.pattern.m}; choose an M that divides them, e.g. 2:4")


def sparse_module(module: nn.Module, mask: torch.Tensor, values: torch.Tensor | PackedWeight,
                  pattern: NMPattern | None) -> SparseLinear:
    """A SparseLinear standing for `module` (nn.Linear or Conv1D) with the given mask and kept values."""
    bias = getattr(module, "bias", None)
    nm = None if pattern is None else (pattern.n, pattern.m)
    return SparseLinear(mask.to(module.weight.device), values, bias, nm).to(module.weight.device)


def install_sparse(root: nn.Module, name: str, module: nn.Module, mask: torch.Tensor,
                   values: torch.Tensor | PackedWeight | None, pattern: NMPattern | None,
                   compress: bool = True) -> LayerPruneInfo:
    """Prune `module` (the layer called `name` inside `root`) to `mask`. With `compress`, it becomes a
    SparseLinear holding only the kept values (`values`, or the weight's own where None); otherwise the
    pruned weights are zeroed in place (a dense layer, for comparison)."""
    weight = linear_weight(module)
    dense_bytes = weight.numel() * weight.element_size()
    if values is None:
        values = weight.detach()[mask]
    if not compress:
        dense = values.dequantize(weight.dtype).reshape(-1) if isinstance(values, PackedWeight) else values
        new_weight = torch.zeros_like(weight).masked_scatter_(mask, dense.to(weight.dtype))
        with torch.no_grad():
            module.weight.copy_(new_weight.t() if is_conv1d(module) else new_weight)
        return LayerPruneInfo(int(mask.sum()), mask.numel(), dense_bytes, dense_bytes)
    new = sparse_module(module, mask, values, pattern)
    replace_module(root, name, new)
    return LayerPruneInfo(int(mask.sum()), mask.numel(), new.weight_nbytes, dense_bytes)
