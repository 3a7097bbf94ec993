"""SmoothQuant (Xiao et al. 2023): W8A8 linear layers, int8 weights per output channel and int8 activations
per token, with activation outliers migrated into the weights first.

Per group of layers reading one input x (..., K), from calibration activations of the float model:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)         (max|W_j| over every row of every layer of the group)
then x / s and W diag(s): the activation ranges shrink where they were large and the weights take up the
difference; alpha (the migration strength) sets the split. x / s is folded into the norm or linear layer
that produces x (smoothing.py). A group with no such producer keeps its factors in its W8A8Linear layers,
which divide their input before quantizing it (`in_layer_smoothing`), or is left unsmoothed.

The engine runs the float model block by block only to find producers and gather max|x|: folding leaves
each block's function unchanged, so every block sees the float model's activations, as in the paper.
Afterwards every linear layer becomes a W8A8Linear (nn/w8a8_linear.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.algorithms.quantize.smoothing import (
    apply_fold,
    collect_stats,
    deepest_first,
    foldable_groups,
    search_producers,
)
from modelpress.engine.algorithm import InputGroup, LayerSolution
from modelpress.engine.context import BlockContext
from modelpress.engine.resume import config_description
from modelpress.engine.runner import RunReport
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme, as_scheme
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, replace_module
from modelpress.nn.w8a8_linear import W8A8Linear

log = logging.getLogger(__name__)

FLOAT_EXPERTS_REASON = "fused expert weights have no W8A8 module: they stay in float"


@dataclass(frozen=True)
class SmoothQuantConfig:
    scheme: WeightScheme | str = "int8/channel"   # int8, one scale per output channel (its scale dtype is kept)
    alpha: float = 0.5                  # migration strength, in [0, 1]
    in_layer_smoothing: bool = True     # groups with no producer divide their input inside the layer
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        scheme = as_scheme(self.scheme)
        object.__setattr__(self, "scheme", scheme)
        if scheme.format != "int8" or scheme.granularity != "channel" or scheme.double_quant:
            raise ModelpressError(f"smoothquant makes W8A8 layers: int8 weights with one scale per output channel; "
                                  f"got {scheme.spec}. Use int8/channel (--format int8)")
        if not 0 <= self.alpha <= 1:
            raise ModelpressError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")

    @property
    def scale_dtype(self) -> str:
        """Storage dtype of the per-row weight scales."""
        return self.scheme.scale_dtype

    @classmethod
    def for_scheme(cls, scheme: WeightScheme, **fields) -> SmoothQuantConfig:
        """The config for a weight scheme given on the command line, which must be int8 per channel."""
        return cls(scheme, **fields)


def smoothing_factors(activation_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel (K,); 1 where a channel never saw an activation
    or has no weight (nothing to balance)."""
    a, w = activation_max.float(), weight_max.float().to(activation_max.device)
    live = (a > 0) & (w > 0)
    s = a.clamp(min=1e-12).pow(alpha) / w.clamp(min=1e-12).pow(1 - alpha)
    return torch.where(live, s.clamp(min=1e-5, max=1e5), torch.ones_like(s))


def input_channel_max(weights: list[torch.Tensor]) -> torch.Tensor:
    """(K,) max |W[:, j]| over the rows of all (N_i, K) weights."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


# ---- plumbing ---------------------------------------------------------------------------------------------

@dataclass
class SmoothQuant:
    """The smoothing pass for the sequential engine: folds factors in `prepare_block`, leaves weights float."""

    config: SmoothQuantConfig
    in_layer: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (block, layer) -> factors
    _notes: dict[str, dict] = field(default_factory=dict)

    sequential = False

    def describe(self) -> str:
        return config_description("smoothquant", self.config)

    def prepare_block(self, context: BlockContext) -> None:
        groups = foldable_groups(context)
        foldable = {g.key for g in groups}
        for group in context.plan.groups:
            if group.key not in foldable:
                for target in group.targets:
                    self._notes[target.name] = {"smoothing": "none", "reason": FLOAT_EXPERTS_REASON}
        stats = collect_stats(context, groups, hessian=False)
        producers = context.ranks.on_main(lambda: search_producers(context, groups))
        for group in deepest_first(groups):
            found = stats.get(group.key)
            if found is None or found.rows == 0:
                continue
            modules = [context.targets.linears[t.name] for t in group.targets]
            factors = smoothing_factors(found.abs_max, input_channel_max([linear_weight(m) for m in modules]),
                                        self.config.alpha)
            producer = producers[group.key].producer
            if producer is not None:
                factors = producer.tie(factors)
            notes = {"alpha": self.config.alpha, "activation_absmax": float(found.abs_max.max()),
                     "smoothed_activation_absmax": float((found.abs_max / factors).max())}
            if producer is not None:
                apply_fold(context, producer, group, factors)
                notes.update(smoothing="folded", producer=producer.label)
            elif self.config.in_layer_smoothing:
                notes.update(smoothing="in layer", reason=producers[group.key].reason)
                for target in group.targets:
                    self.in_layer[(context.index, target.name)] = factors.cpu()
            else:
                notes.update(smoothing="none", reason=producers[group.key].reason)
            for target in group.targets:
                self._notes[target.name] = notes

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        return None

    def solve(self, group: InputGroup) -> list[LayerSolution]:
        # weights stay float (and unchanged) until every block is smoothed; see quantize_smoothquant
        return [LayerSolution(t.weight.detach().clone(), self._notes.get(t.name, {"smoothing": "none"}))
                for t in group.targets]

    def finish_block(self, block_index: int) -> None:
        self._notes.clear()


@dataclass
class SmoothQuantReport:
    run: RunReport
    layers: int
    in_layer: list[str]                 # layers that divide their input by their own factors
    outside_blocks: list[str]           # W8A8 layers outside the repeated blocks (not smoothed)

    def summary(self) -> dict:
        folded = sum(1 for n in self.run.notes.values() if n.get("smoothing") == "folded")
        unsmoothed = sorted(name for name, n in self.run.notes.items()
                            if n.get("smoothing") == "none" and n.get("reason") != FLOAT_EXPERTS_REASON)
        return {"blocks": self.run.blocks, "block_path": self.run.block_path, "alpha": self._alpha(),
                "activations": "int8 per token (dynamic)", "folded_layers": folded,
                "in_layer_smoothing": self.in_layer, "unsmoothed_layers": unsmoothed,
                "outside_blocks": self.outside_blocks, "float_layers": self.float_layers()}

    def float_layers(self) -> list[str]:
        """Targets left in float (expert slices), with FLOAT_EXPERTS_REASON."""
        return sorted(name for name, n in self.run.notes.items() if n.get("reason") == FLOAT_EXPERTS_REASON)

    def _alpha(self) -> float | None:
        return next((n["alpha"] for n in self.run.notes.values() if "alpha" in n), None)


def quantize_smoothquant(model: nn.Module, config: SmoothQuantConfig, calibration_ids: torch.Tensor,
                         device: str | torch.device = "cpu", batch_size: int = 8) -> SmoothQuantReport:
    """Smooth every group of linear layers in the model's repeated blocks, then turn every linear layer
    (but the skipped ones and the output head) into a W8A8Linear, in place."""
    from modelpress.engine.blocks import find_blocks
    from modelpress.engine.runner import EngineSettings, run_sequential

    settings = EngineSettings(batch_size=batch_size, skip=config.skip)
    algorithm = SmoothQuant(config)
    run = run_sequential(model, algorithm, calibration_ids, device, settings=settings)
    stack = find_blocks(model)
    factors = {f"{stack.block_name(index)}.{name}": s for (index, name), s in algorithm.in_layer.items()}
    layers = find_linear_layers(model, config.skip)
    for name, module in layers.items():
        new = W8A8Linear.from_linear(module, config.scheme, name=f"layer {name}", smooth=factors.get(name))
        replace_module(model, name, new)
    inside = f"{stack.path}."
    report = SmoothQuantReport(run, len(layers), sorted(factors), sorted(n for n in layers if not n.startswith(inside)))
    if report.float_layers():
        log.warning("smoothquant: %d expert weight slices stay in float (%s), e.g. %s", len(report.float_layers()),
                    FLOAT_EXPERTS_REASON, report.float_layers()[0])
    return report
