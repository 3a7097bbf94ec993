"""What every peer adapter shares: the typed result, honest byte counting, and a layer that multiplies
with the weight a peer's own `dequantize()` gives back (for peers whose CPU matmul is too slow or wants
fp16 activations).

Sizes are counted from the tensors the peer really keeps for each quantized layer (codes, scales,
zero points, nested statistics), never from the format's nominal bit width.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, replace_module


@dataclass(frozen=True)
class PeerInfo:
    library: str                      # e.g. "hqq"
    version: str                      # the installed package version
    scheme: str                       # the peer's own name for what it did, e.g. "hqq 4-bit g64"
    bits: float                       # nominal code bits
    group_size: str                   # the grouping it really used, e.g. "64", "channel", "96 (K=576) / 128 (K=1536)"
    quantized_layers: int
    quantized_parameters: int         # weights those layers stand for
    quantized_weight_bytes: int       # bytes the peer stores for them (codes + scales + zeros + statistics)
    weight_bytes: int                 # the whole model: unquantized tensors + quantized_weight_bytes
    seconds: float                    # wall time of quantization
    eval_path: str                    # how the evaluated forward multiplies
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_weight_bytes / self.quantized_parameters

    def to_dict(self) -> dict:
        out = asdict(self)
        out["notes"] = list(self.notes)
        out["bits_per_weight"] = self.bits_per_weight
        return out


def package_version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (a tensor reached twice counts once)."""
    seen: set = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def nested_tensors(value) -> list[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples (peers keep metadata that way)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in nested_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in nested_tensors(v)]
    return []


@dataclass(frozen=True)
class LayerPlan:
    """The linear layers a peer is asked to quantize, and what the rest of the model weighs."""

    layers: dict[str, nn.Module]
    parameters: int          # weights of those layers
    other_bytes: int         # every other stored tensor of the model, each once (embeddings, norms, biases)


def plan_layers(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> LayerPlan:
    """Same layer set as modelpress's RTN (every linear layer but the output head), measured before the
    peer touches the model so the peer's own module internals never enter the count."""
    layers = find_linear_layers(model, skip)
    quantized = {id(linear_weight(m)) for m in layers.values()} | {id(m.weight) for m in layers.values()}
    rest = [t for t in model.state_dict(keep_vars=True).values() if id(t) not in quantized]
    return LayerPlan(
        layers=layers,
        parameters=sum(linear_weight(m).numel() for m in layers.values()),
        other_bytes=tensor_bytes(rest),
    )


class DequantizedLinear(nn.Module):
    """y = x · Wᵀ + b with W rebuilt on every call by `dequantize` (the peer's own function) and cast to
    x's dtype. The peer's stored tensors stay inside `source`; nothing float-sized is kept."""

    def __init__(self, source: nn.Module, dequantize: Callable[[], torch.Tensor], bias: torch.Tensor | None,
                 in_features: int, out_features: int) -> None:
        super().__init__()
        self.source = source
        self._dequantize = dequantize
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._dequantize().to(x.dtype)  # (out_features, in_features)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def swap_layers(model: nn.Module, new_layers: Mapping[str, nn.Module]) -> None:
    for name, module in new_layers.items():
        replace_module(model, name, module)
