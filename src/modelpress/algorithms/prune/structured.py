"""Structured pruning: remove MLP neurons, attention key/value groups or whole decoder layers, ranked on
calibration data, and physically slice the weights so the model really gets smaller and faster.

Ranking (one pass of the dense model over the calibration windows):
- neuron c of an MLP (a "channels" unit, structure.py): ‖X_c‖₂ · ‖W_down[:, c]‖₂, its input activation norm
  times its weight column norm (a bound on what the neuron adds to the block's output);
- key/value group g of an attention (a "heads" unit): Σ_tokens ‖x[cols_g] · W_o[:, cols_g]ᵀ‖², the energy
  its heads write through the output projection; under grouped-query attention a group is one key/value
  head with the query heads that read it, so the model stays a valid GQA model;
- decoder layer: mean over tokens of 1 - cos(input, output): how little the layer changes the residual.
With `uniform`, every layer keeps the same width and the config is updated (intermediate size, head
counts, layer count), so plain transformers `from_pretrained` loads the result as a standard model.
Otherwise widths follow one global ranking and the sliced layers become ResizedLinear modules, which a
modelpress save records so its loader rebuilds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from modelpress.algorithms.prune.masks import check_sparsity, pruned_count
from modelpress.algorithms.prune.structure import Unit, block_linears, check_channel_unit, check_head_unit, find_units
from modelpress.engine.blocks import BlockStack, find_blocks
from modelpress.engine.capture import capture_inputs, run_block
from modelpress.errors import ModelpressError
from modelpress.nn.layers import replace_module
from modelpress.nn.sparse_linear import ResizedLinear
from modelpress.progress import progress

# Config fields that hold the widths this file changes (architecture knowledge, as data, in one place).
WIDTH_FIELDS = {
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads",),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "per_layer_lists": ("layer_types",),
}

Target = Literal["neurons", "heads", "layers"]


@dataclass(frozen=True)
class StructuredConfig:
    target: Target = "neurons"
    sparsity: float = 0.25          # fraction of the target removed: neurons, key/value groups, or layers
    uniform: bool = True            # same width in every layer (a standard model of the architecture)
    multiple_of: int = 32           # neurons kept per layer: a multiple of this (whole GGUF blocks and
                                    # quantization groups of 32; tensor-core friendly widths)
    batch_size: int = 4             # calibration windows per forward

    def __post_init__(self) -> None:
        if self.target not in ("neurons", "heads", "layers"):
            raise ModelpressError(f"structured target must be neurons, heads or layers, got {self.target!r}")
        check_sparsity(self.sparsity)
        if self.multiple_of <= 0 or self.batch_size <= 0:
            raise ModelpressError(f"multiple_of and batch_size must be positive, got {self.multiple_of}, {self.batch_size}")


@dataclass
class StructuredReport:
    target: str
    sparsity: float
    uniform: bool
    parameters_before: int
    parameters_after: int = 0
    widths: dict[str, list[int]] = field(default_factory=dict)   # "block.consumer" -> [before, after]
    removed_layers: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)      # 1 - cos per layer (target "layers")
    config_changes: dict[str, list] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"method": "structured", "target": self.target, "sparsity": self.sparsity, "uniform": self.uniform,
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "parameters_removed": round(1 - self.parameters_after / self.parameters_before, 4),
                "widths": self.widths, "removed_layers": self.removed_layers,
                "layer_scores": [round(s, 5) for s in self.layer_scores], "config_changes": self.config_changes,
                "seconds": round(self.seconds, 3)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    heads = _config_value(config, "heads")
    if heads is None:
        raise ModelpressError(f"{type(config).__name__} names no head_dim or head count; cannot find attention heads")
    return int(config.hidden_size) // int(heads[1])


def _config_value(config, kind: str) -> tuple[str, object] | None:
    for name in WIDTH_FIELDS[kind]:
        if getattr(config, name, None) is not None:
            return name, getattr(config, name)
    return None


# ---- statistics: one pass over the calibration data ------------------------------------------------------

def _run(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int, desc: str) -> None:
    device = next(model.parameters()).device
    batches = calibration_ids.split(batch_size)
    with torch.no_grad():
        for batch in progress(batches, desc=desc, total=len(batches)):
            model(input_ids=batch.to(device), use_cache=False)


def unit_scores(model: nn.Module, stack: BlockStack, units: dict[int, list[Unit]], calibration_ids: torch.Tensor,
                batch_size: int, head_dim: int) -> dict[tuple[int, Unit], torch.Tensor]:
    """Per unit: neuron scores (width,) or key/value group scores (groups,) from the calibration windows."""
    sums: dict[tuple[int, Unit], torch.Tensor] = {}
    handles = []
    for index, block_units in units.items():
        linears = block_linears(stack.blocks[index])
        for unit in block_units:
            consumer = linears[unit.consumer]
            if unit.kind == "channels":
                check_channel_unit(unit, linears)
                hook = _channel_hook(sums, (index, unit))
            else:
                groups = check_head_unit(unit, linears, head_dim)
                hook = _head_hook(sums, (index, unit), consumer, groups)
            handles.append(consumer.register_forward_pre_hook(hook))
    try:
        _run(model, calibration_ids, batch_size, "structured: rank")
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for (index, unit), total in sums.items():
        if unit.kind == "channels":
            consumer = block_linears(stack.blocks[index])[unit.consumer]
            total = total.sqrt().float() * consumer.weight.detach().float().norm(dim=0).cpu()
        scores[(index, unit)] = total.float()
    return scores


def _channel_hook(sums: dict, key) -> Callable:
    def hook(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sums[key] = sums.get(key, 0) + x.pow(2).sum(dim=0).cpu()
    return hook


def _head_hook(sums: dict, key, consumer: nn.Linear, groups: int) -> Callable:
    def hook(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        cols = x.shape[-1] // groups
        w = consumer.weight.detach().to(x.dtype)
        energy = torch.stack([(x[:, g * cols:(g + 1) * cols] @ w[:, g * cols:(g + 1) * cols].t()).double().pow(2).sum()
                              for g in range(groups)])
        sums[key] = sums.get(key, 0) + energy.cpu()
    return hook


def layer_change_scores(model: nn.Module, stack: BlockStack, calibration_ids: torch.Tensor, batch_size: int
                        ) -> list[float]:
    """Mean over calibration tokens of 1 - cos(block input, block output), per block."""
    totals = [0.0] * len(stack)
    counts = [0] * len(stack)

    def hook_for(index: int):
        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            totals[index] += float((1 - cos).sum())
            counts[index] += cos.numel()
        return hook

    handles = [block.register_forward_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(stack.blocks)]
    try:
        _run(model, calibration_ids, batch_size, "structured: rank layers")
    finally:
        for handle in handles:
            handle.remove()
    return [t / max(c, 1) for t, c in zip(totals, counts)]


# ---- choosing what stays ---------------------------------------------------------------------------------

def keep_counts(scores: dict, sparsity: float, uniform: bool, multiple_of: int, kind: str) -> dict:
    """How many channels (or groups) each unit keeps."""
    step = multiple_of if kind == "channels" else 1
    counts = {}
    if uniform:
        for key, s in scores.items():
            counts[key] = _rounded(s.numel() - pruned_count(s.numel(), sparsity), step, s.numel())
        return counts
    flat = torch.cat([s for s in scores.values()])
    drop = pruned_count(flat.numel(), sparsity)
    threshold = flat.sort().values[drop - 1] if drop > 0 else flat.min() - 1
    for key, s in scores.items():
        counts[key] = _rounded(int((s > threshold).sum()), step, s.numel())
    return counts


def _rounded(count: int, step: int, width: int) -> int:
    """Round to a multiple of `step` (at least one step, at most the width)."""
    if width <= step:
        return max(1, min(count, width))
    return min(width, max(step, round(count / step) * step))


def top_indices(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in increasing index order (so kept channels keep their order)."""
    return torch.sort(torch.topk(score, count, sorted=False).indices).values


# ---- slicing ---------------------------------------------------------------------------------------------

def _sliced(module: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None, plain: bool) -> nn.Linear:
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        bias = None if bias is None else bias[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    if not plain:
        return ResizedLinear.from_linear(weight, bias)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    return new


def slice_unit(block: nn.Module, unit: Unit, keep: torch.Tensor, groups: int | None, plain: bool) -> tuple[int, int]:
    """Cut `block`'s unit down to the kept channels (or kept key/value groups). Returns (before, after) width."""
    linears = block_linears(block)
    consumer = linears[unit.consumer]
    before = consumer.in_features
    for name in (*unit.producers, unit.consumer):
        module = linears[name]
        width = module.in_features if name == unit.consumer else module.out_features
        index = keep if groups is None else _group_rows(keep, width // groups)
        rows, cols = (None, index) if name == unit.consumer else (index, None)
        replace_module(block, name, _sliced(module, rows, cols, plain))
    return before, block.get_submodule(unit.consumer).in_features


def _group_rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    return (groups.reshape(-1, 1) * per_group + torch.arange(per_group).reshape(1, -1)).reshape(-1)


def remove_layers(model: nn.Module, stack: BlockStack, drop: list[int]) -> dict[str, list]:
    """Delete blocks `drop` from the model, renumber the survivors' layer indices (used by KV caches) and
    update the config's layer count and per-layer lists. Returns the config changes."""
    kept = [b for i, b in enumerate(stack.blocks) if i not in set(drop)]
    replace_module(model, stack.path, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    changes = {}
    field_value = _config_value(config, "layers")
    if field_value is not None:
        changes[field_value[0]] = [field_value[1], len(kept)]
        setattr(config, field_value[0], len(kept))
    for name in WIDTH_FIELDS["per_layer_lists"]:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == len(stack):
            setattr(config, name, [v for i, v in enumerate(values) if i not in set(drop)])
            changes[name] = ["sliced"]
    return changes


# ---- the entry point -------------------------------------------------------------------------------------

def trace_units(model: nn.Module, stack: BlockStack, calibration_ids: torch.Tensor, kind: str) -> dict[int, list[Unit]]:
    """Units of `kind` in every block, traced on the first 16 tokens of one calibration window."""
    device = next(model.parameters()).device
    ids = calibration_ids[:1, : min(16, calibration_ids.shape[1])]
    captured = capture_inputs(model, stack, ids, device, 1)
    hidden = captured.hidden[0]
    units = {}
    for index, block in enumerate(stack.blocks):
        call = captured.calls[index][0]
        units[index] = [u for u in find_units(block, hidden, call) if u.kind == kind]
        with torch.no_grad():
            hidden = run_block(block, hidden, call)
    if not any(units.values()):
        raise ModelpressError(f"found no {'MLP' if kind == 'channels' else 'attention'} widths to cut in "
                              f"{type(model).__name__}'s blocks")
    return units


def prune_structured(model: nn.Module, config: StructuredConfig, calibration_ids: torch.Tensor) -> StructuredReport:
    """Remove neurons, key/value groups or layers from `model` (in place), ranked on `calibration_ids`."""
    start = time.perf_counter()
    stack = find_blocks(model)
    report = StructuredReport(config.target, config.sparsity, config.uniform, count_parameters(model))
    if config.target == "layers":
        scores = layer_change_scores(model, stack, calibration_ids, config.batch_size)
        count = min(pruned_count(len(stack), config.sparsity), len(stack) - 1)
        report.layer_scores = scores
        report.removed_layers = sorted(torch.tensor(scores).argsort(stable=True)[:count].tolist())
        report.config_changes = remove_layers(model, stack, report.removed_layers)
    else:
        _cut_widths(model, stack, config, calibration_ids, report)
    report.parameters_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    return report


def _cut_widths(model: nn.Module, stack: BlockStack, config: StructuredConfig, calibration_ids: torch.Tensor,
                report: StructuredReport) -> None:
    kind = "channels" if config.target == "neurons" else "heads"
    units = trace_units(model, stack, calibration_ids, kind)
    head_dim = head_dim_of(model.config) if kind == "heads" else 0
    scores = unit_scores(model, stack, units, calibration_ids, config.batch_size, head_dim)
    counts = keep_counts(scores, config.sparsity, config.uniform, config.multiple_of, kind)
    field_value = _config_value(model.config, "intermediate" if kind == "channels" else "kv_heads") or (
        _config_value(model.config, "heads") if kind == "heads" else None)
    standard = field_value[1] if field_value is not None else None
    plain_after = set()
    for (index, unit), score in scores.items():
        plain = config.uniform and score.numel() == standard
        keep = top_indices(score, counts[(index, unit)])
        groups = score.numel() if kind == "heads" else None
        before, after = slice_unit(stack.blocks[index], unit, keep, groups, plain)
        report.widths[f"{stack.block_name(index)}.{unit.consumer}"] = [before, after]
        if plain:
            plain_after.add(counts[(index, unit)])
    if len(plain_after) == 1:
        report.config_changes = _update_widths(model.config, kind, standard, plain_after.pop(), head_dim)


def _update_widths(config, kind: str, before: int, after: int, head_dim: int) -> dict[str, list]:
    """Config fields for the new uniform width (neurons), or the new key/value group count (heads)."""
    changes: dict[str, list] = {}

    def put(name: str, value) -> None:
        changes[name] = [getattr(config, name, None), value]
        setattr(config, name, value)

    if kind == "channels":
        put(_config_value(config, "intermediate")[0], after)  # type: ignore[index]
        return changes
    put("head_dim", head_dim)  # heads no longer follow hidden_size / num_heads
    heads_name, heads = _config_value(config, "heads")  # type: ignore[misc]
    put(heads_name, int(heads) * after // before)
    kv = _config_value(config, "kv_heads")
    if kv is not None:
        put(kv[0], after)
    return changes
