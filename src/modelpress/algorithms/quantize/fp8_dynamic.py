"""FP8 dynamic (W8A8 fp8): every linear layer's weight to fp8-e4m3 with one scale per output row (round to
nearest), and its input quantized to fp8-e4m3 per token at run time (nn/dynamic_fp8.py). No calibration: the
activation scales are chosen per token as the model runs. It is vLLM's FP8_DYNAMIC scheme (`export --to
compressed-tensors` writes it so), and on Hopper GPUs the layers multiply on the fp8 tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme, as_scheme
from modelpress.nn.dynamic_fp8 import SCHEME, DynamicFp8Linear
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, replace_module
from modelpress.progress import progress


@dataclass(frozen=True)
class Fp8DynamicConfig:
    scheme: WeightScheme | str = SCHEME            # fp8-e4m3 per output channel (its scale dtype is kept)
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        scheme = as_scheme(self.scheme)
        object.__setattr__(self, "scheme", scheme)
        if scheme.format != "fp8-e4m3" or scheme.granularity != "channel" or scheme.double_quant:
            raise ModelpressError(f"fp8-dynamic makes W8A8 fp8 layers: fp8-e4m3 weights with one scale per output "
                                  f"channel; got {scheme.spec}. Use --format fp8-e4m3")


def quantize_fp8_dynamic(model: nn.Module, config: Fp8DynamicConfig) -> dict[str, DynamicFp8Linear]:
    """Turn every linear layer of `model` (but the skipped ones) into a DynamicFp8Linear, in place."""
    layers = find_linear_layers(model, config.skip)
    if not layers:
        raise ModelpressError(f"no linear layers to quantize (skip patterns: {list(config.skip)})")
    done = {}
    for name, module in progress(layers.items(), desc="fp8 dynamic", total=len(layers)):
        new = DynamicFp8Linear.from_linear(module, config.scheme, name=f"layer {name}")
        replace_module(model, name, new)
        done[name] = new
    return done
