"""Float matmuls of a few rows (2 to MAX_ROWS) in one Triton kernel that reads the weight once at the memory's pace
(CUDA): the verify pass of speculative decoding, which scores k + 1 tokens at once.

cuBLAS serves one row with a GEMV and many rows with tiled GEMMs; in between, at 2-16 rows, its GEMM tiles cover
few column blocks of a decode-sized weight (4096 output rows in 128-row tiles are 32 programs on a GPU of 132
multiprocessors), so a 5-row matmul of a 7B layer takes up to twice the time of one row while reading the same
bytes. `skinny_linear(x, weight, bias)` gives every program BLOCK_N output rows, all of x's rows padded to 16 in
registers, and the tensor cores (float32 sums of exact products), so the whole GPU streams the weight.
"""

from __future__ import annotations

import functools

import torch

from modelpress.nn.triton_backend import pdl_launch, triton_available

MAX_ROWS = 16
_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_K = 128
TARGET_PROGRAMS = 256  # BLOCK_N shrinks from 64 until the output rows give at least this many programs


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PDL: tl.constexpr = False):
        if PDL:  # triton_backend.pdl_launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tokens = tl.arange(0, 16)
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + ks[None, :]
        x_ptrs = x_ptr + tokens[None, :] * stride_x + ks[:, None]
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=rows[:, None] < N, other=0.0)
            x = tl.load(x_ptrs, mask=tokens[None, :] < M, other=0.0)
            acc = tl.dot(w, x, acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + tokens[None, :] * stride_y + rows[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (tokens[None, :] < M))

    return skinny_kernel


def block_n(n: int) -> int:
    """Output rows a program: 64, halved (to 16) while the programs would number fewer than TARGET_PROGRAMS."""
    size = 64
    while size > 16 and -(-n // size) < TARGET_PROGRAMS:
        size //= 2
    return size


def serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_linear computes x @ weight.T: CUDA, 16-bit, 2..MAX_ROWS rows, K a multiple of BLOCK_K, the
    weight contiguous, Triton present."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.is_cuda and x.dtype in _DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and 2 <= rows <= MAX_ROWS and x.shape[-1] == weight.shape[1] and weight.shape[1] % BLOCK_K == 0
            and weight.is_contiguous() and weight.device == x.device and triton_available())


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T (+ bias) for x (..., K) of 2..MAX_ROWS rows in all, weight (N, K); None where the kernel does
    not serve the call (`serves`): the caller runs F.linear."""
    if not serves(x, weight) or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())):
        return None
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    size = block_n(n)
    pdl = pdl_launch(x.device)
    with torch.cuda.device(x.device):
        _kernel()[(-(-n // size),)](rows, weight, bias if bias is not None else weight, out, rows.shape[0], n, k,
                                    rows.stride(0), weight.stride(0), out.stride(0), BLOCK_N=size, BLOCK_K=BLOCK_K,
                                    EVEN_N=n % size == 0, HAS_BIAS=bias is not None, PDL=pdl, num_warps=4,
                                    num_stages=4, launch_pdl=pdl)
    return out.view(*x.shape[:-1], n)
