"""RMS norms of transformers' decoder layers in one Triton kernel (CUDA).

transformers writes the norm as eight tensor operations (a cast to float32, square, mean, add, rsqrt, multiply,
cast back, multiply by the weight), each its own kernel: at batch-1 decode a 7B model's 65 norms are over 500
launches a token, each a few microseconds of a GPU that has almost nothing to compute. `rms_norm` does the same
arithmetic in one launch per call, one program per row, in both conventions:

- llama (Llama, Mistral, Qwen2/3, Phi-3, Mixtral): y = (x * rsqrt(mean(x²) + eps)) rounded to x's dtype, times the
  weight, in the promoted dtype of the two;
- gemma (Gemma 2/3): y = x * rsqrt(mean(x²) + eps) * (1 + weight), in float32, rounded to x's dtype once.

The rows may be strided in two levels ((A, B, D) with any strides of A and B), so the per-head q/k norms of a
query sliced from a fused q/k/v output are read where they lie, without a copy.

`add_rms_norm` also takes a decoder layer's residual add into the launch: s = x + residual rounded to x's dtype is
stored and normalized as stored, which is what the layer's own `residual + hidden_states` and norm compute.

Both can also write their output a second time in the order the tensor-core GEMV's rows mode reads it
(`laid=True`: mma_ptx.fragment_order, 256 contiguous bytes a warp load instead of 8 bytes from each of 8 rows),
for a norm whose output feeds a layer re-laid for that GEMV (inference/fusion.py): the copy is attached to the
output as `output.mma_laid`, and QuantLinear reads it instead of the output. On an H200, 8 rows of the 7B shape's
q/k/v (12288x4096) and gate/up (22016x4096) weights take 12.6 / 20.4 µs from the laid copy against 16.0 / 28.6 from
the rows as stored (bench/mma_gemv.py --rows 8 --laid).
"""

from __future__ import annotations

import functools

import torch

from modelpress.nn.triton_backend import bf16_rounding, pdl_launch, triton_available

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WIDTH = 16384


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    _bf16 = bf16_rounding()
    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, r_ptr, sum_ptr, laid_ptr, inner, stride_outer, stride_inner, n,
                        rows, fragments, eps, BLOCK: tl.constexpr, GEMMA: tl.constexpr, ROUND_BF16: tl.constexpr,
                        RESIDUAL: tl.constexpr, LAID: tl.constexpr = False, PDL: tl.constexpr = False):
        if PDL:  # triton_backend.pdl_launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        base = (row // inner) * stride_outer + (row % inner) * stride_inner
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        if LAID:  # programs past the last row write the laid copy's zero rows (8 a fragment) and nothing else
            inside = inside & (row + 0 * cols < rows)
        x = tl.load(x_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
        if RESIDUAL:  # x + r rounded to x's dtype (bfloat16 or float32), stored, and normalized as stored
            x = x + tl.load(r_ptr + row * n + cols, mask=inside, other=0.0).to(tl.float32)
            if ROUND_BF16:
                x = _bf16(x)
            tl.store(sum_ptr + row * n + cols, x.to(sum_ptr.dtype.element_ty), mask=inside)
        scale = tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if GEMMA:
            y = x * scale * (1.0 + w)
        elif ROUND_BF16:  # rounded to x's dtype before the weight multiplies
            y = _bf16(x * scale) * w
        else:
            y = (x * scale).to(x_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(out_ptr + row * n + cols, y.to(out_ptr.dtype.element_ty), mask=inside)
        if LAID:  # element (row 8 f + g, column 64 c + 16 j + 4 t + e) at word ((c F + f) 4 + j) 32 + 4 g + t
            word = (((cols // 64) * fragments + row // 8) * 4 + (cols // 16) % 4) * 32 + 4 * (row % 8) + (cols // 4) % 4
            tl.store(laid_ptr + 4 * word + cols % 4, y.to(laid_ptr.dtype.element_ty), mask=cols < n)

    return rms_norm_kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, laid: bool = False
             ) -> torch.Tensor | None:
    """The norm of x's last dimension in one launch; None where the kernel does not serve the call (not CUDA,
    no Triton, other dtypes, rows wider than MAX_WIDTH, or strides it cannot follow): the caller runs its own.
    laid: also the output in fragment order, as `output.mma_laid`, where the rows mode would read it (laid_rows)."""
    if not _serves(x, weight):
        return None
    rows = x.reshape(1, -1, x.shape[-1]) if x.dim() <= 2 else x.flatten(0, -3)  # (A, B, n): a view where one exists
    if rows.stride(-1) != 1:
        return None
    out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch(rows, weight, out, None, None, eps, gemma, laid)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, laid: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s, norm(s)) for s = x + residual, as `s = x + residual` followed by a llama-convention norm of s computes
    them, in one launch (a decoder layer's residual add and the norm after it); None where the kernel does not
    serve: x and residual contiguous, of one shape and one dtype, bfloat16 or float32 (float16 sums would need a
    rounding the compiler may fold away). laid: as rms_norm's, for norm(s)."""
    if (not _serves(x, weight) or x.dtype not in (torch.bfloat16, torch.float32) or residual.dtype != x.dtype
            or residual.shape != x.shape or residual.device != x.device or not x.is_contiguous()
            or not residual.is_contiguous()):
        return None
    total = torch.empty_like(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch(x.reshape(1, -1, x.shape[-1]), weight, out, residual, total, eps, False, laid)
    return total, out


def laid_rows(out: torch.Tensor) -> int:
    """The rows of `out` a laid copy is written for: 2 to mma_ptx.MAX_ROWS rows (the tensor-core GEMV's rows mode)
    of 16-bit values, the width a multiple of its 64-column chunks; 0 where none is."""
    from modelpress.nn.mma_ptx import CHUNK, MAX_ROWS

    n = out.shape[-1]
    rows = out.numel() // n
    return rows if 2 <= rows <= MAX_ROWS and out.dtype in (torch.float16, torch.bfloat16) and n % CHUNK == 0 else 0


def _serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n = x.shape[-1]
    return (x.is_cuda and x.dtype in _DTYPES and weight.dtype in _DTYPES and weight.shape == (n,)
            and weight.device == x.device and 0 < n <= MAX_WIDTH and x.numel() > 0 and triton_available())


def _launch(rows, weight, out, residual, total, eps: float, gemma: bool, laid: bool = False) -> None:
    """One program a row; with laid (where laid_rows(out) serves), out's copy in fragment order is attached to out
    as `mma_laid`, every fragment's rows written (those past the last row zero)."""
    n = rows.shape[-1]
    count = rows.shape[0] * rows.shape[1]
    block = max(16, 1 << (n - 1).bit_length())
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    fragments = -(-laid_rows(out) // 8) if laid else 0
    copy = torch.empty((n // 64, fragments, 4, 32), dtype=torch.int64, device=out.device) if fragments else out
    pdl = pdl_launch(rows.device)
    with torch.cuda.device(rows.device):
        _kernel()[(8 * fragments if fragments else count,)](
            rows, weight, out, rows if residual is None else residual, out if total is None else total,
            copy.view(out.dtype), rows.shape[1], rows.stride(0), rows.stride(1), n, count, fragments, eps,
            BLOCK=block, GEMMA=gemma, ROUND_BF16=rows.dtype == torch.bfloat16, RESIDUAL=residual is not None,
            LAID=bool(fragments), PDL=pdl, num_warps=warps, launch_pdl=pdl)
    if fragments:
        out.mma_laid = copy
