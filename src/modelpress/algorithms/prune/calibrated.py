"""Wanda and SparseGPT as layer algorithms of the sequential engine (engine/runner.py).

The engine captures block inputs, feeds each layer's inputs to `observe`, asks `solve` for a dense
replacement weight (zeros where pruned) and installs it, then runs the block again to get the next block's
inputs, so later blocks are calibrated on what the pruned earlier blocks produce. Once a block is done
(`finish_block`), its pruned linear layers are swapped for SparseLinear modules holding only the kept
values; the engine saves the block after that, so a resumed run restores the compressed layers.

Slices of fused expert parameters are pruned as dense weights (zeros kept in the 3-D parameter): there is
no compressed fused-expert module yet, and the report says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.algorithms.prune.common import LayerPruneInfo, PruneReport, sparse_module
from modelpress.algorithms.prune.magnitude import magnitude_mask
from modelpress.algorithms.prune.masks import NMPattern
from modelpress.algorithms.prune.sparsegpt import SparseGPTConfig, pack_kept, reconstruction_error, sparsegpt_prune
from modelpress.algorithms.prune.wanda import SquaredNormSum, WandaConfig, wanda_mask
from modelpress.algorithms.quantize.gptq import HessianSum
from modelpress.engine.algorithm import InputGroup, LayerSolution, LayerTarget
from modelpress.engine.blocks import BlockStack, find_blocks
from modelpress.engine.distributed import Ranks
from modelpress.engine.resume import config_description
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.formats.packed import PackedWeight
from modelpress.nn.layers import replace_module
from modelpress.nn.sparse_linear import scatter_dense


@dataclass
class _Pruned:
    mask: torch.Tensor
    values: torch.Tensor | PackedWeight


@dataclass
class LayerPruner:
    """Shared plumbing: per-group statistics, N:M shape checks, and the swap to SparseLinear."""

    stack: BlockStack
    sparsity: float
    pattern: NMPattern | None
    compress: bool
    config: WandaConfig | SparseGPTConfig | None = None   # every field enters describe() (the resume check)
    _stats: dict = field(default_factory=dict)
    _pending: dict[str, _Pruned] = field(default_factory=dict)

    sequential = False

    def solve(self, group: InputGroup) -> list[LayerSolution]:
        stats = self._stats.pop(group.key, None)
        return [self._solve_one(target, stats) for target in group.targets]

    def _solve_one(self, target: LayerTarget, stats) -> LayerSolution:
        weight = target.weight.detach()
        dense_bytes = weight.numel() * weight.element_size()
        if self.pattern is not None and weight.shape[1] % self.pattern.m:
            return LayerSolution(weight.clone(), {"method": "dense", "dense_bytes": dense_bytes, "reason":
                                 f"{weight.shape[1]} inputs do not split into groups of {self.pattern.m}"})
        if stats is None or stats.rows == 0:
            mask = magnitude_mask(weight, self.sparsity, self.pattern)
            pruned = _Pruned(mask, weight[mask])
            notes = {"method": "magnitude", "reason": "no calibration tokens reached this layer"}
        else:
            pruned, notes = self.prune(target, stats)
        self._pending[target.name] = pruned
        notes["dense_bytes"] = dense_bytes
        values = pruned.values
        kept = values.dequantize(weight.dtype).reshape(-1) if isinstance(values, PackedWeight) else values
        return LayerSolution(scatter_dense(pruned.mask, kept, weight.dtype), notes, payload=pruned)

    def reduce(self, group: InputGroup, ranks: Ranks) -> None:
        """Data-parallel runs: the group's statistics summed over ranks (a rank that saw none adds zeros)."""
        weight = group.targets[0].weight
        self._stats.setdefault(group.key, self.empty_stats(weight.shape[-1], weight.device)).reduce(ranks)

    def adopt(self, group: InputGroup, solutions: list[LayerSolution]) -> None:
        """Masks of a group another rank solved, for finish_block's swap to SparseLinear."""
        for target, solution in zip(group.targets, solutions):
            self._pending[target.name] = solution.payload  # type: ignore[assignment]

    def empty_stats(self, k: int, device: torch.device):
        raise NotImplementedError(f"{type(self).__name__} must implement empty_stats")

    def prune(self, target: LayerTarget, stats) -> tuple[_Pruned, dict]:
        """Each calibrated pruner (Wanda, SparseGPT) supplies its own rule."""
        raise NotImplementedError(f"{type(self).__name__} must implement prune")

    def finish_block(self, block_index: int) -> None:
        self._stats.clear()
        pending, self._pending = self._pending, {}
        if not self.compress:
            return
        block = self.stack.blocks[block_index]
        linears = dict(block.named_modules())
        for name, pruned in pending.items():
            module = linears.get(name)
            if module is None:  # a slice of a fused expert parameter: stays dense
                continue
            replace_module(block, name, sparse_module(module, pruned.mask, pruned.values, self.pattern))


@dataclass
class WandaPruner(LayerPruner):
    def describe(self) -> str:
        return config_description("wanda", self.config)

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        acc = self._stats.get(group.key)
        if acc is None:
            acc = self._stats[group.key] = SquaredNormSum(inputs.shape[-1], inputs.device)
        acc.add(inputs)

    def empty_stats(self, k: int, device: torch.device) -> SquaredNormSum:
        return SquaredNormSum(k, device)

    def prune(self, target: LayerTarget, stats: SquaredNormSum) -> tuple[_Pruned, dict]:
        weight = target.weight.detach()
        mask = wanda_mask(weight, stats.norm(), self.sparsity, self.pattern)
        return _Pruned(mask, weight[mask]), {"method": "wanda", "calibration_rows": stats.rows}


@dataclass
class SparseGPTPruner(LayerPruner):
    @property
    def sequential(self) -> bool:  # type: ignore[override]
        return self.config.true_sequential  # type: ignore[union-attr]

    def describe(self) -> str:
        return config_description("sparsegpt", self.config)

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        k = inputs.shape[-1]
        acc = self._stats.get(group.key)
        if acc is None:
            acc = self._stats[group.key] = HessianSum.zeros(k, inputs.device)
        acc.add(inputs)

    def empty_stats(self, k: int, device: torch.device) -> HessianSum:
        return HessianSum.zeros(k, device)

    def solve(self, group: InputGroup) -> list[LayerSolution]:
        stats = self._stats.get(group.key)
        self._hessian = None if stats is None or stats.rows == 0 else stats.mean()
        self._joint = {}
        try:
            if self._hessian is not None:
                self._solve_jointly(group.targets)
            return super().solve(group)
        finally:
            self._hessian, self._joint = None, {}

    def _solve_jointly(self, targets: tuple[LayerTarget, ...]) -> None:
        """Layers reading one input share H: one sweep over their stacked rows (one Cholesky factor, K column
        steps instead of K per layer). A per-tensor scale belongs to one layer, so those go one by one, and
        layers an N:M pattern cannot tile are left to `_solve_one`."""
        c = self.config
        k = targets[0].weight.shape[1]
        if self.pattern is not None and k % self.pattern.m:
            return
        batches = [list(targets)] if c.scheme is None or c.scheme.granularity != "tensor" else [[t] for t in targets]  # type: ignore[union-attr]
        for batch in batches:
            start = time.perf_counter()
            weights = [t.weight.detach().float() for t in batch]
            result = sparsegpt_prune(torch.cat(weights), self._hessian, self.sparsity, self.pattern, c.scheme,  # type: ignore[union-attr, arg-type]
                                     c.block_size, c.damp, row_splits=tuple(w.shape[0] for w in weights))  # type: ignore[union-attr]
            seconds = round(time.perf_counter() - start, 3)
            row = 0
            for target, weight in zip(batch, weights):
                self._joint[target.name] = (result.rows(row, row + weight.shape[0]), seconds, len(batch))
                row += weight.shape[0]

    def prune(self, target: LayerTarget, stats: HessianSum) -> tuple[_Pruned, dict]:
        c = self.config
        weight = target.weight.detach()
        result, seconds, stacked = self._joint[target.name]
        notes = {"method": "sparsegpt", "calibration_rows": stats.rows, "seconds": seconds, "solved_with": stacked,
                 "objective": reconstruction_error(weight, result.weight, self._hessian)}  # type: ignore[arg-type]
        if c.scheme is None:  # type: ignore[union-attr]
            return _Pruned(result.mask, result.weight[result.mask].to(weight.dtype)), notes
        packed = pack_kept(result, c.scheme, self.sparsity, self.pattern, name=f"layer {target.name}")  # type: ignore[union-attr]
        return _Pruned(result.mask, packed), notes


def prune_calibrated(model: nn.Module, config: WandaConfig | SparseGPTConfig, calibration_ids: torch.Tensor,
                     device: str | torch.device = "cpu", resume_dir: str | None = None, batch_size: int = 8
                     ) -> PruneReport:
    """Prune every linear layer in `model`'s repeated blocks (in place) with Wanda or SparseGPT."""
    start = time.perf_counter()
    stack = find_blocks(model)
    common = {"stack": stack, "sparsity": config.sparsity, "pattern": config.pattern, "compress": config.compress}
    if isinstance(config, SparseGPTConfig):
        algorithm: LayerPruner = SparseGPTPruner(**common, config=config)
        method = "sparsegpt" + (f"+{config.scheme.spec}" if config.scheme else "")
    else:
        algorithm = WandaPruner(**common, config=config)
        method = "wanda"
    run = run_sequential(model, algorithm, calibration_ids, device, resume_dir=resume_dir,
                         settings=EngineSettings(batch_size=batch_size, skip=config.skip))
    report = PruneReport(method, config.spec, seconds=time.perf_counter() - start,
                         extra={"calibration_samples": int(calibration_ids.shape[0]),
                                "calibration_seq_len": int(calibration_ids.shape[1]),
                                "unobserved_layers": run.unobserved, "resumed_from_block": run.resumed_from_block})
    modules = dict(model.named_modules())
    for name, notes in run.notes.items():
        module = modules.get(name)
        if notes.get("method") == "dense":
            report.skipped[name] = notes.get("reason", "")
        elif module is not None and hasattr(module, "nnz"):
            report.layers[name] = LayerPruneInfo(module.nnz, module.out_features * module.in_features,
                                                 module.weight_nbytes, notes["dense_bytes"], notes)
        else:  # left dense: compress=False, or a fused expert slice
            dense = notes["dense_bytes"]
            weight = _dense_weight(model, name)
            report.layers[name] = LayerPruneInfo(int((weight != 0).sum()), weight.numel(), dense, dense, notes)
    return report


def _dense_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The current weight of a linear layer, or of one expert slice ("...experts.down_proj.3")."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name].weight
    path, _, index = name.rpartition(".")
    owner, _, param = path.rpartition(".")
    return getattr(modules[owner], param)[int(index)]
