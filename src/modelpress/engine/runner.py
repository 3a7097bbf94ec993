"""The sequential engine: compress a model block by block with calibration data, one block on the device
at a time.

    capture block inputs ──► for each block:  move to device → plan (groups, levels) →
        for each level: run the block over all batches, hooks feed algorithm.observe → algorithm.solve →
                        swap in the results
        → run the block again to get the next block's inputs → move back → (save for resume)

Layers outside the repeated blocks (a BERT pooler, a detached head) are not touched here; callers decide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.engine.algorithm import InputGroup, LayerAlgorithm, LayerSolution
from modelpress.engine.blocks import BlockStack, find_blocks
from modelpress.engine.capture import BlockCall, capture_inputs, run_block
from modelpress.engine.context import BlockContext
from modelpress.engine.plan import BlockPlan, plan_block
from modelpress.engine.resume import ResumeState, ResumeStore, run_fingerprint
from modelpress.engine.targets import BlockTargets, ExpertCallWatcher, apply_dense, find_targets, install_compressed
from modelpress.errors import ModelpressError
from modelpress.nn.layers import DEFAULT_SKIP
from modelpress.nn.quant_experts import QuantExperts
from modelpress.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    batch_size: int = 8                       # calibration samples per block forward
    skip: tuple[str, ...] = DEFAULT_SKIP      # layer name patterns left alone

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ModelpressError(f"calibration batch size must be positive, got {self.batch_size}")


@dataclass
class RunReport:
    blocks: int
    block_path: str
    layers: int                                       # targets solved (expert slices counted one by one)
    unobserved: list[str]                             # targets no calibration token reached
    notes: dict[str, dict] = field(default_factory=dict)   # per target, from the algorithm
    resumed_from_block: int | None = None
    seconds: float = 0.0


class _StopBlock(Exception):
    """Raised inside a block once everything the current level needs has been observed."""


def run_sequential(model: nn.Module, algorithm: LayerAlgorithm, calibration_ids: torch.Tensor,
                   device: str | torch.device = "cpu", resume_dir: str | None = None,
                   settings: EngineSettings = EngineSettings()) -> RunReport:
    """Compress `model`'s blocks in place with `algorithm`, from calibration token ids (n, seq_len)."""
    start = time.perf_counter()
    device = torch.device(device)
    if calibration_ids.dim() != 2 or calibration_ids.shape[0] == 0:
        raise ModelpressError(f"calibration ids must be (samples, seq_len) with samples > 0, got "
                              f"{tuple(calibration_ids.shape)}")
    stack = find_blocks(model)
    has_experts = any(find_targets(b, settings.skip).expert_params for b in stack.blocks)
    if has_experts:
        QuantExperts.prepare_model(model)   # the eager expert loop is what lets experts be observed one by one
    store = ResumeStore(resume_dir) if resume_dir is not None else None
    state = ResumeState(run_fingerprint(algorithm.describe(), stack.path, len(stack), calibration_ids,
                                        settings.batch_size, settings, getattr(algorithm, "config", None)))
    if store is not None:
        state = store.load(state.fingerprint)
    report = RunReport(len(stack), stack.path, 0, list(state.unobserved), dict(state.notes),
                       resumed_from_block=state.blocks_done or None)

    with torch.no_grad():
        captured = capture_inputs(model, stack, calibration_ids, device, settings.batch_size)
        hidden = captured.hidden
        for index in range(state.blocks_done):
            store.restore_block(state, index, stack.blocks[index])  # type: ignore[union-attr]
        if state.blocks_done:
            hidden = store.load_hidden(state, device)  # type: ignore[union-attr]
    report.layers = len(report.notes)

    for index in range(state.blocks_done, len(stack)):
        block = stack.blocks[index]
        home = next(block.parameters()).device
        block.to(device)
        calls = captured.calls[index]
        targets, solved, unobserved = _compress_block(stack, index, algorithm, hidden, calls, settings)
        with torch.no_grad():
            hidden = [run_block(block, h, c) for h, c in zip(hidden, calls)]
        install_compressed(block, targets, solved)
        algorithm.finish_block(index)
        block.to(home)
        prefix = stack.block_name(index)
        for name, solution in solved.items():
            report.notes[f"{prefix}.{name}"] = solution.notes
        report.unobserved += [f"{prefix}.{name}" for name in unobserved]
        report.layers += len(solved)
        if store is not None:
            state.notes, state.unobserved = report.notes, report.unobserved
            store.commit_block(state, index, block, hidden)
    report.seconds = time.perf_counter() - start
    return report


def _compress_block(stack: BlockStack, index: int, algorithm: LayerAlgorithm, hidden: list[torch.Tensor],
                    calls: list[BlockCall], settings: EngineSettings
                    ) -> tuple[BlockTargets, dict[str, LayerSolution], list[str]]:
    """Solve every target of block `index` (solved layers hold their dequantized weights afterwards);
    returns the targets, the solutions by name and the targets never observed."""
    block = stack.blocks[index]
    targets = find_targets(block, settings.skip)
    if not targets.names():
        return targets, {}, []
    plan = plan_block(block, targets, hidden[0], calls[0])
    prepare = getattr(algorithm, "prepare_block", None)   # optional: whole-block edits before any layer is solved
    if prepare is not None:
        with torch.no_grad():
            prepare(BlockContext(index, block, targets, plan, hidden, calls))
    levels = plan.levels if algorithm.sequential else (None,)
    steps = len(levels) * len(hidden)
    desc = f"block {index + 1}/{len(stack)}"
    solved: dict[str, LayerSolution] = {}
    unobserved: list[str] = []
    work = _block_steps(block, targets, plan, levels, algorithm, hidden, calls, solved, unobserved)
    for _ in progress(work, desc=desc, total=steps):
        pass
    return targets, solved, unobserved


def _block_steps(block: nn.Module, targets: BlockTargets, plan: BlockPlan, levels: tuple, algorithm: LayerAlgorithm,
                 hidden: list[torch.Tensor], calls: list[BlockCall], solved: dict[str, LayerSolution],
                 unobserved: list[str]) -> Iterator[None]:
    """Observe and solve level by level (or everything at once when `levels` is (None,)); yields per batch."""
    for level in levels:
        groups = plan.groups if level is None else plan.at_level(level)
        rows = {g.key: 0 for g in groups}
        stop_after = level if level is not None and level in plan.early_stop else None
        with _observing(block, targets, plan, groups, algorithm, rows, stop_after) as observing, torch.no_grad():
            for h, c in zip(hidden, calls):
                observing.new_forward()
                try:
                    run_block(block, h, c)
                except _StopBlock:
                    pass
                yield None
        for group in groups:
            # refresh weights: earlier levels may have changed modules this group reads from
            fresh = InputGroup(group.key, tuple(targets.target(block, t.name) for t in group.targets), group.level)
            solutions = algorithm.solve(fresh)
            if len(solutions) != len(fresh.targets):
                raise ModelpressError(f"algorithm returned {len(solutions)} solutions for {len(fresh.targets)} layers")
            for target, solution in zip(fresh.targets, solutions):
                solved[target.name] = solution
                if rows[group.key] == 0:
                    unobserved.append(target.name)
        apply_dense(block, targets, {t.name: solved[t.name] for g in groups for t in g.targets})


class _observing:
    """Hooks for one observation pass: leaders of the given groups feed the algorithm. With `stop_after`
    (a level that allows early stops) the block forward ends once every group of the level has read its
    input, or at the first call of a deeper level."""

    def __init__(self, block: nn.Module, targets: BlockTargets, plan: BlockPlan, groups: list[InputGroup],
                 algorithm: LayerAlgorithm, rows: dict[str, int], stop_after: int | None) -> None:
        self.block, self.targets, self.algorithm, self.rows = block, targets, algorithm, rows
        self.leaders = {g.key: g for g in groups}
        self.level_of = plan.level_of()
        self.stop_after = stop_after
        self.expected = plan.calls
        self.reads: dict[str, int] = {}
        self.handles: list = []
        self.watcher: ExpertCallWatcher | None = None

    def _before(self, name: str, inputs: torch.Tensor) -> None:
        if self.stop_after is not None and self.level_of.get(name, 0) > self.stop_after:
            raise _StopBlock
        group = self.leaders.get(name)
        if group is None:
            return
        self.rows[name] += inputs.numel() // max(inputs.shape[-1], 1)
        self.algorithm.observe(group, inputs)
        if self.stop_after is not None:
            self.reads[name] = self.reads.get(name, 0) + 1
            if all(self.reads.get(key, 0) >= self.expected.get(key, 1) for key in self.leaders):
                raise _StopBlock  # everything this level reads has been seen: the rest of the block is not needed

    def new_forward(self) -> None:
        self.reads = {}

    def __enter__(self) -> _observing:
        for name, module in self.targets.linears.items():
            if name in self.leaders or (self.stop_after is not None and self.level_of.get(name, 0) > self.stop_after):
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, args, name=name: self._before(name, args[0])))
        if self.targets.expert_params:
            self.watcher = ExpertCallWatcher(self.block, self.targets, before=self._before)
            self.watcher.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        if self.watcher is not None:
            self.watcher.__exit__(*exc)
