"""The gated MLP's activation, silu(gate) * up, in one Triton kernel (CUDA).

A Llama-style MLP computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: with gate and up as one matmul
(inference/fusion.py), what lies between it and down_proj is a SiLU and a product, two kernels a layer at batch-1
decode. `silu_mul(h)` takes h = [gate | up] along its last dimension and returns silu(gate) * up in one launch,
rounded as PyTorch's two operations round: silu in float32 (libdevice's expf and an IEEE division, as PyTorch's
CUDA kernel computes it) rounded to h's dtype, then the product rounded again.
"""

from __future__ import annotations

import functools

import torch

from modelpress.nn.triton_backend import bf16_rounding, pdl_launch, triton_available

_DTYPES = (torch.bfloat16, torch.float32)  # float16 would need a rounding the compiler may fold away (triton_rope)
BLOCK = 1024


@functools.cache
def _kernel():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _bf16 = bf16_rounding()
    @triton.jit
    def silu_mul_kernel(h_ptr, out_ptr, width, stride_row, BLOCK: tl.constexpr, BF16: tl.constexpr,
                        PDL: tl.constexpr = False):
        if PDL:  # triton_backend.pdl_launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(h_ptr + row * stride_row + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_row + width + cols, mask=inside, other=0.0).to(tl.float32)
        act = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate))
        if BF16:
            act = _bf16(act)
        tl.store(out_ptr + row * width + cols, (act * up).to(out_ptr.dtype.element_ty), mask=inside)

    return silu_mul_kernel


def silu_mul(h: torch.Tensor) -> torch.Tensor | None:
    """silu(h[..., :I]) * h[..., I:] for h (..., 2I), as (..., I); None where the kernel does not serve the call
    (not CUDA, no Triton, float16 or other dtypes, rows not contiguous): the caller computes it itself."""
    if not h.is_cuda or h.dtype not in _DTYPES or h.shape[-1] % 2 or h.numel() == 0 or not triton_available():
        return None
    rows = h.reshape(-1, h.shape[-1])
    if rows.stride(-1) != 1:
        return None
    width = h.shape[-1] // 2
    out = torch.empty(*h.shape[:-1], width, dtype=h.dtype, device=h.device)
    pdl = pdl_launch(h.device)
    with torch.cuda.device(h.device):
        _kernel()[(rows.shape[0], -(-width // BLOCK))](rows, out, width, rows.stride(0), BLOCK=BLOCK,
                                                      BF16=h.dtype == torch.bfloat16, PDL=pdl, num_warps=4,
                                                      launch_pdl=pdl)
    return out
