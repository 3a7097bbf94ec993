"""The plain float tensors each modelpress layer stands for, under the names the model's own architecture
gives them: what a float export (`--to hf`, the base of `--to peft`) writes in place of a compressed layer.

    QuantLinear, DynamicInt8Linear       weight = the dequantized (N, K) weight, bias as it is
    W8A8Linear with in-layer smoothing   weight = dequantized W·diag(s) divided by s again, column by column
    SparseLinear                         weight = the dense (N, K) weight, zeros where pruned
    ResizedLinear                        weight, bias as they are (a plain Linear of another width)
    QuantExperts                         the fused (experts, ...) parameter it replaced, dequantized
    QuantEmbedding                       weight = the dequantized (V, D) table
    LoRALinear                           its base, with (α / r)·B A added ("merge") or left out ("drop")

Weights come out in float32 and (N, K) orientation; the writer transposes where the architecture keeps a
transformers Conv1D. Each kind registers a function by type (`dense_for`); a compressed kind without one
cannot be exported to float and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.nn.dynamic import DynamicInt8Linear
from modelpress.nn.dynamic_fp8 import DynamicFp8Linear
from modelpress.nn.quant_embedding import QuantEmbedding
from modelpress.nn.quant_experts import QuantExperts
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.registry import compressed_module_kind
from modelpress.nn.sparse_linear import ResizedLinear, SparseLinear
from modelpress.nn.w8a8_linear import W8A8Linear
from modelpress.train.lora import LoRALinear

Adapters = Literal["merge", "drop"]

ACTIVATIONS_DIFFER = "modelpress quantizes this layer's inputs to int8 per token; the float export does not"
FP8_ACTIVATIONS_DIFFER = "modelpress quantizes this layer's inputs to fp8-e4m3 per token; the float export does not"


@dataclass
class DenseLayer:
    tensors: dict[str, torch.Tensor]   # name suffix ("weight", "bias"; "" for a replaced parameter) -> float
    source: str                        # what modelpress holds: "int4/g32", "sparse 2:4 float32", ...
    linear: bool = True                # tensors["weight"] is an (N, K) linear weight (swappable for the KL)
    runtime_differs: str = ""          # why our forward is not a float matmul with these tensors, if it is not


_DENSE: dict[type[nn.Module], Callable[[nn.Module], DenseLayer]] = {}


def dense_for(cls: type[nn.Module]):
    def decorate(function: Callable[[nn.Module], DenseLayer]):
        if cls in _DENSE:
            raise ValueError(f"{cls.__name__} already has a dense form")
        _DENSE[cls] = function
        return function

    return decorate


def _with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = {"weight": weight}
    if bias is not None:
        tensors["bias"] = bias.detach()
    return tensors


@dense_for(QuantLinear)
def _quant_linear(module: QuantLinear) -> DenseLayer:
    return DenseLayer(_with_bias(module.dequantized_weight(torch.float32), module.bias), module.scheme.spec)


@dense_for(QuantEmbedding)
def _quant_embedding(module: QuantEmbedding) -> DenseLayer:
    return DenseLayer({"weight": module.dequantized_weight(torch.float32)}, f"{module.scheme.spec} embedding",
                      linear=False)


@dense_for(DynamicInt8Linear)
def _dynamic_int8(module: DynamicInt8Linear) -> DenseLayer:
    return DenseLayer(_with_bias(module.dequantized_weight(torch.float32), module.bias),
                      f"w8a8 {module.scheme.spec}", runtime_differs=ACTIVATIONS_DIFFER)


@dense_for(DynamicFp8Linear)
def _dynamic_fp8(module: DynamicFp8Linear) -> DenseLayer:
    return DenseLayer(_with_bias(module.dequantized_weight(torch.float32), module.bias),
                      f"w8a8 fp8 {module.scheme.spec}", runtime_differs=FP8_ACTIVATIONS_DIFFER)


@dense_for(W8A8Linear)
def _w8a8(module: W8A8Linear) -> DenseLayer:
    weight = module.dequantized_weight(torch.float32)   # stored as W·diag(s) when the layer smooths itself
    source = f"w8a8 {module.scheme.spec}"
    if module.smooth is not None:
        weight = weight / module.smooth.float()[None, :]   # y = (x / s) (W diag(s))^T = x (W diag(s) / s)^T
        source += " smoothed in layer"
    return DenseLayer(_with_bias(weight, module.bias), source, runtime_differs=ACTIVATIONS_DIFFER)


@dense_for(SparseLinear)
def _sparse(module: SparseLinear) -> DenseLayer:
    pattern = f"{module.pattern[0]}:{module.pattern[1]}" if module.pattern else "unstructured"
    values = module.scheme.spec if module.scheme is not None else str(module.values.dtype).removeprefix("torch.")
    return DenseLayer(_with_bias(module.dense_weight(torch.float32), module.bias), f"sparse {pattern} {values}")


@dense_for(ResizedLinear)
def _resized(module: ResizedLinear) -> DenseLayer:
    return DenseLayer(_with_bias(module.weight.detach(), module.bias),
                      f"resized {str(module.weight.dtype).removeprefix('torch.')}")


@dense_for(QuantExperts)
def _experts(module: QuantExperts) -> DenseLayer:
    weight = torch.stack([module[e].float() for e in range(module.num_experts)])  # the parameter's own shape
    return DenseLayer({"": weight}, f"experts {module.scheme.spec}", linear=False)


def _dense_of(module: nn.Module) -> DenseLayer | None:
    for cls in type(module).__mro__:
        if cls in _DENSE:
            return _DENSE[cls](module)
    return None


def _lora(module: LoRALinear, adapters: Adapters) -> DenseLayer:
    base = _dense_of(module.base)
    if base is None:  # a float nn.Linear / Conv1D base
        from modelpress.nn.layers import linear_weight

        base = DenseLayer(_with_bias(linear_weight(module.base).detach(), getattr(module.base, "bias", None)),
                          str(module.base.weight.dtype).removeprefix("torch."))
    if adapters == "merge":
        base.tensors["weight"] = base.tensors["weight"].float() + module.delta_weight().detach()
        base.source = f"lora r={module.rank} on {base.source}, merged in float32"
    return base


def dense_layer(module: nn.Module, adapters: Adapters = "merge") -> DenseLayer | None:
    """The plain tensors `module` stands for, or None for a module the architecture already has as it is."""
    if isinstance(module, LoRALinear):
        return _lora(module, adapters)
    layer = _dense_of(module)
    if layer is None and compressed_module_kind(module) is not None:
        raise ModelpressError(f"layer kind {compressed_module_kind(module)!r} ({type(module).__name__}) has no "
                              f"plain float form to export")
    return layer


def dense_layers(model: nn.Module, adapters: Adapters = "merge") -> dict[str, DenseLayer]:
    """Every compressed (or adapted) module of `model` by name, as plain tensors; modules inside one are its own."""
    found: dict[str, DenseLayer] = {}
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        layer = dense_layer(module, adapters)
        if layer is not None:
            found[name] = layer
            inside += (f"{name}.",)
    return found


def plain_state(model: nn.Module, layers: dict[str, DenseLayer]) -> dict[str, torch.Tensor]:
    """The state dict the architecture's own modules hold: `model`'s, with every layer in `layers` replaced
    by its plain tensors."""
    inside = tuple(f"{name}." for name in layers)
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()
             if not (key in layers or key.startswith(inside))}
    for name, layer in layers.items():
        for suffix, tensor in layer.tensors.items():
            state[f"{name}.{suffix}" if suffix else name] = tensor
    return state
