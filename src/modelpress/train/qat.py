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

Starting from a post-training result (prepare_qat_from_packed): each packed layer (GPTQ, AWQ, RTN...)
becomes a FakeQuantLinear whose master weight is the dequantized weight and whose grid is the packed
layer's own (scales, offsets, column order): fixed, so at step 0 the model computes exactly what the PTQ
model computes, and training only moves weights from one code to another. Conversion re-encodes the
trained weight on that same grid. Double-quantized scales are refused (their grid is not fixed per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, expand_groups, fake_quantize, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, replace_module
from modelpress.nn.quant_linear import QuantLinear
from modelpress.train.trainer import TrainingDiverged


class _StraightThrough(torch.autograd.Function):
    """Forward: Q(W). Backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scheme: WeightScheme, grid: PackedWeight | None) -> torch.Tensor:  # type: ignore[override]
        try:
            return fake_quantize(weight, scheme) if grid is None else on_grid(weight, grid)
        except ModelpressError as err:   # e.g. a scale past float16: the weights grew out of the format's reach
            raise TrainingDiverged(f"QAT weights left what {scheme.spec} can store ({err}); training diverged: "
                                   f"lower the learning rate") from None

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


def ste_fake_quantize(weight: torch.Tensor, scheme: WeightScheme, grid: PackedWeight | None = None) -> torch.Tensor:
    """Q(weight) (N, K) float32, with a straight-through gradient to `weight`; on `grid`'s fixed scales if given."""
    return _StraightThrough.apply(weight, scheme, grid)


def on_grid(weight: torch.Tensor, grid: PackedWeight) -> torch.Tensor:
    """(N, K) float32: `weight` rounded on the fixed grid of a packed weight (its stored scales, offsets and
    column order), equal bit for bit to quantize_weight(weight, scale=..., offset=..., input_perm=...)
    .dequantize()."""
    scheme = grid.scheme
    n, k = weight.shape
    g = scheme.group_length(k)
    perm = None if grid.input_perm is None else grid.input_perm.long()
    w = weight.detach().float()
    w = w if perm is None else w[:, perm]
    scale = expand_groups(grid.scale.float(), n, k, g)
    offset = None if grid.offset is None else expand_groups(grid.offset.float(), n, k, g)
    values = scheme.round_trip(w, scale, offset)
    return values if perm is None else values[:, torch.argsort(perm)]


class FakeQuantLinear(nn.Module):
    """A linear layer with a float32 master weight (N, K) that computes with its quantized value."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: WeightScheme,
                 grid: PackedWeight | None = None) -> None:
        """`grid`: a packed weight whose scales, offsets and column order stay fixed (None: the format's
        scale rule, recomputed from the weight at every forward)."""
        super().__init__()
        if weight.dim() != 2:
            raise ModelpressError(f"FakeQuantLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        if grid is not None and grid.scheme.double_quant:
            raise ModelpressError(f"QAT on a fixed grid needs plain scales; {grid.scheme.spec} codes its scales "
                                  f"again (double quantization)")
        self.scheme = scheme if grid is None else grid.scheme
        self.grid = None if grid is None else PackedWeight(
            scheme=grid.scheme, shape=grid.shape, qdata=grid.qdata[:0], scale=grid.scale, offset=grid.offset,
            input_perm=grid.input_perm)   # codes are not kept: the master weight replaces them
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())

    @classmethod
    def from_linear(cls, module: nn.Module, scheme: WeightScheme) -> FakeQuantLinear:
        return cls(linear_weight(module), getattr(module, "bias", None), scheme)

    @classmethod
    def from_packed(cls, module: QuantLinear) -> FakeQuantLinear:
        """Start from a packed layer: master weight = its dequantized weight, on its fixed grid."""
        return cls(module.dequantized_weight(torch.float32), module.bias, module.packed.scheme, module.packed)

    def quantized_weight(self) -> torch.Tensor:
        return ste_fake_quantize(self.weight, self.scheme, self.grid)

    def to_packed(self) -> PackedWeight:
        """The trained weight as the packed weight conversion stores."""
        with torch.no_grad():
            if self.grid is None:
                return quantize_weight(self.weight, self.scheme)
            return quantize_weight(self.weight, self.scheme, scale=self.grid.scale, offset=self.grid.offset,
                                   input_perm=self.grid.input_perm)

    def _apply(self, fn, recurse=True):
        if self.grid is not None:
            self.grid = self.grid.to(fn(self.grid.scale).device)
        return super()._apply(fn, recurse)

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


def prepare_qat_from_packed(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Replace every QuantLinear of a post-training-quantized model by a FakeQuantLinear on its grid, in place."""
    packed = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not packed:
        raise ModelpressError(f"{type(model).__name__} has no packed (QuantLinear) layers to start QAT from")
    done = {}
    for name, module in packed.items():
        new = FakeQuantLinear.from_packed(module).to(module.packed.qdata.device)
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
            if module.grid is None:
                new = quantize_layer(module, module.scheme, name=f"layer {name}").to(module.weight.device)
            else:
                new = QuantLinear(module.to_packed(), module.bias).to(module.weight.device)
        replace_module(model, name, new)
        done[name] = new
    return done
