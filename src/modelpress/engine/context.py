"""What an algorithm's optional `prepare_block(context)` sees: one block, on the calibration device, before
any of its layers is observed or solved.

Algorithms that change a block as a whole before its layers are compressed (AWQ and SmoothQuant move
per-channel scales between a norm or linear layer and the layers reading its output) implement
`prepare_block`; the engine calls it, when present, right after planning the block. The algorithm may run
the block on the calibration batches (`outputs`) and edit float weights in place, as long as it leaves
every target a module the engine can still observe and replace (no swapping of modules here).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.engine.capture import BlockCall, run_block
from modelpress.engine.distributed import Ranks
from modelpress.engine.plan import BlockPlan
from modelpress.engine.targets import BlockTargets


@dataclass(frozen=True)
class BlockContext:
    index: int                      # position in the block stack
    block: nn.Module                # already on the calibration device
    targets: BlockTargets
    plan: BlockPlan
    hidden: Sequence[torch.Tensor]  # per batch: the block's input hidden states (on the device when read)
    calls: list[BlockCall]          # per batch: the block's other arguments
    ranks: Ranks = Ranks()          # data-parallel runs: hidden/calls are this rank's share of the batches;
                                    # statistics gathered here must be reduced over ranks (engine/distributed.py)

    def outputs(self, batches: int | None = None) -> Iterator[torch.Tensor]:
        """The block's output hidden states, batch by batch (the first `batches` only, if given)."""
        with torch.no_grad():
            for h, c in islice(zip(self.hidden, self.calls), batches):
                yield run_block(self.block, h, c)
