"""AWQ (Lin et al. 2024): activation-aware weight quantization. Input channels that carry large activations
matter most; scaling their weight columns up by s before quantizing (and the input down by s, folded into
the norm or linear layer producing it, see smoothing.py) gives them relatively finer steps.

Per group of layers reading one input, with X its calibration activations and H = X^T X / n:
- scale search: s = mean|x|^a normalised by sqrt(max(s) min(s)), for a in {0, 1/grid, ..., (grid-1)/grid};
  the objective is the group's output error  sum_i ||W_i X - Q(W_i diag(s)) diag(1/s) X||^2 / n, computed
  from H as trace(D H D^T) (no pass over the activations per candidate). a = 0 is plain RTN, so the chosen
  scales never score worse than RTN on this objective. With `duo_scaling`, s = mean|x|^a / mean|w|^(1-a)
  (|w| normalised per group) is searched too.
- clip search (after folding): for each (row, group) the range is shrunk by r in [1 - max_shrink, 1] to
  minimise that group's share of the output error, D_g H_gg D_g^T; rows where the shrunk ranges do not
  lower the row's full output error keep the format's default range, so clipping never raises the layer
  objective.
Groups whose input has no producer to fold into are not scaled; they still get the clip search. Behind
grouped-query attention (v_proj feeding several query heads' channels of o_proj's input) the candidate
scales are tied over the channels one value row feeds before they are scored (smoothing.py). With solver "gptq" the scales are folded first and GPTQ then
solves the scaled layers (no clip search: GPTQ picks its own group ranges). With a per-layer `schemes`
override (mixed precision), each layer of a group is scored and quantized under its own scheme.

The math is `candidate_scale`, `scaled_objective`, `search_scales`, `search_clip`; the `AWQ` class is the
engine plumbing; `quantize_awq` the entry point.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.algorithms.quantize.gptq import GPTQ, GPTQConfig, HessianSum, layer_objective, storage_rounded
from modelpress.algorithms.quantize.mixed import check_layer_schemes, layer_scheme
from modelpress.algorithms.quantize.smoothing import (
    EXPERT_REASON,
    FoldSearch,
    apply_fold,
    collect_stats,
    deepest_first,
    foldable_groups,
    search_producers,
)
from modelpress.engine.algorithm import InputGroup, LayerSolution
from modelpress.engine.blocks import BlockStack
from modelpress.engine.context import BlockContext
from modelpress.engine.distributed import Ranks
from modelpress.engine.resume import config_description
from modelpress.engine.runner import RunReport
from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, fake_quantize, group_view_reduce, quantize_weight
from modelpress.formats.scheme import WeightScheme, as_scheme
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, replace_module

log = logging.getLogger(__name__)

SOLVERS = ("rtn", "gptq")


@dataclass(frozen=True)
class AWQConfig:
    scheme: WeightScheme | str     # a WeightScheme or its spec, e.g. "int4/g128"
    scale_grid: int = 20           # exponents a = 0, 1/scale_grid, ..., (scale_grid-1)/scale_grid
    duo_scaling: bool = False      # also try s = mean|x|^a / mean|w|^(1-a)
    clip: bool = True              # search a shrunk range per (row, group)
    clip_grid: int = 20            # shrink ratios tried: 1, 1 - max_shrink/clip_grid, ..., 1 - max_shrink
    max_shrink: float = 0.5
    solver: str = "rtn"            # "rtn", or "gptq": scales folded, then GPTQ on the scaled layers
    static_groups: bool = True     # solver "gptq": GPTQ's group layout (GPTQConfig.static_groups)
    grid: str | None = None        # solver "gptq": GPTQ's static-group ranges (GPTQConfig.grid), e.g. "gguf"
    skip: tuple[str, ...] = DEFAULT_SKIP
    schemes: Mapping[str, WeightScheme] | None = field(default=None, hash=False)   # per layer (full name)

    def scheme_of(self, name: str) -> WeightScheme:
        return layer_scheme(self.scheme, self.schemes, name)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", as_scheme(self.scheme))
        check_layer_schemes(self.schemes)
        if self.scale_grid < 1 or self.clip_grid < 1:
            raise ModelpressError(f"AWQ grids must be >= 1, got scale_grid={self.scale_grid}, "
                                  f"clip_grid={self.clip_grid}")
        if not 0 <= self.max_shrink < 1:
            raise ModelpressError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.solver not in SOLVERS:
            raise ModelpressError(f"AWQ solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not self.static_groups and self.solver != "gptq":
            raise ModelpressError("static_groups=False picks GPTQ's group layout; AWQ takes it with solver='gptq' only")
        if self.grid is not None:
            if self.solver != "gptq":
                raise ModelpressError(f"grid={self.grid!r} is GPTQ's static-group grid; AWQ takes it with solver='gptq' only")
            inner = GPTQConfig(self.scheme, grid=self.grid, schemes=self.schemes)   # checks the name; float32 scales
            object.__setattr__(self, "scheme", inner.scheme)
            object.__setattr__(self, "schemes", inner.schemes)


# ---- the math ---------------------------------------------------------------------------------------------

def candidate_scale(mean_abs_x: torch.Tensor, alpha: float, weight_mean: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) scales mean|x|^alpha [/ weight_mean^(1-alpha)], normalised so that max(s) * min(s) = 1.
    Channels never active in calibration are treated as 1e-5 of the largest mean."""
    x = mean_abs_x.float()
    x = x.clamp(min=float(x.max()) * 1e-5 + 1e-30)
    s = x.pow(alpha)
    if weight_mean is not None:
        w = weight_mean.float()
        s = s / w.clamp(min=float(w.max()) * 1e-5 + 1e-30).pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_objective(weights: list[torch.Tensor], scale: torch.Tensor, hessian: torch.Tensor,
                     scheme: WeightScheme, layer_schemes: list[WeightScheme] | None = None) -> float:
    """sum_i ||W_i X - Q(W_i diag(s)) diag(1/s) X||^2 / n, from H = X^T X / n. `layer_schemes`, parallel to
    `weights`, quantizes each layer under its own scheme instead of `scheme`."""
    total = 0.0
    for i, w in enumerate(weights):
        own = scheme if layer_schemes is None else layer_schemes[i]
        effective = fake_quantize(w.float() * scale, own) / scale   # what unscaled inputs meet
        total += layer_objective(w, effective, hessian)
    return total


def normalised_weight_mean(weights: list[torch.Tensor], scheme: WeightScheme) -> torch.Tensor:
    """(K,) mean over all rows of |w| divided by its (row, group) absmax."""
    rows = []
    for w in weights:
        a = w.detach().float().abs()
        (amax,) = group_view_reduce(a, scheme, lambda g: g.amax(dim=-1))
        k = a.shape[1]
        per_col = amax.expand(a.shape[0], k) if amax.shape == (1, 1) else \
            amax.repeat_interleave(scheme.group_length(k), dim=1)[:, :k]
        rows.append(a / per_col.clamp(min=1e-12))
    return torch.cat(rows).mean(dim=0)


@dataclass(frozen=True)
class ScaleSearch:
    scale: torch.Tensor           # (K,) the chosen scales (all ones when no candidate beat RTN)
    alpha: float                  # exponent of the chosen candidate (0.0: unscaled)
    duo: bool                     # chosen from the mean|x|^a / mean|w|^(1-a) family
    objective: float              # group output error with the chosen scales
    rtn_objective: float          # ... without scales


def search_scales(mean_abs_x: torch.Tensor, weights: list[torch.Tensor], hessian: torch.Tensor,
                  scheme: WeightScheme, grid: int = 20, duo_scaling: bool = False,
                  layer_schemes: list[WeightScheme] | None = None, tie=None) -> ScaleSearch:
    """The grid search of AWQ for one group of layers reading the same input (see module docstring).
    `layer_schemes` (parallel to `weights`) scores each layer under its own scheme; `tie` (Producer.tie)
    makes every candidate foldable into a producer whose rows feed several channels."""
    k = mean_abs_x.shape[0]
    ones = torch.ones(k, device=hessian.device)
    rtn = scaled_objective(weights, ones, hessian, scheme, layer_schemes)
    best = ScaleSearch(ones, 0.0, False, rtn, rtn)
    families = [(False, None)]
    if duo_scaling:
        families.append((True, normalised_weight_mean(weights, scheme).to(hessian.device)))
    for duo, weight_mean in families:
        for step in range(grid):
            alpha = step / grid
            if alpha == 0 and not duo:
                continue                                    # that is RTN, already scored
            scale = candidate_scale(mean_abs_x.to(hessian.device), alpha, weight_mean)
            if tie is not None:
                scale = tie(scale)
            loss = scaled_objective(weights, scale, hessian, scheme, layer_schemes)
            if loss < best.objective:
                best = ScaleSearch(scale, alpha, duo, loss, rtn)
    return best


def _row_errors(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    delta = weight.float() - quantized.float()
    return ((delta @ hessian) * delta).sum(dim=1)


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Per (row, group) ranges for an (N, K) weight, shrunk to minimise output error (module docstring).
    Returns (scale (N, G), offset (N, G) or None) for quantize_weight, or None for schemes with nothing to
    choose per group (per-tensor scales, double-quantized scales)."""
    if scheme.granularity == "tensor" or scheme.double_quant:
        return None
    fmt = scheme.qformat
    w = weight.detach().float()
    n, k = w.shape
    g = scheme.group_length(k)
    ratios = [1.0 - max_shrink * i / grid for i in range(grid + 1)]
    scales, offsets = [], []
    for start in range(0, k, g):
        wg, hg = w[:, start:start + g], hessian[start:start + g, start:start + g].float()
        best_err = torch.full((n,), float("inf"), device=w.device)
        best_scale = torch.zeros(n, device=w.device)
        best_offset = None if not fmt.affine else torch.zeros(n, device=w.device)
        for r in ratios:
            scale, offset = storage_rounded(*fmt.scale_for(wg * r), scheme)
            q = scheme.round_trip(wg, scale[:, None], None if offset is None else offset[:, None])
            err = _row_errors(wg, q, hg)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            if offset is not None:
                best_offset = torch.where(better, offset, best_offset)
        scales.append(best_scale)
        offsets.append(best_offset)
    scale = torch.stack(scales, dim=1)
    offset = None if offsets[0] is None else torch.stack(offsets, dim=1)
    # guard: a row keeps the default ranges unless the chosen ones lower its full output error
    clipped = quantize_weight(w, scheme, scale=scale, offset=offset).dequantize()
    default = fake_quantize(w, scheme)
    worse = _row_errors(w, clipped, hessian) > _row_errors(w, default, hessian)
    if worse.any():
        d_scale, d_offset = group_view_reduce(w, scheme, fmt.scale_for)
        scale = torch.where(worse[:, None], d_scale.float(), scale)
        if offset is not None:
            offset = torch.where(worse[:, None], d_offset.float(), offset)
    return scale, offset


def awq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, scheme: WeightScheme, clip: bool = True,
                 grid: int = 20, max_shrink: float = 0.5) -> PackedWeight:
    """Quantize an (already scaled) weight with the clip search (RTN without a Hessian or clipping)."""
    ranges = search_clip(weight, hessian, scheme, grid, max_shrink) if clip and hessian is not None else None
    if ranges is None:
        return quantize_weight(weight, scheme)
    return quantize_weight(weight, scheme, scale=ranges[0], offset=ranges[1])


# ---- plumbing: the engine's layer algorithm ----------------------------------------------------------------

@dataclass
class AWQ:
    """The AWQ layer algorithm for the sequential engine: scales searched and folded in `prepare_block`,
    layers quantized in `solve`."""

    config: AWQConfig
    stack: BlockStack | None = None    # the model's blocks: turns block-relative target names into full ones
    _hessians: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)   # scaled H, rows
    _observed: dict[str, HessianSum] = field(default_factory=dict)
    _scaling: dict[str, dict] = field(default_factory=dict)                        # per layer name
    _inner: GPTQ | None = None
    _prefix: str = ""                  # full name of the block being solved, plus "."

    def __post_init__(self) -> None:
        if self.config.solver == "gptq":
            # AWQ observes each block once on its own inputs: the inner solve is plain GPTQ (no float targets)
            inner = GPTQConfig(scheme=self.config.scheme, static_groups=self.config.static_groups,
                               skip=self.config.skip, schemes=self.config.schemes, grid=self.config.grid,
                               float_target=False)
            self._inner = GPTQ(inner, stack=self.stack)

    def scheme_for(self, name: str) -> WeightScheme:
        """Scheme of the block-relative target `name` in the block being solved."""
        if self.config.schemes and self.stack is None:
            raise ModelpressError("AWQ with per-layer schemes needs the model's block stack to name its layers")
        return self.config.scheme_of(self._prefix + name)

    @property
    def sequential(self) -> bool:
        return self._inner.sequential if self._inner is not None else False

    def describe(self) -> str:
        inner = f" then {self._inner.describe()}" if self._inner is not None else ""
        return config_description("awq", self.config) + inner

    def prepare_block(self, context: BlockContext) -> None:
        self._prefix = f"{self.stack.block_name(context.index)}." if self.stack is not None else ""
        if self._inner is not None:
            self._inner.prepare_block(context)
        groups = foldable_groups(context)
        foldable = {g.key for g in groups}
        for group in context.plan.groups:
            if group.key not in foldable:
                for target in group.targets:
                    self._scaling[target.name] = {"scaled": False, "reason": EXPERT_REASON}
        stats = collect_stats(context, groups, hessian=True)
        producers = context.ranks.on_main(lambda: search_producers(context, groups))
        for group in deepest_first(groups):
            found = stats.get(group.key)
            if found is None or found.rows == 0:
                continue
            hessian = found.hessian.mean()  # type: ignore[union-attr]
            notes, scale = self._scale_group(context, group, producers[group.key], found.mean_abs, hessian)
            if scale is not None:
                hessian = hessian / torch.outer(scale, scale)       # H of the scaled input x / s
            for target in group.targets:
                self._scaling[target.name] = notes
            if self._inner is None:
                self._hessians[group.key] = (hessian, found.rows)

    def _scale_group(self, context: BlockContext, group: InputGroup, fold: FoldSearch,
                     mean_abs: torch.Tensor, hessian: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """Search the group's scales and fold them in; returns notes and the scales (None if unscaled)."""
        producer = fold.producer
        if producer is None:
            return {"scaled": False, "reason": fold.reason}, None
        c = self.config
        weights = [linear_weight(context.targets.linears[t.name]).detach().float() for t in group.targets]
        schemes = [self.scheme_for(t.name) for t in group.targets]
        found = search_scales(mean_abs, weights, hessian, schemes[0], c.scale_grid, c.duo_scaling, schemes,
                              producer.tie)
        scaled = found.alpha > 0 or found.duo
        notes = {"scaled": scaled, "producer": producer.label, "alpha": found.alpha, "duo": found.duo,
                 "scale_objective": found.objective, "scale_rtn_objective": found.rtn_objective}
        if not scaled:
            notes["reason"] = "RTN scored best in the scale search"
            return notes, None
        apply_fold(context, producer, group, found.scale)
        return notes, found.scale

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        if self._inner is not None:
            self._inner.observe(group, inputs)
            return
        if group.key in self._hessians:
            return                                           # prepared from the same activations, then scaled
        acc = self._observed.get(group.key)
        if acc is None:
            k = inputs.shape[-1]
            acc = self._observed[group.key] = HessianSum.zeros(k, inputs.device)
        acc.add(inputs)

    def reduce(self, group: InputGroup, ranks: Ranks) -> None:
        """Data-parallel runs: what observe gathered, summed over ranks (prepare_block reduced its own)."""
        if self._inner is not None:
            self._inner.reduce(group, ranks)
        elif group.key not in self._hessians:
            weight = group.targets[0].weight
            self._observed.setdefault(group.key, HessianSum.zeros(weight.shape[-1], weight.device)).reduce(ranks)

    def solve(self, group: InputGroup) -> list[LayerSolution]:
        if self._inner is not None:
            solutions = self._inner.solve(group)
            for target, solution in zip(group.targets, solutions):
                solution.notes.update(awq=self._scaling.get(target.name, {"scaled": False}))
            return solutions
        hessian, rows = self._hessians.pop(group.key, (None, 0))
        if hessian is None and group.key in self._observed:
            acc = self._observed.pop(group.key)
            hessian, rows = (acc.mean(), acc.rows) if acc.rows else (None, 0)
        c = self.config
        results = []
        for target in group.targets:
            notes = {"method": "awq", "calibration_rows": rows, **self._scaling.get(target.name, {"scaled": False})}
            scheme = self.scheme_for(target.name)
            if hessian is None:
                notes.update(method="rtn", reason="no calibration tokens reached this layer")
                packed = quantize_weight(target.weight, scheme, name=f"layer {target.name}")
                results.append(LayerSolution(packed, notes))
                continue
            weight = target.weight.detach()
            packed = awq_quantize(weight, hessian, scheme, c.clip, c.clip_grid, c.max_shrink)
            notes["objective"] = layer_objective(weight, packed.dequantize(), hessian)
            results.append(LayerSolution(packed, notes))
        return results

    def finish_block(self, block_index: int) -> None:
        self._hessians.clear()
        self._observed.clear()
        self._scaling.clear()
        if self._inner is not None:
            self._inner.finish_block(block_index)


@dataclass
class AWQReport:
    run: RunReport
    rtn_outside_blocks: list[str]       # linear layers outside the repeated blocks, quantized with RTN

    @property
    def layers(self) -> int:
        return self.run.layers + len(self.rtn_outside_blocks)

    def summary(self) -> dict:
        def scaling(notes: dict) -> dict:
            return notes.get("awq", notes)
        scaled = sorted(n for n, notes in self.run.notes.items() if scaling(notes).get("scaled"))
        unscaled = {n: scaling(notes).get("reason", "") for n, notes in self.run.notes.items()
                    if not scaling(notes).get("scaled")}
        rtn = {n: notes.get("reason", "") for n, notes in self.run.notes.items() if notes.get("method") == "rtn"}
        return {"blocks": self.run.blocks, "block_path": self.run.block_path,
                "unobserved_layers": self.run.unobserved, "scaled_layers": len(scaled),
                "producers": {n: scaling(self.run.notes[n])["producer"] for n in scaled},
                "unscaled_layers": unscaled, "rtn_fallback_layers": rtn, "rtn_outside_blocks": self.rtn_outside_blocks,
                "resumed_from_block": self.run.resumed_from_block}


def quantize_awq(model: nn.Module, config: AWQConfig, calibration_ids: torch.Tensor,
                 device: str | torch.device = "cpu", resume_dir: str | None = None, batch_size: int = 8
                 ) -> AWQReport:
    """AWQ every linear layer in the model's repeated blocks (in place), then RTN for linear layers outside
    them (the output head is skipped as usual)."""
    from modelpress.algorithms.quantize.rtn import quantize_layer
    from modelpress.engine.blocks import find_blocks
    from modelpress.engine.runner import EngineSettings, run_sequential

    settings = EngineSettings(batch_size=batch_size, skip=config.skip)
    algorithm = AWQ(config, stack=find_blocks(model))
    run = run_sequential(model, algorithm, calibration_ids, device, resume_dir=resume_dir, settings=settings)
    outside = find_linear_layers(model, config.skip)
    for name, module in outside.items():
        new = quantize_layer(module, config.scheme_of(name), name=f"layer {name}")
        replace_module(model, name, new.to(module.weight.device))
    return AWQReport(run, sorted(outside))
