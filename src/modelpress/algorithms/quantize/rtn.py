"""Round-to-nearest weight quantization of a model's linear layers.

Each layer's weight is quantized independently under the scheme (scales from the format's default rule:
absmax, min/max or absmean), then the layer is replaced by a QuantLinear holding only packed data.
`schemes` (full layer name -> scheme, e.g. from mixed precision) overrides the scheme layer by layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from modelpress.algorithms.quantize.mixed import check_layer_schemes, layer_scheme
from modelpress.errors import ModelpressError
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme, as_scheme
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, replace_module
from modelpress.nn.quant_linear import QuantLinear
from modelpress.progress import progress


@dataclass(frozen=True)
class RTNConfig:
    scheme: WeightScheme | str                 # a WeightScheme or its spec, e.g. "int4/g128"
    skip: tuple[str, ...] = DEFAULT_SKIP
    schemes: Mapping[str, WeightScheme] | None = field(default=None, hash=False)   # per layer (full name)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", as_scheme(self.scheme))
        check_layer_schemes(self.schemes)

    def scheme_of(self, name: str) -> WeightScheme:
        return layer_scheme(self.scheme, self.schemes, name)


def quantize_layer(module: nn.Module, scheme: WeightScheme, name: str = "weight") -> QuantLinear:
    packed = quantize_weight(linear_weight(module), scheme, name=name)
    return QuantLinear(packed, getattr(module, "bias", None))


def quantize_rtn(model: nn.Module, config: RTNConfig) -> dict[str, QuantLinear]:
    """Quantize every linear layer of `model` in place; returns the new layers by name."""
    layers = find_linear_layers(model, config.skip)
    if not layers:
        raise ModelpressError(f"no linear layers to quantize (skip patterns: {list(config.skip)})")
    done = {}
    desc = "RTN mixed" if config.schemes else f"RTN {config.scheme.spec}"
    for name, module in progress(layers.items(), desc=desc, total=len(layers)):
        new = quantize_layer(module, config.scheme_of(name), name=f"layer {name}")
        new.to(module.weight.device)
        replace_module(model, name, new)
        done[name] = new
    return done
