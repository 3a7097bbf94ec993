"""Choosing how a QuantLinear multiplies: fused kernels where they exist, the reference path otherwise.

A backend is a function (x, packed, bias) -> y, or None when it cannot serve that case. Backends are
tried in registration order; the torch reference path (dequantize the weight in x's dtype, then
F.linear) serves everything and is always last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


DECODED_BUDGET_BYTES = 4 * 2**30   # decoded weights kept at most, per decoded_once() context
_DECODED: list[dict] = []           # the innermost decoded_once() context's cache


@contextlib.contextmanager
def decoded_once(budget_bytes: int = DECODED_BUDGET_BYTES) -> Iterator[None]:
    """Within: the reference path decodes each packed weight once per dtype and keeps it, up to budget_bytes
    (layers past the budget decode per call, as outside). Evaluation runs many forwards over weights that do
    not change; decoding on every forward made a packed model's CPU evaluation several times slower than the
    float model's. Same weights, same F.linear: results are bit for bit those of per-call decoding."""
    _DECODED.append({"bytes": 0, "budget": budget_bytes, "weights": {}})
    try:
        yield
    finally:
        _DECODED.pop()


def _decoded(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    if not _DECODED:
        return packed.dequantize(dtype)
    cache = _DECODED[-1]
    key = (packed.qdata.data_ptr(), packed.scale.data_ptr(), packed.shape, dtype)
    hit = cache["weights"].get(key)
    if hit is not None and hit[0] is packed.qdata:   # the same tensor, not a new one at a reused address
        return hit[1]
    weight = packed.dequantize(dtype)
    size = weight.numel() * weight.element_size()
    if cache["bytes"] + size <= cache["budget"]:
        cache["weights"][key] = (packed.qdata, weight)
        cache["bytes"] += size
    return weight


def reference_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    weight = _decoded(packed, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def linear_forward(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    for _, backend in _BACKENDS:
        out = backend(x, packed, bias)
        if out is not None:
            return out
    return reference_linear(x, packed, bias)
