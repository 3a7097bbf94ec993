"""Finding, by structure, the widths of a block that structured pruning can cut.

One short forward of a block, with autograd recording, shows which linear layers produce the input of
which other linear layer ("producers" of a "consumer": q/k/v of the attention output projection, gate/up
of the MLP down projection). A consumer's input channels can be cut together with the matching output
rows of its producers when
- the channels are per token and per channel: input channel c of the consumer at the last position depends
  on channel c of the producers' outputs at that position only (an MLP: act(gate) * up), so any channel
  can go ("channels" unit); a norm or the residual stream in between mixes channels and is never cut;
- the consumer's input at the last position depends on earlier positions too (attention mixes tokens):
  only whole key/value groups can go, each group being a contiguous run of rows in every producer and of
  input columns in the consumer ("heads" unit; G groups split every producer's rows into G equal runs).
No names of modules or models are involved; the head size comes from the model's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modelpress.engine.capture import BlockCall, run_block
from modelpress.engine.plan import _depends_on as _producers  # the same walk of the autograd graph
from modelpress.errors import ModelpressError


@dataclass(frozen=True)
class Unit:
    kind: Literal["channels", "heads"]
    producers: tuple[str, ...]        # linear layers whose output rows are cut (names inside the block)
    consumer: str                     # linear layer whose input columns are cut


@dataclass
class _Call:
    name: str
    inputs: torch.Tensor
    output: torch.Tensor


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    found = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = module
        elif type(module).__name__ == "Conv1D":
            raise ModelpressError(f"structured pruning slices nn.Linear layers; {name} is a transposed Conv1D")
    return found


def _mixes_tokens(consumer_input: torch.Tensor, producer_outputs: list[torch.Tensor]) -> bool:
    """Does the consumer's input at the last position depend on producer outputs at earlier positions?"""
    if consumer_input.dim() < 3 or consumer_input.shape[-2] < 2:
        raise ModelpressError("structure tracing needs inputs of at least 2 tokens")
    grads = torch.autograd.grad(consumer_input[..., -1, :].sum(), producer_outputs, retain_graph=True,
                                allow_unused=True)
    return any(g is not None and bool(g[..., :-1, :].abs().sum() > 0) for g in grads)


def _channelwise(consumer_input: torch.Tensor, producer_outputs: list[torch.Tensor]) -> bool:
    """Does channel c of the consumer's input depend on channel c of each producer's output only (an
    elementwise path, as in act(gate) * up)? Checked for the first and the last channel. A norm or a
    residual stream in between (o_proj -> norm -> gate_proj) mixes channels and fails."""
    width = consumer_input.shape[-1]
    for channel in (0, width - 1):
        grads = torch.autograd.grad(consumer_input[..., -1, channel].sum(), producer_outputs, retain_graph=True,
                                    allow_unused=True)
        for g in grads:
            if g is None:
                continue
            if g.shape[-1] != width:
                return False
            touched = g[..., -1, :].abs().reshape(-1, width).sum(dim=0) > 0
            touched[channel] = False
            if bool(touched.any()):
                return False
    return True


def find_units(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> list[Unit]:
    """The cuttable widths of `block`, traced on one input (hidden states (B, T >= 2, D) and the block's
    other arguments)."""
    linears = block_linears(block)
    calls: list[_Call] = []
    handles = [m.register_forward_hook(lambda _m, args, out, name=name: calls.append(_Call(name, args[0], out)))
               for name, m in linears.items()]
    start = hidden.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            run_block(block, start, call)
            outputs = {c.output.grad_fn: i for i, c in enumerate(calls) if c.output.grad_fn is not None}
            units = []
            for c in calls:
                found = sorted(_producers(c.inputs, outputs))
                if not found:
                    continue
                names = tuple(dict.fromkeys(calls[i].name for i in found))
                if c.name in names:
                    continue  # a layer called twice on its own output: nothing to cut between them
                produced = [calls[i].output for i in found]
                if _mixes_tokens(c.inputs, produced):
                    units.append(Unit("heads", names, c.name))
                elif _channelwise(c.inputs, produced):
                    units.append(Unit("channels", names, c.name))
    finally:
        for handle in handles:
            handle.remove()
    return units


def check_channel_unit(unit: Unit, linears: dict[str, nn.Linear]) -> int:
    """Width of a channels unit: every producer's out_features must equal the consumer's in_features."""
    width = linears[unit.consumer].in_features
    for name in unit.producers:
        if linears[name].out_features != width:
            raise ModelpressError(f"cannot cut {unit.consumer}'s {width} inputs: its producer {name} has "
                                  f"{linears[name].out_features} outputs (a fused or reshaped projection)")
    return width


def check_head_unit(unit: Unit, linears: dict[str, nn.Linear], head_dim: int) -> int:
    """Number of key/value groups of a heads unit: the narrowest producer (keys/values) has one head per
    group; every producer's rows and the consumer's columns must split into that many equal runs."""
    narrowest = min(linears[name].out_features for name in unit.producers)
    if narrowest % head_dim:
        raise ModelpressError(f"{unit.producers}: {narrowest} outputs are not whole heads of {head_dim}")
    groups = narrowest // head_dim
    widths = [linears[name].out_features for name in unit.producers] + [linears[unit.consumer].in_features]
    if any(w % groups for w in widths):
        raise ModelpressError(f"attention layers {unit.producers} -> {unit.consumer} (widths {widths}) do not split "
                              f"into {groups} key/value groups")
    return groups
