"""The sequential engine: compress a model block by block with calibration data, one block on the device
at a time.

    capture block inputs ──► for each block:  move to device → plan (groups, levels) →
        for each level: run the block over all batches, hooks feed algorithm.observe → algorithm.solve →
                        swap in the results
        → run the block again to get the next block's inputs → move back → (save for resume)

Layers outside the repeated blocks (a BERT pooler, a detached head) are not touched here; callers decide.

Under torchrun (engine/distributed.py) every rank runs this same loop on its share of the calibration
batches: statistics are reduced across ranks after each observation pass, the solves of a level are split
across ranks and broadcast, so every rank installs the same weights and carries its own batches' hidden
states to the next block. Rank 0 writes the shared resume files; each rank writes its own hidden states.

Blocks may live on disk instead of in memory (engine/stream.py): a `BlockSource` materializes block i
before it is compressed and releases it afterwards, so host memory holds about one block at a time.

An algorithm with `reference_inputs = True` is also shown what each layer reads in the *float* model on the
same tokens (GPTQ's `float_target`): the engine then carries a second stream of hidden states through float
copies of the blocks, runs the float copy before each observation pass, and pairs its layers' inputs with the
compressed block's, call by call. Layers whose calls cannot be paired (experts: routing differs between the
two models) get no reference.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.engine.algorithm import InputGroup, LayerAlgorithm, LayerSolution
from modelpress.engine.blocks import BlockStack, find_blocks, hidden_width
from modelpress.engine.capture import BlockCall, capture_inputs, run_block
from modelpress.engine.context import BlockContext
from modelpress.engine.distributed import Ranks
from modelpress.engine.plan import BlockPlan, plan_block
from modelpress.engine.states import HostStates, carry, current_policy, offload_decision, peak_streams, stored
from modelpress.engine.stream import BlockSource, source_of
from modelpress.engine.resume import ResumeState, ResumeStore, run_fingerprint
from modelpress.engine.targets import BlockTargets, ExpertCallWatcher, apply_dense, find_targets, install_compressed
from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight
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
    offloaded: bool = False                           # hidden states carried in host memory (engine/states.py)


class _StopBlock(Exception):
    """Raised inside a block once everything the current level needs has been observed."""


def run_sequential(model: nn.Module, algorithm: LayerAlgorithm, calibration_ids: torch.Tensor,
                   device: str | torch.device = "cpu", resume_dir: str | None = None,
                   settings: EngineSettings = EngineSettings(), source: BlockSource | None = None,
                   offload: bool | None = None) -> RunReport:
    """Compress `model`'s blocks in place with `algorithm`, from calibration token ids (n, seq_len).
    `source` (engine/stream.py): where blocks come from and go to when they are not all held in memory.
    `offload`: keep the hidden states carried between blocks in host memory (engine/states.py); None takes
    the surrounding `offload_policy`, else decides by the device's free memory (CUDA only) and says so when
    it offloads. The results do not depend on it."""
    start = time.perf_counter()
    device = torch.device(device)
    if calibration_ids.dim() != 2 or calibration_ids.shape[0] == 0:
        raise ModelpressError(f"calibration ids must be (samples, seq_len) with samples > 0, got "
                              f"{tuple(calibration_ids.shape)}")
    ranks = Ranks.active()
    batches = calibration_ids.split(settings.batch_size)
    if len(batches) < ranks.world:
        raise ModelpressError(f"{len(batches)} calibration batches for {ranks.world} ranks: every rank needs at "
                              f"least one; use a smaller calibration batch size or more samples")
    source = source or source_of(model)
    stack = find_blocks(model)
    has_experts = any(find_targets(b, settings.skip).expert_params for b in stack.blocks)
    if has_experts:
        QuantExperts.prepare_model(model)   # the eager expert loop is what lets experts be observed one by one
    store = ResumeStore(resume_dir, ranks) if resume_dir is not None else None
    state = ResumeState(run_fingerprint(algorithm.describe(), stack.path, len(stack), calibration_ids,
                                        settings.batch_size, settings, getattr(algorithm, "config", None),
                                        ranks=ranks.world))
    if store is not None:
        state = store.load(state.fingerprint)
    with_reference = bool(getattr(algorithm, "reference_inputs", False))
    mine = torch.cat(ranks.share(batches))
    if offload is None:
        offload = current_policy()
    if offload is None:
        offload, why = _offload_rule(model, stack, mine, device, with_reference)
        if offload:
            log.warning("%s", why)
    report = RunReport(len(stack), stack.path, 0, list(state.unobserved), dict(state.notes),
                       resumed_from_block=state.blocks_done or None, offloaded=offload)

    def keep(states: Iterable[torch.Tensor]) -> Sequence[torch.Tensor]:   # where this run holds a stream
        return carry(states, device, offload)

    with torch.no_grad():
        with source.holding(stack, 0):
            captured = capture_inputs(model, stack, mine, device, settings.batch_size, host=offload)
        hidden = keep(captured.hidden)
        reference = hidden[:] if with_reference else None   # the float model's: the same at block 0
        for index in range(state.blocks_done):
            with source.holding(stack, index, keep=True):
                store.restore_block(state, index, stack.blocks[index])  # type: ignore[union-attr]
        if state.blocks_done:
            hidden = keep(store.load_hidden(state, "cpu" if offload else device))  # type: ignore[union-attr]
            if with_reference:     # saved after the compressed model's (see commit_block below)
                hidden, reference = hidden[: len(hidden) // 2], hidden[len(hidden) // 2 :]
    report.layers = len(report.notes)

    for index in range(state.blocks_done, len(stack)):
        with source.holding(stack, index, keep=True):
            block = stack.blocks[index]
            home = next(block.parameters()).device
            block.to(device)
            calls = captured.calls[index]
            targets, solved, unobserved, reference = _compress_block(stack, index, algorithm, hidden, calls,
                                                                     settings, ranks, reference, keep)
            with torch.no_grad():
                hidden = keep(run_block(block, h, c) for h, c in zip(hidden, calls))
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
                store.commit_block(state, index, block, stored(hidden) + stored(reference))
    report.seconds = time.perf_counter() - start
    return report


def _offload_rule(model: nn.Module, stack: BlockStack, ids: torch.Tensor, device: torch.device,
                  with_reference: bool) -> tuple[bool, str | None]:
    """engine/states.py's rule, from the sizes known before any block runs: the block's input width (the
    embedding's), the blocks' element size and parameter count."""
    first = stack.blocks[0]
    param = next((p for p in first.parameters() if p.is_floating_point()), None)
    width = hidden_width(model)
    if param is None or width is None:
        return False, None
    stream = ids.numel() * width * param.element_size()
    block = sum(p.numel() * p.element_size() for p in first.parameters()) * (2 if with_reference else 1)
    return offload_decision(device, stream, peak_streams(with_reference), block)


Keep = Callable[[Iterable[torch.Tensor]], Sequence[torch.Tensor]]


def _compress_block(stack: BlockStack, index: int, algorithm: LayerAlgorithm, hidden: Sequence[torch.Tensor],
                    calls: list[BlockCall], settings: EngineSettings, ranks: Ranks = Ranks(),
                    reference: Sequence[torch.Tensor] | None = None, keep: Keep = list
                    ) -> tuple[BlockTargets, dict[str, LayerSolution], list[str], Sequence[torch.Tensor] | None]:
    """Solve every target of block `index` (solved layers hold their dequantized weights afterwards);
    returns the targets, the solutions by name, the targets never observed and, given the float model's
    input hidden states `reference`, its output ones (the next block's reference, held by `keep`)."""
    block = stack.blocks[index]
    targets = find_targets(block, settings.skip)
    if not targets.names():
        return targets, {}, [], _float_outputs(block, reference, calls, keep)
    plan = plan_block(block, targets, hidden[0], calls[0])
    prepare = getattr(algorithm, "prepare_block", None)   # optional: whole-block edits before any layer is solved
    if prepare is not None:
        with torch.no_grad():
            prepare(BlockContext(index, block, targets, plan, hidden, calls, ranks))
    # the float block, after prepare_block's edits (they keep its function but may rescale a layer's input:
    # its float input must be in the same coordinates as the compressed block's)
    original = None if reference is None else _FloatBlock(copy.deepcopy(block), settings.skip, reference, calls, keep)
    levels = plan.levels if algorithm.sequential else (None,)
    steps = len(levels) * len(hidden)
    desc = f"block {index + 1}/{len(stack)}"
    solved: dict[str, LayerSolution] = {}
    unobserved: list[str] = []
    work = _block_steps(block, targets, plan, levels, algorithm, hidden, calls, solved, unobserved, ranks, original)
    for _ in progress(work, desc=desc, total=steps):
        pass
    return targets, solved, unobserved, None if original is None else original.outputs()


def _float_outputs(block: nn.Module, hidden: Sequence[torch.Tensor] | None, calls: list[BlockCall],
                   keep: Keep = list) -> Sequence[torch.Tensor] | None:
    if hidden is None:
        return None
    with torch.no_grad():
        return keep(run_block(block, h, c) for h, c in zip(hidden, calls))


class _FloatBlock:
    """A float copy of the block being compressed, on its own (float) hidden states: what each layer reads
    in the float model, batch by batch, for algorithms with `reference_inputs`."""

    def __init__(self, block: nn.Module, skip: tuple[str, ...], hidden: Sequence[torch.Tensor],
                 calls: list[BlockCall], keep: Keep = list) -> None:
        self.block, self.hidden, self.calls, self.keep = block, hidden, calls, keep
        self.targets = find_targets(block, skip)

    def inputs(self, plan: BlockPlan, groups: list[InputGroup], batch: int, stop_after: int | None
               ) -> dict[str, list[torch.Tensor]]:
        """Per group key, the inputs its leader read in batch `batch`, call by call (dense layers only: an
        expert's tokens depend on routing, which quantization may change)."""
        seen: dict[str, list[torch.Tensor]] = {}
        dense = [g for g in groups if g.key in self.targets.linears]

        def keep(group: InputGroup, inputs: torch.Tensor, reference: torch.Tensor | None = None) -> None:
            seen.setdefault(group.key, []).append(inputs)

        rows = {g.key: 0 for g in dense}
        with _observing(self.block, self.targets, plan, dense, keep, rows, stop_after), torch.no_grad():
            try:
                run_block(self.block, self.hidden[batch], self.calls[batch])
            except _StopBlock:
                pass
        return seen

    def outputs(self) -> Sequence[torch.Tensor]:
        out = _float_outputs(self.block, self.hidden, self.calls, self.keep)
        del self.block
        return out  # type: ignore[return-value]


def _block_steps(block: nn.Module, targets: BlockTargets, plan: BlockPlan, levels: tuple, algorithm: LayerAlgorithm,
                 hidden: Sequence[torch.Tensor], calls: list[BlockCall], solved: dict[str, LayerSolution],
                 unobserved: list[str], ranks: Ranks, original: _FloatBlock | None = None) -> Iterator[None]:
    """Observe and solve level by level (or everything at once when `levels` is (None,)); yields per batch.
    With the float block `original`, each observation is paired with what the same call read there."""
    for level in levels:
        groups = plan.groups if level is None else plan.at_level(level)
        rows = {g.key: 0 for g in groups}
        stop_after = level if level is not None and level in plan.early_stop else None
        error = None
        try:
            with _observing(block, targets, plan, groups, algorithm.observe, rows, stop_after) as observing, \
                    torch.no_grad():
                for batch, (h, c) in enumerate(zip(hidden, calls)):
                    observing.new_forward(None if original is None else
                                          original.inputs(plan, groups, batch, stop_after))
                    try:
                        run_block(block, h, c)
                    except _StopBlock:
                        pass
                    observing.check_paired()
                    yield None
        except Exception as err:  # noqa: BLE001 - every rank raises it together in check()
            error = err
        ranks.check(error)
        if ranks.distributed:
            rows = dict(zip(rows, ranks.sum_ints(list(rows.values()))))
            reduce = getattr(algorithm, "reduce", None)
            if reduce is not None:
                for group in groups:
                    reduce(group, ranks)
        # refresh weights: earlier levels may have changed modules this group reads from
        fresh = [InputGroup(g.key, tuple(targets.target(block, t.name) for t in g.targets), g.level) for g in groups]
        device = hidden.device if isinstance(hidden, HostStates) else hidden[0].device
        for group, solutions in zip(fresh, _solve_groups(algorithm, fresh, ranks, device)):
            if len(solutions) != len(group.targets):
                raise ModelpressError(f"algorithm returned {len(solutions)} solutions for {len(group.targets)} layers")
            for target, solution in zip(group.targets, solutions):
                solved[target.name] = solution
                if rows[group.key] == 0:
                    unobserved.append(target.name)
        apply_dense(block, targets, {t.name: solved[t.name] for g in groups for t in g.targets})


def _solve_groups(algorithm: LayerAlgorithm, groups: list[InputGroup], ranks: Ranks, device: torch.device
                  ) -> list[list[LayerSolution]]:
    """Every group's solutions. Across ranks: each group solved by one rank (balanced by weight size) and
    broadcast from it; ranks that receive a group's solutions let the algorithm `adopt` them."""
    if not ranks.distributed:
        return [algorithm.solve(g) for g in groups]
    owners = ranks.assign([sum(t.weight.numel() * t.weight.shape[-1] for t in g.targets) for g in groups])
    mine: dict[int, list[LayerSolution]] = {}
    error = None
    try:
        for i, group in enumerate(groups):
            if owners[i] == ranks.rank:
                mine[i] = [_moved(s, torch.device("cpu")) for s in algorithm.solve(group)]
    except Exception as err:  # noqa: BLE001 - every rank raises it together in check()
        error = err
    ranks.check(error)
    found: dict[int, list[LayerSolution]] = {}
    for rank in range(ranks.world):
        found.update(ranks.broadcast(mine if rank == ranks.rank else None, src=rank))
    adopt = getattr(algorithm, "adopt", None)
    results = []
    for i, group in enumerate(groups):
        solutions = [_moved(s, device) for s in found[i]]
        if owners[i] != ranks.rank and adopt is not None:
            adopt(group, solutions)
        results.append(solutions)
    return results


def _moved(value: object, device: torch.device) -> object:
    """A solution (and the tensors, packed weights and dataclasses inside it) on `device`."""
    if isinstance(value, (torch.Tensor, PackedWeight)):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {f.name: _moved(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **moved)
    return value


class _observing:
    """Hooks for one observation pass: leaders of the given groups feed `observe(group, inputs)` (an
    algorithm's), or `observe(group, inputs, reference)` when the forward was given the float model's
    inputs of the same calls (`new_forward(reference)`). With `stop_after` (a level that allows early stops)
    the block forward ends once every group of the level has read its input, or at the first call of a
    deeper level."""

    def __init__(self, block: nn.Module, targets: BlockTargets, plan: BlockPlan, groups: list[InputGroup],
                 observe: Callable[..., None], rows: dict[str, int], stop_after: int | None) -> None:
        self.block, self.targets, self.observe, self.rows = block, targets, observe, rows
        self.leaders = {g.key: g for g in groups}
        self.level_of = plan.level_of()
        self.stop_after = stop_after
        self.expected = plan.calls
        self.reads: dict[str, int] = {}
        self.reference: dict[str, list[torch.Tensor]] | None = None
        self.handles: list = []
        self.watcher: ExpertCallWatcher | None = None

    def _before(self, name: str, inputs: torch.Tensor) -> None:
        if self.stop_after is not None and self.level_of.get(name, 0) > self.stop_after:
            raise _StopBlock
        group = self.leaders.get(name)
        if group is None:
            return
        self.rows[name] += inputs.numel() // max(inputs.shape[-1], 1)
        read = self.reads.get(name, 0)
        self.reads[name] = read + 1
        if self.reference is None:
            self.observe(group, inputs)
        else:
            self.observe(group, inputs, self._paired(name, read, inputs))
        if self.stop_after is not None and \
                all(self.reads.get(key, 0) >= self.expected.get(key, 1) for key in self.leaders):
            raise _StopBlock  # everything this level reads has been seen: the rest of the block is not needed

    def _paired(self, name: str, read: int, inputs: torch.Tensor) -> torch.Tensor | None:
        """The float model's input of this call (None for a layer without one: experts)."""
        found = self.reference.get(name)  # type: ignore[union-attr]
        if found is None and name not in self.targets.linears:
            return None
        if found is None or read >= len(found) or found[read].shape != inputs.shape:
            raise ModelpressError(f"layer {name}: call {read + 1} of the compressed block does not match the float "
                                  f"block's calls ({0 if found is None else len(found)} of them); a block whose "
                                  f"calls depend on its weights cannot be calibrated against the float model")
        return found[read]

    def new_forward(self, reference: dict[str, list[torch.Tensor]] | None = None) -> None:
        self.reads = {}
        self.reference = reference

    def check_paired(self) -> None:
        """After a forward with a reference: every float call was matched by one of the compressed block."""
        if self.reference is None:
            return
        for name, found in self.reference.items():
            if self.reads.get(name, 0) != len(found):
                raise ModelpressError(f"layer {name}: read {self.reads.get(name, 0)} times in the compressed block "
                                      f"and {len(found)} times in the float one")

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
