"""Finding and swapping the linear layers of any model, by structure rather than by class name.

A "linear layer" is an nn.Linear or a transformers Conv1D (GPT-2 style, weight stored as (in, out)).
The output head (whatever `get_output_embeddings()` returns) and patterns the user names are skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

DEFAULT_SKIP = ("lm_head",)


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of a Linear or Conv1D."""
    return module.weight.t() if is_conv1d(module) else module.weight


def output_head_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_linear_layers(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP,
                       within: nn.Module | None = None) -> dict[str, nn.Module]:
    """Linear layers of `model` (or of its submodule `within`, names relative to it), minus skips."""
    patterns = tuple(skip)
    heads = output_head_names(model) if within is None else set()
    root = model if within is None else within
    found = {}
    for name, module in root.named_modules():
        if not is_linear(module) or name in heads:
            continue
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns):
            continue
        found[name] = module
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if child in parent._parameters:  # a fused parameter (e.g. 3-D expert weights) becoming a module
        delattr(parent, child)
    setattr(parent, child, new)
