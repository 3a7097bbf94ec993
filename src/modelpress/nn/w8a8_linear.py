"""W8A8Linear: int8 weights (one scale per output row) times int8 activations (one scale per token, chosen
at run time), multiplied in integers where torch can (see dynamic.py), with optional SmoothQuant factors
kept in the layer.

SmoothQuant moves activation outliers into the weights: y = (x / s) (W diag(s))^T. Normally x / s is folded
into the operation producing x (a norm, a linear layer) and this layer is exactly a DynamicInt8Linear.
Where no such operation exists (a layer behind a nonlinearity, say), the layer keeps `smooth` (K,)
itself and divides its input by it before quantizing the input per token; the stored weight is then
already W diag(s):
    y[m, n] = sx[m] · sw[n] · Σ_k qx[m, k] · qw[n, k] + bias[n],   qx = round((x / smooth) / sx).
"""

from __future__ import annotations

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, empty_packed, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.dynamic import DynamicInt8Linear, dynamic_int8_linear
from modelpress.nn.layers import linear_weight
from modelpress.nn.registry import register_module_kind


@register_module_kind("w8a8_linear")
class W8A8Linear(DynamicInt8Linear):
    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None) -> None:
        super().__init__(packed, bias)
        if smooth is not None:
            if smooth.shape != (self.in_features,):
                raise ModelpressError(f"smoothing factors of shape {tuple(smooth.shape)} do not fit a layer with "
                                      f"{self.in_features} inputs")
            smooth = smooth.detach().float().clone()
        self.register_buffer("smooth", smooth)

    @classmethod
    def from_linear(cls, module: nn.Module, scheme: WeightScheme, name: str = "weight",
                    smooth: torch.Tensor | None = None) -> W8A8Linear:
        """Quantize a Linear / Conv1D; with `smooth`, the weight is stored as W diag(smooth)."""
        weight = linear_weight(module).detach().float()
        if smooth is not None:
            weight = weight * smooth.float().to(weight.device)[None, :]
        packed = quantize_weight(weight, scheme, name=name)
        return cls(packed, getattr(module, "bias", None), smooth).to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1]).float() / self.smooth
        y = dynamic_int8_linear(flat, self._packed_view(), self.bias, self._sparse_matmul(x))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def weight_nbytes(self) -> int:
        """Packed weight plus the in-layer smoothing factors, if any: all this layer stores for its weight."""
        extra = 0 if self.smooth is None else self.smooth.numel() * self.smooth.element_size()
        return self.packed.nbytes + extra

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 activations per token, smoothing in layer={self.smooth is not None}"

    def record(self) -> dict:
        return {**super().record(), "smooth": self.smooth is not None}

    @classmethod
    def from_record(cls, record: dict, device: torch.device | str = "cpu") -> W8A8Linear:
        """An instance with correctly shaped, uninitialised tensors, to be filled by load_state_dict."""
        scheme = WeightScheme(**record["scheme"])
        shape = (int(record["shape"][0]), int(record["shape"][1]))
        packed = empty_packed(scheme, shape, device=device)
        bias = torch.empty(shape[0], device=device) if record["bias"] else None
        smooth = torch.empty(shape[1], device=device) if record.get("smooth") else None
        return cls(packed, bias, smooth)
