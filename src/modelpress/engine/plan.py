"""How the targets of one block depend on each other, learned by running the block once.

One traced forward (with autograd recording, on one calibration batch) shows, for every target call,
which tensor it read and which earlier target outputs that tensor was computed from. From that:
- input groups: targets that read the very same tensor (q/k/v; gate/up) share one set of statistics;
- levels: 0 for targets whose input depends on no other target, else 1 + the deepest level they depend on
  (Llama: q/k/v 0, o 1, gate/up 2, down 3; GPT-2: c_attn 0, attn.c_proj 1, c_fc 2, mlp.c_proj 3);
- early stops: level L can be observed without finishing the block when, in call order, every call of
  level <= L comes before every call of a deeper level (not so in an eager expert loop, which alternates
  up and down projections expert by expert). The forward then ends as soon as each group of level L has
  read its input as often as in the trace (or, failing that, at the first call of a deeper level).
Targets never called in the trace (experts no trace token was routed to) take the level of their fused
parameter, or the deepest level, and form groups of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelpress.engine.algorithm import InputGroup
from modelpress.engine.capture import BlockCall, run_block
from modelpress.engine.targets import BlockTargets, ExpertCallWatcher


@dataclass(frozen=True)
class BlockPlan:
    groups: tuple[InputGroup, ...]
    levels: tuple[int, ...]
    early_stop: frozenset[int]           # levels whose observation may stop the block early
    calls: dict[str, int]                # how often each group's input was read in the traced forward

    def at_level(self, level: int) -> list[InputGroup]:
        return [g for g in self.groups if g.level == level]

    def level_of(self) -> dict[str, int]:
        return {t.name: g.level for g in self.groups for t in g.targets}


@dataclass
class _Call:
    name: str
    inputs: torch.Tensor
    output: torch.Tensor


def _record_calls(block: nn.Module, targets: BlockTargets, hidden: torch.Tensor, call: BlockCall) -> list[_Call]:
    calls: list[_Call] = []
    handles = []
    for name, module in targets.linears.items():
        def hook(_module, args, output, name=name):
            calls.append(_Call(name, args[0], output))
        handles.append(module.register_forward_hook(hook))
    watcher = ExpertCallWatcher(block, targets, after=lambda name, x, out: calls.append(_Call(name, x, out)))
    start = hidden.detach().clone().requires_grad_(hidden.is_floating_point())
    try:
        with torch.enable_grad(), watcher:
            run_block(block, start, call)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _depends_on(inputs: torch.Tensor, producers: dict[object, int]) -> set[int]:
    """Indices of recorded calls whose output nodes the autograd graph of `inputs` reaches, stopping at
    each one found (deeper producers are covered by its level)."""
    found: set[int] = set()
    root = inputs.grad_fn
    if root is None:
        return found
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in producers:
            found.add(producers[node])
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def plan_block(block: nn.Module, targets: BlockTargets, hidden: torch.Tensor, call: BlockCall) -> BlockPlan:
    calls = _record_calls(block, targets, hidden, call)
    producers = {c.output.grad_fn: i for i, c in enumerate(calls) if c.output.grad_fn is not None}
    call_level: list[int] = []
    for c in calls:
        deps = _depends_on(c.inputs, producers)
        call_level.append(1 + max((call_level[d] for d in deps), default=-1))
    level: dict[str, int] = {}
    for c, lv in zip(calls, call_level):
        level[c.name] = max(level.get(c.name, 0), lv)
    # every slice of a fused parameter sits at the parameter's level
    deepest = max(call_level, default=0)
    for fused in targets.expert_params:
        names = [n for n, (f, _) in targets.experts.items() if f == fused]
        seen_levels = [level[n] for n in names if n in level]
        for n in names:
            level[n] = max(seen_levels, default=deepest)
    for name in targets.names():
        level.setdefault(name, deepest)

    # input groups: same input tensor object in the trace; uncalled targets alone
    by_input: dict[int, list[str]] = {}
    order: list[str] = []
    for c in calls:
        members = by_input.setdefault(id(c.inputs), [])
        if c.name not in members and c.name not in order:
            members.append(c.name)
            order.append(c.name)
    groups_names = [m for m in by_input.values() if m] + [[n] for n in targets.names() if n not in order]
    groups = tuple(
        InputGroup(key=names[0], targets=tuple(targets.target(block, n) for n in names), level=level[names[0]])
        for names in groups_names
    )
    levels = tuple(sorted({g.level for g in groups}))
    early = set()
    for lv in levels:
        last_le = max((i for i, x in enumerate(call_level) if x <= lv), default=-1)
        first_gt = min((i for i, x in enumerate(call_level) if x > lv), default=len(call_level))
        if last_le < first_gt < len(call_level):
            early.add(lv)
    reads = {g.key: sum(1 for c in calls if c.name == g.key) for g in groups}
    return BlockPlan(groups, levels, frozenset(early), reads)
