"""What the sequential engine asks of a layer algorithm (GPTQ, AWQ, SparseGPT, ...), and what it hands over.

The engine knows blocks, hooks and devices; the algorithm knows statistics and math. Per block:
1. `observe(group, inputs)` for every calibration batch: `inputs` (..., in_features) is what the layers of
   `group` read (layers that read the very same tensor, e.g. q/k/v, form one group and are observed once);
2. `solve(group)` once observation is complete: one LayerSolution per target, in the group's order;
3. `finish_block(index)` after the block is done, to drop statistics.
With `sequential = True` the engine solves the block's layers level by level (q/k/v, then o, then
gate/up, then down, found from data dependencies), re-running the block in between so that each level is
observed with the earlier levels already compressed.
Optionally, `prepare_block(context)` (engine/context.py) runs once per block before step 1, for
algorithms that edit the block as a whole first (AWQ, SmoothQuant: per-channel scales folded into the
norm or linear layer that produces a group's input).
Data-parallel runs (engine/distributed.py) add two optional steps, both skipped in a single process:
- `reduce(group, ranks)` after a level's observation: make the group's statistics the sum over ranks
  (`ranks.sum_(tensor)`, row counts with `ranks.sum_ints`); without it the algorithm's statistics must
  need no reduction (prepare_block reduced them itself, or there are none);
- `adopt(group, solutions)` on every rank that did not solve the group itself: keep whatever `solve`
  would have kept (pruners remember masks for `finish_block`); `LayerSolution.payload` carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from modelpress.formats.packed import PackedWeight


@dataclass(frozen=True)
class LayerTarget:
    """One weight matrix the algorithm may change: an nn.Linear / Conv1D, or one expert's slice of a fused
    (experts, out, in) parameter. `weight` is the live (out_features, in_features) weight; do not modify it."""

    name: str                        # path inside the block, e.g. "self_attn.q_proj", "mlp.experts.down_proj.3"
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class InputGroup:
    """Targets of one block that read the same input tensor; one set of statistics serves all of them."""

    key: str                         # the first target's name
    targets: tuple[LayerTarget, ...]
    level: int                       # dependency depth inside the block: 0 reads the block input's branch


@dataclass
class LayerSolution:
    """A packed weight (quantization) or a dense replacement weight (out, in) (pruning, smoothing), with notes
    for the report (method used, objective, why a fallback happened)."""

    value: PackedWeight | torch.Tensor
    notes: dict = field(default_factory=dict)
    payload: object = None           # the algorithm's own data for `adopt` on other ranks (plain tensors only)


class LayerAlgorithm(Protocol):
    sequential: bool

    def describe(self) -> str:
        """One line naming the algorithm and every setting that changes its result (checked on resume)."""
        ...

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None: ...

    def solve(self, group: InputGroup) -> list[LayerSolution]: ...

    def finish_block(self, block_index: int) -> None: ...
