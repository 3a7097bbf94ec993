"""Finding a model's repeated blocks (decoder or encoder layers) by structure, and moving parts of a model
between devices.

The blocks are the largest nn.ModuleList whose children all share one class and hold weights the engine
can compress (linear layers or fused expert parameters). `model._no_split_modules`, where transformers
declares it, breaks ties in favour of the declared block class. No model names are involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelpress.engine.targets import find_expert_params
from modelpress.errors import ModelpressError
from modelpress.nn.layers import is_linear


@dataclass(frozen=True)
class BlockStack:
    path: str                 # e.g. "model.layers", "transformer.h", "encoder.layer"
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.path}.{index}" if self.path else str(index)


def _has_weights(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules()) or bool(find_expert_params(module))


def find_blocks(model: nn.Module) -> BlockStack:
    declared = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or not _has_weights(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        rank = (type(module[0]).__name__ in declared, size)
        if best is None or rank > best[0]:
            best = (rank, path, module)
    if best is None:
        raise ModelpressError(
            f"cannot find repeated blocks in {type(model).__name__}: no nn.ModuleList of identical layers "
            "holding linear layers; the sequential engine (GPTQ and friends) needs decoder/encoder blocks"
        )
    return BlockStack(best[1], best[2])


def move_outside_blocks(model: nn.Module, stack: BlockStack, device: torch.device | str) -> None:
    """Move every parameter and buffer that does not belong to a block (embeddings, rotary tables, final
    norm, heads) to `device`; the blocks stay where they are. Tied tensors stay tied."""
    inside = {id(t) for t in stack.blocks.parameters()} | {id(t) for t in stack.blocks.buffers()}
    target = torch.device(device)
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if module is stack.blocks:
            continue
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or id(tensor) in inside or tensor.device == target:
                    continue
                if id(tensor) not in moved:
                    data = tensor.detach().to(target)
                    moved[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(
                        tensor, nn.Parameter) else data
                store[name] = moved[id(tensor)]


def outside_device(model: nn.Module, stack: BlockStack) -> torch.device:
    """Where the parameters outside the blocks live (the first one found)."""
    inside = {id(t) for t in stack.blocks.parameters()}
    for tensor in model.parameters():
        if id(tensor) not in inside:
            return tensor.device
    return torch.device("cpu")


def hidden_width(model: nn.Module) -> int | None:
    """Width of the hidden states the blocks read: the input embedding's, else the config's hidden_size."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    width = getattr(embeddings, "embedding_dim", None)
    if width is None:
        width = getattr(getattr(model, "config", None), "hidden_size", None)
    return width if isinstance(width, int) else None
