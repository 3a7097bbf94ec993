"""Triton kernels for the two elementwise halves of a dynamic int8 (W8A8) linear layer on CUDA.

dynamic.py computes y = sx[m] · sw[n] · Σ_k qx[m, k] · qw[n, k] + bias[n]. The integer product is one
library call (torch._int_mm, or cuSPARSELt for 2:4 weights); around it, plain PyTorch needs about ten
passes over the activations and the int32 result (abs, amax, float casts, divide, round, clamp, cast;
cast, two multiplies, add, cast), which on an H200 cost more than the int8 matmul saves over fp16.
Here each half is one pass:

- quantize_rows(x) -> (codes int8 (M, K), scales float32 (M, 1)): one program per row, absmax scale
  (1 for an all-zero row), codes round-half-to-even(x / scale) clamped to ±127. Division and rounding
  are IEEE-exact (div_rn, rint). PyTorch on CUDA computes amax / 127 as amax · (1/127), so a scale can
  differ from dynamic.quantize_rows' by 1 ulp; the codes are exactly round(x / scale) for the kernel's scale.
- rescale(acc, sx, sw, bias, dtype) -> (acc · sx) · sw (+ bias) in float32, cast to dtype; equal to the
  PyTorch expression up to the compiler fusing the bias add into an FMA (one rounding instead of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # triton >= 3.2
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

_QUANT_BLOCK = 4096  # columns per step; a row of K <= 4096 is read once per pass


@triton.jit
def _store_codes(c_ptr, x, scale, inside):
    """codes = round-half-even(x / scale) clamped to ±127, stored as int8."""
    q = libdevice.rint(tl.math.div_rn(x, scale))
    tl.store(c_ptr, tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8), mask=inside)


@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c, BLOCK: tl.constexpr,
                          ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    c_row = codes_ptr + row.to(tl.int64) * stride_c
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:  # the row stays in registers between the two passes
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros((), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
    tl.store(scale_ptr + row, scale)
    if ONE_BLOCK:
        _store_codes(c_row + cols, x, scale, cols < K)
    else:
        for start in range(0, K, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            _store_codes(c_row + start + cols, x, scale, start + cols < K)


@triton.jit
def _rescale_kernel(acc_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N, stride_am, stride_an, stride_om,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    rm64 = rm.to(tl.int64)
    acc = tl.load(acc_ptr + rm64[:, None] * stride_am + rn[None, :] * stride_an, mask=inside, other=0)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = (acc.to(tl.float32) * sx[:, None]) * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float CUDA tensor -> int8 codes (M, K) and float32 scales (M, 1); see the module docstring."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(_QUANT_BLOCK, triton.next_power_of_2(max(k, 16)))
        _quantize_rows_kernel[(m,)](x, codes, scales, k, x.stride(0), codes.stride(0), BLOCK=block,
                                    ONE_BLOCK=k <= block, num_warps=8 if block >= 2048 else 4)
    return codes, scales


def rescale(acc: torch.Tensor, row_scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """int32 (M, N) accumulators -> dtype (M, N): (acc · row_scale) · weight_scale (+ bias)."""
    m, n = acc.shape
    out = torch.empty((m, n), dtype=dtype, device=acc.device)
    if m and n:
        sx = row_scale.reshape(-1).float().contiguous()
        sw = weight_scale.reshape(-1).contiguous()
        b = bias.contiguous() if bias is not None else sw
        bm, bn = 32, 128
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _rescale_kernel[grid](acc, sx, sw, b, out, m, n, acc.stride(0), acc.stride(1), out.stride(0),
                              HAS_BIAS=bias is not None, BM=bm, BN=bn, num_warps=4)
    return out
