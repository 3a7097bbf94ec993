"""Quantization-aware training: train float weights through the quantizer they will be stored with.

FakeQuantLinear keeps a float32 master weight W and computes with Q(W), the weight the packed layer would
hold: the format's own scale rule (absmax, min/max, absmean...) recomputed from W at every forward, codes
rounded exactly as quantize_weight rounds them, then decoded (formats.packed.fake_quantize). Rounding
has no useful gradient, so the backward pass uses the straight-through estimator: dL/dW = dL/dQ(W), as if
Q were the identity. With scales recomputed from W every value stays inside the format's range, except
for formats whose scale does not cover the extremes (ternary's absmean), where clamping is also passed
straight through, as BitNet does.

convert_qat then replaces every FakeQuantLinear by the QuantLinear that RTN post-training quantization
would produce from the trained W; its forward equals the fake-quant forward bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import fake_quantize
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, replace_module
from modelpress.nn.quant_linear import QuantLinear


class _StraightThrough(torch.autograd.Function):
    """Forward: Q(W). Backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize(weight, scheme)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def ste_fake_quantize(weight: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Q(weight) (N, K) float32, with a straight-through gradient to `weight`."""
    return _StraightThrough.apply(weight, scheme)


class FakeQuantLinear(nn.Module):
    """A linear layer with a float32 master weight (N, K) that computes with its quantized value."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: WeightScheme) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ModelpressError(f"FakeQuantLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.scheme = scheme
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())

    @classmethod
    def from_linear(cls, module: nn.Module, scheme: WeightScheme) -> FakeQuantLinear:
        return cls(linear_weight(module), getattr(module, "bias", None), scheme)

    def quantized_weight(self) -> torch.Tensor:
        return ste_fake_quantize(self.weight, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.spec}, "
                f"bias={self.bias is not None}")


def prepare_qat(model: nn.Module, scheme: WeightScheme, skip: tuple[str, ...] = DEFAULT_SKIP
                ) -> dict[str, FakeQuantLinear]:
    """Replace the model's linear layers (minus skips and the output head) by FakeQuantLinear, in place."""
    layers = find_linear_layers(model, skip)
    if not layers:
        raise ModelpressError(f"no linear layers to prepare for QAT (skip patterns: {list(skip)})")
    done = {}
    for name, module in layers.items():
        new = FakeQuantLinear.from_linear(module, scheme).to(module.weight.device)
        replace_module(model, name, new)
        done[name] = new
    return done


def convert_qat(model: nn.Module) -> dict[str, QuantLinear]:
    """Replace every FakeQuantLinear by the packed QuantLinear of its trained weight, in place."""
    from modelpress.algorithms.quantize.rtn import quantize_layer

    fakes = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    if not fakes:
        raise ModelpressError(f"{type(model).__name__} has no FakeQuantLinear layers; call prepare_qat first")
    done = {}
    for name, module in fakes.items():
        with torch.no_grad():
            new = quantize_layer(module, module.scheme, name=f"layer {name}").to(module.weight.device)
        replace_module(model, name, new)
        done[name] = new
    return done
