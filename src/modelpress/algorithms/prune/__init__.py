"""Pruning: unstructured (magnitude, Wanda, SparseGPT; any sparsity or N:M), structured (neurons, key/value
groups, layers) and mixture-of-experts expert pruning. One entry point, `prune`, dispatching on the type
of the config; each method's config type is registered in `PRUNERS` with whether it needs calibration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.algorithms.prune.calibrated import prune_calibrated
from modelpress.algorithms.prune.common import PruneReport, SparsityTarget, check_pattern_fits
from modelpress.algorithms.prune.experts import ExpertPruneConfig, ExpertReport, prune_experts
from modelpress.algorithms.prune.magnitude import MagnitudeConfig, prune_magnitude
from modelpress.algorithms.prune.masks import NMPattern
from modelpress.algorithms.prune.sparsegpt import SparseGPTConfig
from modelpress.algorithms.prune.structured import StructuredConfig, StructuredReport, prune_structured
from modelpress.algorithms.prune.wanda import WandaConfig
from modelpress.errors import ModelpressError
from modelpress.formats.packed import check_finite_tensors


@dataclass(frozen=True)
class Pruner:
    run: Callable                 # (model, config, calibration_ids, device, resume_dir, batch_size) -> report
    calibrated: bool
    name: str                     # the method's name in recipes (a stage `structured: {...}`) and reports


PRUNERS: dict[type, Pruner] = {
    MagnitudeConfig: Pruner(lambda m, c, ids, dev, resume, bs: prune_magnitude(m, c), calibrated=False,
                            name="magnitude"),
    WandaConfig: Pruner(lambda m, c, ids, dev, resume, bs: prune_calibrated(m, c, ids, dev, resume, bs), True,
                        name="wanda"),
    SparseGPTConfig: Pruner(lambda m, c, ids, dev, resume, bs: prune_calibrated(m, c, ids, dev, resume, bs), True,
                            name="sparsegpt"),
    StructuredConfig: Pruner(lambda m, c, ids, dev, resume, bs: prune_structured(m, c, ids), calibrated=True,
                             name="structured"),
    ExpertPruneConfig: Pruner(lambda m, c, ids, dev, resume, bs: prune_experts(m, c, ids), calibrated=True,
                              name="experts"),
}

PruneConfig = MagnitudeConfig | WandaConfig | SparseGPTConfig | StructuredConfig | ExpertPruneConfig
AnyReport = PruneReport | StructuredReport | ExpertReport


def pruner_for(config) -> Pruner:
    try:
        return PRUNERS[type(config)]
    except KeyError:
        known = ", ".join(t.__name__ for t in PRUNERS)
        raise ModelpressError(f"no pruning method takes a {type(config).__name__}; known configs: {known}") from None


def prune(model: nn.Module, config, calibration_ids: torch.Tensor | None = None, device: str | torch.device = "cpu",
          resume_dir: str | None = None, batch_size: int = 8) -> AnyReport:
    """Prune `model` in place as `config` says; calibrated methods need `calibration_ids` (samples, seq_len)."""
    pruner = pruner_for(config)
    if pruner.calibrated and calibration_ids is None:
        raise ModelpressError(f"{type(config).__name__} ranks weights on calibration data; give calibration ids")
    check_finite_tensors(model.named_parameters(), "prune")
    if isinstance(config, SparsityTarget):
        check_pattern_fits(model, config, getattr(config, "skip", ()))
    return pruner.run(model, config, calibration_ids, device, resume_dir, batch_size)


__all__ = [
    "PRUNERS",
    "ExpertPruneConfig",
    "MagnitudeConfig",
    "NMPattern",
    "PruneReport",
    "SparseGPTConfig",
    "SparsityTarget",
    "StructuredConfig",
    "WandaConfig",
    "prune",
    "pruner_for",
]
