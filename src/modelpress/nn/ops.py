"""The quantized linear forward as a PyTorch operator: `torch.ops.modelpress.quant_linear`.

    y (..., N) = quant_linear(x (..., K), qdata, scale, offset, scale_scale, scale_mean, input_perm, bias,
                              scheme_key, N, K)

The packed tensors are passed as tensors and everything static about the weight (its scheme, as the string
`scheme_key(scheme)`, and its shape) as plain strings and ints, so that torch.compile traces a QuantLinear
into one graph node (no graph break: the fake implementation gives the output's shape and dtype) and CUDA
graphs capture whatever kernel it launches. The real implementation is the backend chain of backends.py,
for CPU and CUDA alike: the packed CPU kernels or the Triton kernels where they fit the call, else
dequantize-then-matmul. Its output is therefore exactly what `linear_forward` returns.

The operator itself has no autograd kernel: a Python one would cost every eager call (under no_grad too)
about three times the operator's own dispatch. Training through a layer goes through
`quant_linear_differentiable` instead (QuantLinear picks it when grad mode is on and x or the bias needs a
gradient): its backward, for the activations and bias only, multiplies by the dequantized weight.
"""

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from modelpress.formats.packed import PackedWeight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.backends import linear_forward

Tensor = torch.Tensor


def scheme_key(scheme: WeightScheme) -> str:
    """A WeightScheme as one string (the operator's static "format id"); `scheme_of_key` inverts it."""
    return (f"{scheme.format}:{scheme.granularity}:{scheme.group_size or 0}:{scheme.scale_dtype}:"
            f"{int(scheme.double_quant)}:{scheme.double_quant_block}:{int(scheme.integer_zero)}")


def scheme_of_key(key: str) -> WeightScheme:
    fmt, granularity, group, scale_dtype, double_quant, block, integer_zero = key.split(":")
    return WeightScheme(format=fmt, granularity=granularity, group_size=int(group) or None,  # type: ignore[arg-type]
                        scale_dtype=scale_dtype, double_quant=bool(int(double_quant)), double_quant_block=int(block),
                        integer_zero=bool(int(integer_zero)))


@dataclass(frozen=True)
class _Static:
    scheme: WeightScheme
    shape: tuple[int, int]


@functools.cache
def _static(key: str, out_features: int, in_features: int) -> _Static:
    return _Static(scheme_of_key(key), (out_features, in_features))


def _packed(qdata: Tensor, scale: Tensor, offset: Optional[Tensor], scale_scale: Optional[Tensor],
            scale_mean: Optional[Tensor], input_perm: Optional[Tensor], static: _Static) -> PackedWeight:
    return PackedWeight(static.scheme, static.shape, qdata, scale, offset, scale_scale, scale_mean, input_perm)


_LIB = torch.library.Library("modelpress", "DEF")
_LIB.define("quant_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? offset, Tensor? scale_scale, "
            "Tensor? scale_mean, Tensor? input_perm, Tensor? bias, str scheme, int out_features, int in_features) "
            "-> Tensor")


def _quant_linear(x: Tensor, qdata: Tensor, scale: Tensor, offset: Optional[Tensor], scale_scale: Optional[Tensor],
                  scale_mean: Optional[Tensor], input_perm: Optional[Tensor], bias: Optional[Tensor],
                  scheme: str, out_features: int, in_features: int) -> Tensor:
    static = _static(scheme, out_features, in_features)
    return linear_forward(x, _packed(qdata, scale, offset, scale_scale, scale_mean, input_perm, static), bias)


for _device in ("CPU", "CUDA"):  # the backend chain picks the CPU kernels, the Triton kernels or the reference
    _LIB.impl("quant_linear", _quant_linear, _device)
# torch.library.Library rather than the custom_op decorator: its eager dispatch costs a fraction of the host time
quant_linear = torch.ops.modelpress.quant_linear.default


@torch.library.register_fake("modelpress::quant_linear", lib=_LIB)
def _(x, qdata, scale, offset, scale_scale, scale_mean, input_perm, bias, scheme, out_features, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"quant_linear: x has {x.shape[-1]} features, "
                                                     f"the weight takes {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


class _QuantLinearGrad(torch.autograd.Function):
    """quant_linear with a backward for the activations (and the bias): grad_x = grad_y @ W."""

    @staticmethod
    def forward(ctx, x, qdata, scale, offset, scale_scale, scale_mean, input_perm, bias, scheme, out_features,
                in_features):
        ctx.save_for_backward(qdata, scale, offset, scale_scale, scale_mean, input_perm)
        ctx.static_args = (scheme, out_features, in_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return quant_linear(x, qdata, scale, offset, scale_scale, scale_mean, input_perm, bias, scheme, out_features,
                            in_features)

    @staticmethod
    def backward(ctx, grad):
        key, out_features, in_features = ctx.static_args  # uncached here: torch.compile traces this
        packed = _packed(*ctx.saved_tensors, _Static(scheme_of_key(key), (out_features, in_features)))
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ packed.dequantize(grad.dtype)  # (..., N) @ (N, K)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[7]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, None, None, None, None, grad_bias, None, None, None


def quant_linear_differentiable(*args) -> Tensor:
    """quant_linear's arguments, with autograd through the activations and bias (training through a layer)."""
    return _QuantLinearGrad.apply(*args)
