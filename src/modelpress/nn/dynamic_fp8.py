"""DynamicFp8Linear: fp8-e4m3 weights with one scale per output row, times fp8-e4m3 activations with one scale
per token chosen at run time (absmax / 448). This is the W8A8 fp8 scheme vLLM and compressed-tensors call
FP8_DYNAMIC, and what the H100/H200's fp8 tensor cores multiply at twice the bf16 rate:

    y[m, n] = sx[m] · sw[n] · Σ_k qx[m, k] · qw[n, k] + bias[n],   qx = fp8(x[m] / sx[m]),  sx = max|x[m]| / 448

On CUDA with Triton the activations are quantized by one kernel (triton_int8.py); the product is one fp8 GEMM
with the rescale in its epilogue (triton_int8.scaled_matmul) up to 64 rows, and torch._scaled_mm with row-wise
scales (CUTLASS) from 65 rows up, where it is faster (bench/prefill.py on an H200, docs/benchmarks.md).
Elsewhere the same codes are multiplied in float32: every product of two e4m3 values is exact
in float32, so the paths differ only in how the sums are rounded.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from modelpress.formats.packed import PackedWeight, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.dynamic import check_channel_weight, eager_prepared, fused_kernels
from modelpress.nn.layers import linear_weight
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.registry import register_module_kind
from modelpress.nn.triton_backend import FP8_CAPABILITY

FP8_MAX = 448.0   # largest finite float8_e4m3fn
SCALED_MM_MIN_ROWS = 65   # from here up torch._scaled_mm beats the Triton GEMM (bench/prefill.py --sweep, H200)
SCHEME = WeightScheme(format="fp8-e4m3", granularity="channel", group_size=None)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> float8_e4m3fn codes (M, K) and float32 scales (M, 1), absmax / 448 per row (1 for a zero row)."""
    xf = x.detach().float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_codes(packed: PackedWeight) -> torch.Tensor:
    """The (N, K) float8_e4m3fn weight codes of an fp8-e4m3 PackedWeight (a view of the stored bytes)."""
    return packed.qdata[:, :packed.shape[1]].view(torch.float8_e4m3fn)


def dynamic_fp8_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                       scale_row: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b, W the fp8-e4m3/channel `packed`, x quantized to fp8 per row (see the module docstring).
    scale_row: the weight scales as a float32 (1, N) tensor, if the caller keeps one (torch._scaled_mm's form)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    n = packed.shape[0]
    fused = fused_kernels(flat, FP8_CAPABILITY)
    if fused is not None:
        codes, row_scale = fused.quantize_rows(flat, fp8=True)
        if _library_gemm(flat):
            y = torch._scaled_mm(codes, fp8_codes(packed).t(), scale_a=row_scale, scale_b=_row(packed, scale_row),
                                 out_dtype=x.dtype)
            y = y if bias is None else y + bias.to(y.dtype)
        else:
            y = fused.scaled_matmul(codes, row_scale, fp8_codes(packed), packed.scale, bias, x.dtype)
        return y.reshape(*shape[:-1], n)
    codes, row_scale = quantize_rows_fp8(flat)
    y = (codes.float() @ fp8_codes(packed).float().t()) * row_scale * _row(packed, scale_row)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)


def _row(packed: PackedWeight, scale_row: torch.Tensor | None) -> torch.Tensor:
    return scale_row if scale_row is not None else packed.scale.float().reshape(1, -1)


def _library_gemm(x: torch.Tensor) -> bool:
    """torch._scaled_mm's row-wise fp8 GEMM for x: enough rows, 16-bit output, K a multiple of 16 (sm_89+)."""
    return (x.shape[0] >= SCALED_MM_MIN_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.shape[1] % 16 == 0
            and _has_fp8_gemm(x.device.index if x.device.index is not None else torch.cuda.current_device()))


@functools.cache
def _has_fp8_gemm(device_index: int) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device_index) >= FP8_CAPABILITY


@register_module_kind("dynamic_fp8_linear")
class DynamicFp8Linear(QuantLinear):
    """A QuantLinear restricted to fp8-e4m3/channel whose forward multiplies in fp8 (see module docstring)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        check_channel_weight(packed, "fp8-e4m3", "DynamicFp8Linear")
        super().__init__(packed, bias)

    @classmethod
    def from_linear(cls, module: nn.Module, scheme: WeightScheme = SCHEME, name: str = "weight") -> DynamicFp8Linear:
        packed = quantize_weight(linear_weight(module), scheme, name=name)
        return cls(packed, getattr(module, "bias", None)).to(module.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = eager_prepared(self, x, self._prepare_fused, FP8_CAPABILITY)
        if fn is not None:
            return fn(x)
        return dynamic_fp8_linear(x, self._packed_view(), self.bias, self._scale_row())

    def _prepare_fused(self, x: torch.Tensor, kernels):
        row = self._scale_row() if _library_gemm(x.reshape(-1, x.shape[-1])) else None
        return kernels.prepared_linear(x, fp8_codes(self._packed_view()), self.scale, self.bias, scale_row=row)

    def _scale_row(self) -> torch.Tensor:
        """The scales as a float32 (1, N) row, made once per scale buffer and version (one kernel less per call;
        a load_state_dict into the buffer bumps its version)."""
        scale = self._buffers["scale"]
        cached = self.__dict__.get("_row")
        if cached is None or cached[0] is not scale or cached[1] != scale._version:
            if torch.compiler.is_compiling() or (scale.is_cuda and torch.cuda.is_current_stream_capturing()):
                return scale.float().reshape(1, -1)   # nothing kept from inside a graph (its memory is the graph's)
            cached = self.__dict__["_row"] = (scale, scale._version, scale.float().reshape(1, -1).contiguous())
        return cached[2]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 activations per token"
