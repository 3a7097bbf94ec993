"""Magnitude pruning: drop the weights of smallest absolute value. No calibration data.

Scope `layer` prunes the same fraction of every layer (threshold per layer); `global` puts one threshold
over all pruned layers, so layers with many small weights lose more. An N:M pattern keeps the N largest of
every M consecutive inputs of a row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modelpress.algorithms.prune.common import PruneReport, SparsityTarget, install_sparse
from modelpress.algorithms.prune.masks import NMPattern, global_masks, layer_mask, nm_mask
from modelpress.errors import ModelpressError
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight
from modelpress.progress import progress


@dataclass(frozen=True)
class MagnitudeConfig(SparsityTarget):
    scope: Literal["layer", "global"] = "layer"
    skip: tuple[str, ...] = DEFAULT_SKIP
    compress: bool = True                  # store SparseLinear layers (False: zeros in dense layers)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("layer", "global"):
            raise ModelpressError(f"magnitude scope must be 'layer' or 'global', got {self.scope!r}")
        if self.scope == "global" and self.pattern is not None:
            raise ModelpressError("an N:M pattern is chosen within each group of inputs; it has no global scope")


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: NMPattern | None = None) -> torch.Tensor:
    """Keep-mask of an (N, K) weight: largest |w| over the layer, or per N:M group."""
    score = weight.detach().abs().float()
    return nm_mask(score, pattern) if pattern is not None else layer_mask(score, sparsity)


def prunable_layers(model: nn.Module, skip: tuple[str, ...], pattern: NMPattern | None,
                    report: PruneReport) -> dict[str, nn.Module]:
    """Linear layers to prune; those an N:M pattern cannot tile are noted in the report and left dense."""
    layers = find_linear_layers(model, skip)
    if not layers:
        raise ModelpressError(f"no linear layers to prune (skip patterns: {list(skip)})")
    if pattern is None:
        return layers
    kept = {}
    for name, module in layers.items():
        k = linear_weight(module).shape[1]
        if k % pattern.m:
            report.skipped[name] = f"{k} inputs do not split into groups of {pattern.m}"
        else:
            kept[name] = module
    return kept


@torch.no_grad()
def prune_magnitude(model: nn.Module, config: MagnitudeConfig) -> PruneReport:
    """Prune `model`'s linear layers in place; returns what was pruned and the bytes stored."""
    start = time.perf_counter()
    report = PruneReport(f"magnitude-{config.scope}", config.spec)
    layers = prunable_layers(model, config.skip, config.pattern, report)
    if config.scope == "global":
        masks = global_masks({name: linear_weight(m).abs() for name, m in layers.items()}, config.sparsity)
    else:
        masks = {}
    for name, module in progress(layers.items(), desc="magnitude", total=len(layers)):
        weight = linear_weight(module)
        mask = masks.pop(name) if config.scope == "global" else magnitude_mask(weight, config.sparsity, config.pattern)
        report.layers[name] = install_sparse(model, name, module, mask, None, config.pattern, config.compress)
    report.seconds = time.perf_counter() - start
    return report
