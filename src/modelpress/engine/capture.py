"""Capturing what the blocks are called with, without running them.

Per calibration batch the model runs up to the blocks (embeddings, rotary tables, masks) and each block's
forward is stood in for by a recorder: it stores the block's positional and keyword arguments (attention
mask, position embeddings, position ids, cache position, ...) and passes its input straight on, so the
next block's recorder sees its own keyword arguments (models that give different blocks different masks,
e.g. sliding-window layers, are served right). The last recorder stops the forward with a private
exception. Tensors the model passes to several blocks are stored once.

The hidden states handed to block 0 are kept separately: they are the part that changes block by block.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.engine.blocks import BlockStack, move_outside_blocks, outside_device


@dataclass
class BlockCall:
    """Everything a block is called with except its input hidden states."""

    args: tuple           # positional arguments after the hidden states
    kwargs: dict


@dataclass
class CapturedInputs:
    hidden: list[torch.Tensor]              # per batch: block 0's input hidden states
    calls: list[list[BlockCall]]            # [block][batch]
    tuple_output: bool                      # blocks return (hidden, ...) rather than a tensor


class _Captured(Exception):
    """Raised by the last block's recorder to end a capture forward."""


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _forward_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def first_call(model: nn.Module, stack: BlockStack, ids: torch.Tensor) -> tuple[torch.Tensor, BlockCall]:
    """Block 0's input hidden states and call for token ids `ids`; the model runs only up to block 0."""
    seen: dict = {}

    def grab(_module, args, kwargs):
        seen["hidden"], seen["call"] = args[0], BlockCall(tuple(args[1:]), dict(kwargs))
        raise _Captured

    handle = stack.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, **_forward_kwargs(model))
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["hidden"], seen["call"]


@torch.no_grad()
def capture_inputs(model: nn.Module, stack: BlockStack, calibration_ids: torch.Tensor, device: torch.device,
                   batch_size: int, host: bool = False) -> CapturedInputs:
    """Block inputs for every batch of `calibration_ids` (n, seq_len), on `device` (the hidden states in host
    memory with `host`, each as soon as it is made). Only the modules outside the blocks visit the device;
    block 0 runs once, on the first batch, to learn its output form."""
    original = outside_device(model, stack)
    move_outside_blocks(model, stack, device)
    batches = [b.to(device) for b in calibration_ids.split(batch_size)]
    try:
        hidden0, call0 = first_call(model, stack, batches[0])
        first = stack.blocks[0]
        block_device = next(first.parameters()).device
        first.to(device)
        tuple_output = isinstance(first(hidden0, *call0.args, **call0.kwargs), (tuple, list))
        first.to(block_device)

        hidden: list[torch.Tensor] = []
        calls: list[list[BlockCall]] = [[] for _ in stack.blocks]
        last = len(stack.blocks) - 1

        def recorder(index: int):
            def forward(*args, **kwargs):
                if index == 0:
                    hidden.append(args[0].to("cpu") if host else args[0])
                calls[index].append(BlockCall(tuple(args[1:]), dict(kwargs)))
                if index == last:
                    raise _Captured
                return (args[0],) if tuple_output else args[0]
            return forward

        for i, block in enumerate(stack.blocks):
            block.forward = recorder(i)
        try:
            for batch in batches:
                try:
                    model(input_ids=batch, **_forward_kwargs(model))
                except _Captured:
                    pass
        finally:
            for block in stack.blocks:
                del block.forward
    finally:
        move_outside_blocks(model, stack, original)
    return CapturedInputs(hidden, calls, tuple_output)
