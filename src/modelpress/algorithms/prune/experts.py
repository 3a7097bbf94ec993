"""Expert pruning for mixture-of-experts models: drop the experts that calibration data uses least.

transformers 5 keeps an MoE layer's experts as fused 3-D parameters (experts, out, in), called one expert
at a time by the eager expert loop as F.linear(x, param[e]); the router is a weight with one row per
expert. Per MoE layer, over the calibration windows:
- tokens: how many (token, top-k slot) routings went to each expert (routing frequency);
- contribution: Σ over routed tokens of routing weight · ‖expert output‖, the size of what the expert
  adds to the layer output. Outputs are paired with routing weights in the order the eager loop visits an
  expert's tokens; the pairing is checked against the expert's inputs and, where it does not hold, the
  contribution falls back to routing weight mass · mean output norm (the report says which).
Every MoE layer keeps the same number of experts (so the config stays a standard one): the fused
parameters and the router rows are sliced, and the expert counts in the config and modules updated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from modelpress.algorithms.prune.masks import check_sparsity, pruned_count
from modelpress.engine.blocks import find_blocks
from modelpress.engine.targets import ExpertCallWatcher, ExpertParam, find_targets
from modelpress.errors import ModelpressError
from modelpress.progress import progress

# Config and module attributes that hold an MoE layer's expert count (architecture knowledge, as data).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "top_k", "moe_topk")


@dataclass(frozen=True)
class ExpertPruneConfig:
    sparsity: float = 0.25                                       # fraction of each layer's experts removed
    criterion: Literal["contribution", "frequency"] = "contribution"
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.criterion not in ("contribution", "frequency"):
            raise ModelpressError(f"expert criterion must be contribution or frequency, got {self.criterion!r}")


@dataclass
class ExpertLayerStats:
    tokens: torch.Tensor                 # (E,) routings per expert
    weight_mass: torch.Tensor            # (E,) Σ routing weights
    contribution: torch.Tensor           # (E,) Σ routing weight · ‖output‖
    exact: bool = True                   # contributions paired token by token (see module docstring)
    kept: list[int] = field(default_factory=list)

    def rows(self) -> list[dict]:
        tokens, contribution = self.tokens.double(), self.contribution.double()
        return [{"expert": e, "tokens": int(tokens[e]), "token_share": float(tokens[e] / tokens.sum().clamp(min=1)),
                 "contribution_share": float(contribution[e] / contribution.sum().clamp(min=1e-30)),
                 "kept": e in self.kept} for e in range(tokens.numel())]

    def coverage(self) -> dict:
        keep = torch.tensor(self.kept, dtype=torch.long)
        return {"tokens": float(self.tokens[keep].sum() / self.tokens.sum().clamp(min=1)),
                "contribution": float(self.contribution[keep].sum() / self.contribution.sum().clamp(min=1e-30))}


@dataclass
class ExpertReport:
    criterion: str
    experts_before: int
    experts_after: int
    layers: dict[str, ExpertLayerStats] = field(default_factory=dict)   # MoE experts module path -> stats
    parameters_before: int = 0
    parameters_after: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"method": "experts", "criterion": self.criterion, "experts_before": self.experts_before,
                "experts_after": self.experts_after, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after, "seconds": round(self.seconds, 3),
                "layers": {name: {"coverage": s.coverage(), "exact_contribution": s.exact, "experts": s.rows()}
                           for name, s in self.layers.items()}}


@dataclass
class _MoELayer:
    path: str                            # the experts module, from the model root
    module: nn.Module
    params: list[ExpertParam]            # its fused parameters (paths relative to the block)
    block: nn.Module
    stats: ExpertLayerStats
    parent: nn.Module | None = None      # the MoE module holding the experts and the router
    routers: list[nn.Module] = field(default_factory=list)   # parent's children whose output has one column per expert


def _moe_layers(model: nn.Module) -> list[_MoELayer]:
    stack = find_blocks(model)
    layers = []
    for index, block in enumerate(stack.blocks):
        by_owner: dict[str, list[ExpertParam]] = {}
        for fused in find_targets(block, ()).expert_params:
            by_owner.setdefault(fused.module_path, []).append(fused)
        for owner, params in by_owner.items():
            experts = params[0].parameter(block).shape[0]
            zeros = torch.zeros(experts, dtype=torch.float64)
            stats = ExpertLayerStats(zeros.clone(), zeros.clone(), zeros.clone())
            module = block.get_submodule(owner) if owner else block
            parent = block.get_submodule(owner.rpartition(".")[0]) if owner else None
            layers.append(_MoELayer(f"{stack.block_name(index)}.{owner}".rstrip("."), module, params, block, stats,
                                    parent))
    return layers


class _Observer:
    """Hooks on one experts module: routing from its arguments, expert inputs/outputs from the eager loop."""

    def __init__(self, layer: _MoELayer) -> None:
        self.layer = layer
        self.targets = find_targets(layer.block, ())
        self.names = {f.slice_name(e): e for f in layer.params for e in range(f.parameter(layer.block).shape[0])}
        self.first_x: dict[int, torch.Tensor] = {}
        self.last_y: dict[int, torch.Tensor] = {}

    def before_forward(self, _module, args, kwargs):
        tensors = [*args, *kwargs.values()]
        self.hidden = tensors[0]
        self.index = next(t for t in tensors[1:] if isinstance(t, torch.Tensor) and not t.is_floating_point())
        self.weights = next(t for t in tensors[1:] if isinstance(t, torch.Tensor) and t.is_floating_point()
                            and t.shape == self.index.shape)
        self.first_x, self.last_y = {}, {}
        self.watcher = ExpertCallWatcher(self.layer.block, self.targets, before=self._before, after=self._after)
        self.watcher.__enter__()

    def _before(self, name: str, x: torch.Tensor) -> None:
        self.first_x.setdefault(self.names[name], x)

    def _after(self, name: str, _x: torch.Tensor, out: torch.Tensor) -> None:
        self.last_y[self.names[name]] = out

    def after_forward(self, _module, _args, _kwargs, _output):
        self.watcher.__exit__(None, None, None)
        stats = self.layer.stats
        index, weights = self.index.reshape(self.hidden.shape[0], -1), self.weights.reshape(self.hidden.shape[0], -1)
        experts = stats.tokens.numel()
        stats.tokens += torch.bincount(index.reshape(-1).cpu(), minlength=experts)[:experts].double()
        stats.weight_mass.index_add_(0, index.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
        for e, y in self.last_y.items():
            slot, token = torch.where((index == e).t())       # the eager loop's order: slot-major, then token
            norms = y.detach().float().norm(dim=-1)
            w = weights[token, slot].float()
            if norms.numel() == w.numel() and torch.equal(self.first_x[e], self.hidden[token]):
                stats.contribution[e] += float((w * norms).sum())
            else:
                stats.exact = False
                stats.contribution[e] += float(w.sum() * norms.mean())


@torch.no_grad()
def observe_experts(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int) -> list[_MoELayer]:
    layers = _moe_layers(model)
    if not layers:
        raise ModelpressError(f"{type(model).__name__} has no fused expert parameters; expert pruning needs an MoE model")
    previous = getattr(model.config, "_experts_implementation", None)
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        setter("eager")  # the loop that calls one expert at a time is what lets experts be seen one by one
    handles = []
    for layer in layers:
        for child in [] if layer.parent is None else layer.parent.children():
            if child is not layer.module:
                handles.append(child.register_forward_hook(_router_finder(layer, child)))
        observer = _Observer(layer)
        handles.append(layer.module.register_forward_pre_hook(observer.before_forward, with_kwargs=True))
        handles.append(layer.module.register_forward_hook(observer.after_forward, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for batch in progress(calibration_ids.split(batch_size), desc="experts: observe"):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        if callable(setter) and previous is not None:
            setter(previous)
    return layers


def _router_finder(layer: _MoELayer, child: nn.Module):
    """A hook marking `child` as a router of `layer` if its output has one column per expert."""
    experts = layer.stats.tokens.numel()

    def hook(_module, _args, output):
        first = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(first, torch.Tensor) and first.shape[-1] == experts and child not in layer.routers:
            layer.routers.append(child)
    return hook


def expert_scores(stats: ExpertLayerStats, criterion: str) -> torch.Tensor:
    return stats.contribution if criterion == "contribution" else stats.tokens


def _slice_experts(model: nn.Module, layer: _MoELayer, keep: torch.Tensor) -> None:
    """Keep experts `keep` of one MoE layer: the fused parameters, and the rows of its router(s) (and any
    per-expert vectors they hold)."""
    experts = layer.params[0].parameter(layer.block).shape[0]
    for fused in layer.params:
        owner = layer.block.get_submodule(fused.module_path) if fused.module_path else layer.block
        param = getattr(owner, fused.param_name)
        setattr(owner, fused.param_name, nn.Parameter(param.detach()[keep.to(param.device)].clone(),
                                                      requires_grad=param.requires_grad))
    for router in layer.routers:
        for module in router.modules():
            for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if tensor.dim() in (1, 2) and tensor.shape[0] == experts:
                    sliced = tensor.detach()[keep.to(tensor.device)].clone()
                    setattr(module, name, nn.Parameter(sliced, tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else sliced)
            if isinstance(module, nn.Linear):
                module.out_features = module.weight.shape[0]


def prune_experts(model: nn.Module, config: ExpertPruneConfig, calibration_ids: torch.Tensor) -> ExpertReport:
    """Remove the lowest-ranked experts of every MoE layer of `model` (in place)."""
    start = time.perf_counter()
    before = sum(p.numel() for p in model.parameters())
    layers = observe_experts(model, calibration_ids, config.batch_size)
    experts = layers[0].stats.tokens.numel()
    if any(layer.stats.tokens.numel() != experts for layer in layers):
        raise ModelpressError("MoE layers have different expert counts; expert pruning keeps one count for all")
    keep_count = experts - min(pruned_count(experts, config.sparsity), experts - 1)
    top_k = next((getattr(model.config, f) for f in TOP_K_FIELDS if getattr(model.config, f, None)), 1)
    if keep_count < top_k:
        raise ModelpressError(f"keeping {keep_count} of {experts} experts leaves fewer than the {top_k} each token "
                              f"is routed to; use a sparsity of at most {(experts - top_k) / experts:g}")
    report = ExpertReport(config.criterion, experts, keep_count, parameters_before=before)
    for layer in layers:
        if not layer.routers:
            raise ModelpressError(f"{layer.path}: found no router (a module with one output per expert) beside it")
        keep = torch.sort(torch.topk(expert_scores(layer.stats, config.criterion), keep_count).indices).values
        layer.stats.kept = keep.tolist()
        _slice_experts(model, layer, keep)
        report.layers[layer.path] = layer.stats
    for module in model.modules():
        for attr in EXPERT_COUNT_FIELDS:
            if getattr(module, attr, None) == experts:
                setattr(module, attr, keep_count)
    for attr in EXPERT_COUNT_FIELDS:
        if getattr(model.config, attr, None) == experts:
            setattr(model.config, attr, keep_count)
    report.parameters_after = sum(p.numel() for p in model.parameters())
    report.seconds = time.perf_counter() - start
    return report
