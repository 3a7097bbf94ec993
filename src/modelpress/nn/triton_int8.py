"""Triton kernels for a dynamic W8A8 linear layer on CUDA (int8, or fp8-e4m3 weights and activations).

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

And the product with both halves inside it:
- scaled_matmul(codes, sx, weight, sw, bias, dtype): one tensor-core GEMM whose epilogue is rescale's
  expression, so the (M, N) int32 accumulators never reach memory. The int32 sums are exact, so the
  result is rescale(torch._int_mm(codes, weight.T), ...) bit for bit (up to the same bias FMA). The weight
  is read as stored: int8 codes kept offset-binary (code = value + 128, formats/int.py) are flipped to
  signed in registers (`flip=True`), so no signed copy of the weight is ever made (a signed copy would be
  ~35% faster at prefill sizes: docs/benchmarks.md). With float8_e4m3fn codes and scales (quantize_rows(x,
  fp8=True): absmax / 448 per row) the same kernel multiplies in fp8, adding each BK step's sums into float32
  (dynamic_fp8.py takes it up to 64 rows, torch._scaled_mm above).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # triton >= 3.2
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

_QUANT_BLOCK = 4096  # columns per step; a row of K <= 4096 is read once per pass


@triton.jit
def _store_codes(c_ptr, x, scale, inside, FP8: tl.constexpr):
    """codes = round-half-even(x / scale) clamped to ±127, stored as int8; with FP8, x / scale rounded to
    the nearest float8_e4m3fn (|x / scale| <= 448 by the choice of scale)."""
    if FP8:
        q = tl.math.div_rn(x, scale)
        tl.store(c_ptr, tl.minimum(tl.maximum(q, -448.0), 448.0).to(tl.float8e4nv), mask=inside)
    else:
        q = libdevice.rint(tl.math.div_rn(x, scale))
        tl.store(c_ptr, tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8), mask=inside)


@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c, BLOCK: tl.constexpr,
                          ONE_BLOCK: tl.constexpr, FP8: tl.constexpr):
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
    if FP8:
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    else:
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
    tl.store(scale_ptr + row, scale)
    if ONE_BLOCK:
        _store_codes(c_row + cols, x, scale, cols < K, FP8)
    else:
        for start in range(0, K, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            _store_codes(c_row + start + cols, x, scale, start + cols < K, FP8)


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


def quantize_rows(x: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float CUDA tensor -> int8 codes (M, K) and float32 scales (M, 1); see the module docstring.
    fp8=True: float8_e4m3fn codes, scales absmax / 448."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes, scales = _row_outputs(x, fp8)
    if x.shape[0]:
        grid, args, constants = _quantize_call(x, codes, scales, fp8)
        _quantize_rows_kernel[grid](*args, **constants)
    return codes, scales


def _row_outputs(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    codes = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    return codes, torch.empty((m, 1), dtype=torch.float32, device=x.device)


def _quantize_call(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fp8: bool) -> tuple:
    m, k = x.shape
    block = min(_QUANT_BLOCK, triton.next_power_of_2(max(k, 16)))
    constants = dict(BLOCK=block, ONE_BLOCK=k <= block, FP8=fp8, num_warps=8 if block >= 2048 else 4)
    return (m,), (x, codes, scales, k, x.stride(0), codes.stride(0)), constants


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


@triton.jit
def _scaled_matmul_kernel(a_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om,
                          FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FAST_ACC: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out = (a @ w^T · sx) · sw (+ bias). One (BM, BN) tile per program, programs ordered in bands of GROUP_M
    row tiles so that a band's weight tiles are read from L2 while it lasts. Rows past M and N read row 0
    (kept in bounds, masked at the store); EVEN_K: K is a multiple of BK, no column masks."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    am = tl.where(rm < M, rm, 0).to(tl.int64)
    wn = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + wn[None, :] * stride_wn + rk[:, None]  # (BK, BN): each row's K run is contiguous
    INT: tl.constexpr = a_ptr.dtype.element_ty == tl.int8
    ACC: tl.constexpr = tl.int32 if INT else tl.float32
    NONE: tl.constexpr = 0 if INT else 0.0   # what masked loads read past K (an fp8 tile takes a float)
    acc = tl.zeros((BM, BN), ACC)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=NONE)
            w = tl.load(w_ptrs, mask=rk[:, None] < K - k0, other=NONE)
        if FLIP:  # offset-binary uint8 -> two's complement int8: value = code - 128
            w = (w ^ 0x80).to(tl.int8, bitcast=True)
        if INT:
            acc = tl.dot(a, w, acc, out_dtype=ACC)
        else:  # Hopper's fp8 MMA sums in reduced precision: add each step's sums into float32 unless FAST_ACC
            acc = tl.dot(a, w, acc, out_dtype=ACC, max_num_imprecise_acc=None if FAST_ACC else BK)
        a_ptrs += BK
        w_ptrs += BK
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = (acc.to(tl.float32) * sx[:, None]) * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@dataclass(frozen=True)
class GemmTile:
    """Output tile (BM x BN), K step, programs per band of row tiles, warps and pipeline stages of one launch."""

    BM: int = 128
    BN: int = 128
    BK: int = 128
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3


def gemm_tile(m: int, n: int) -> GemmTile:
    """The tile for an (m, n) output: per row count, the tile with the least total time over the three Llama-2-7B
    shapes in `bench/prefill.py --sweep` on an H200 (up to 64 rows over int8 and fp8 together, above over int8:
    DynamicFp8Linear takes torch._scaled_mm there); bench/results/prefill_h200.json."""
    if m < 64:
        return GemmTile(BM=16, BN=64, BK=256, GROUP_M=1, num_warps=4, num_stages=4)
    if m < 256:
        return GemmTile(BM=64, BN=64, BK=256, GROUP_M=8, num_warps=4, num_stages=4)
    if m < 1024:
        return GemmTile(BM=128, BN=64, BK=128, GROUP_M=8, num_warps=4, num_stages=4)
    return GemmTile()


def scaled_matmul(codes: torch.Tensor, row_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, dtype: torch.dtype, flip: bool = False,
                  tile: GemmTile | None = None, fast_accum: bool = False) -> torch.Tensor:
    """(M, K) codes (int8, or float8_e4m3fn) times the (N, >= K) weight codes of the same kind -> (M, N) dtype:
    (codes @ weight[:, :K]^T · row_scale) · weight_scale (+ bias). flip=True: weight is uint8 offset-binary
    int8 (stored codes, value + 128), flipped to signed in the kernel; otherwise int8 codes take an int8 weight.
    fast_accum (fp8 only): leave the sums of a whole row of K in the tensor cores' reduced-precision accumulator
    (faster; otherwise every BK products are added into float32, as DeepGEMM and CUTLASS's default do)."""
    m, k = codes.shape
    n = weight.shape[0]
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    out = torch.empty((m, n), dtype=dtype, device=codes.device)
    if not (m and n):
        return out
    grid, args, constants = _matmul_call(codes, row_scale, weight, weight_scale, bias, out, flip, tile, fast_accum)
    _scaled_matmul_kernel[grid](*args, **constants)
    return out


def _matmul_call(codes, row_scale, weight, weight_scale, bias, out, flip, tile, fast_accum) -> tuple:
    m, k = codes.shape
    n = weight.shape[0]
    tile = tile or gemm_tile(m, n)
    sx = row_scale.reshape(-1).float().contiguous()
    sw = weight_scale.reshape(-1).contiguous()
    b = bias.contiguous() if bias is not None else sw
    grid = (triton.cdiv(m, tile.BM) * triton.cdiv(n, tile.BN),)
    args = (codes, weight, sx, sw, b, out, m, n, k, codes.stride(0), weight.stride(0), out.stride(0))
    constants = dict(FLIP=flip, HAS_BIAS=bias is not None, EVEN_K=k % tile.BK == 0, FAST_ACC=fast_accum,
                     BM=tile.BM, BN=tile.BN, BK=tile.BK, GROUP_M=tile.GROUP_M, num_warps=tile.num_warps,
                     num_stages=tile.num_stages)
    return grid, args, constants


def prepared_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    flip: bool = False, scale_row: torch.Tensor | None = None):
    """fn(x) -> y (x's shape but N, x's dtype) for activations of x's shape and dtype (contiguous, 16-byte aligned):
    quantize_rows then scaled_matmul (or, with `scale_row`, the weight scales as a float32 (1, N) row, fp8 codes
    and at least SCALED_MM_MIN_ROWS rows, torch._scaled_mm), each kernel launched through its compiled launch
    function with every argument but the activations and outputs fixed now: what the JIT's argument binding cost
    per call (tens of µs each at prefill, where eager layers were host-bound) is paid once. fp8 is read from
    the weight's dtype. None where the direct launch is not available; the caller keeps weight, scales and bias
    alive while it uses fn. The first call to this runs both kernels once."""
    from modelpress.nn.triton_backend import direct_launcher

    fp8 = weight.dtype == torch.float8_e4m3fn
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    m, device = x2.shape[0], x.device
    out_shape = (*x.shape[:-1], n)
    codes, scales = _row_outputs(x2, fp8)
    grid, args, constants = _quantize_call(x2, codes, scales, fp8)
    quantize = direct_launcher(_quantize_rows_kernel, grid, args, constants) if m else None
    if quantize is None:
        return None
    code_dtype = codes.dtype

    def quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.empty((m, k), dtype=code_dtype, device=device)
        sc = torch.empty((m, 1), dtype=torch.float32, device=device)
        quantize(x, c, sc, k, k, k)   # x, codes, scales, K and the row strides of x and of the codes
        return c, sc

    if scale_row is not None:
        b = None if bias is None else bias.to(x.dtype)
        wt = weight.t()

        def fn(x: torch.Tensor) -> torch.Tensor:
            c, sc = quantized(x)
            y = torch._scaled_mm(c, wt, scale_a=sc, scale_b=scale_row, out_dtype=x.dtype)
            return (y if b is None else y + b).reshape(out_shape)

        fn.keep = b  # type: ignore[attr-defined]
        return fn
    out = torch.empty((m, n), dtype=x.dtype, device=device)
    grid2, args2, constants2 = _matmul_call(codes, scales, weight, weight_scale, bias, out, flip, None, False)
    gemm = direct_launcher(_scaled_matmul_kernel, grid2, args2, constants2)
    if gemm is None:
        return None
    _, w, _, sw, b, _, *tail = args2   # codes, weight, row scales, weight scales, bias, out, M, N, K, strides
    dtype = x.dtype

    def fn(x: torch.Tensor) -> torch.Tensor:
        c, sc = quantized(x)
        y = torch.empty((m, n), dtype=dtype, device=device)
        gemm(c, w, sc, sw, b, y, *tail)
        return y.reshape(out_shape)

    return fn
