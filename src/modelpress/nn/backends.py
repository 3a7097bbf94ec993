"""Choosing how a QuantLinear multiplies: fused kernels where they exist, the reference path otherwise.

A backend is a function (x, packed, bias) -> y, or None when it cannot serve that case. Backends are
tried in registration order; the torch reference path (dequantize the weight in x's dtype, then
F.linear) serves everything and is always last.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from modelpress.formats.packed import PackedWeight

Backend = Callable[[torch.Tensor, PackedWeight, "torch.Tensor | None"], "torch.Tensor | None"]
_BACKENDS: list[tuple[str, Backend]] = []


def register_backend(name: str, backend: Backend) -> None:
    if any(existing == name for existing, _ in _BACKENDS):
        raise ValueError(f"linear backend {name!r} is already registered")
    _BACKENDS.append((name, backend))


def backend_names() -> list[str]:
    return [name for name, _ in _BACKENDS] + ["reference"]


def reference_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    weight = packed.dequantize(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def linear_forward(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    for _, backend in _BACKENDS:
        out = backend(x, packed, bias)
        if out is not None:
            return out
    return reference_linear(x, packed, bias)
