"""Rotary position embeddings of queries and keys in one Triton kernel (CUDA).

transformers' `apply_rotary_pos_emb(q, k, cos, sin)` computes `q * cos + rotate_half(q) * sin` and the same for
k: with `rotate_half` (two slices, a negation, a concatenation) about ten kernels per attention layer, each a few
microseconds at batch-1 decode. `rotary(q, k, cos, sin)` does both in one launch, one program per token, rounding
each product and the sum to bfloat16 as PyTorch's separate operations do (float32 and bfloat16 activations). q and k are read with any
strides (queries sliced out of a fused q/k/v output included); the results are laid out as transformers' own
projections would give them: (B, T, heads, D) memory seen as (B, heads, T, D).
"""

from __future__ import annotations

import functools

import torch

from modelpress.nn.triton_backend import bf16_rounding, pdl_launch, triton_available

# float16 is not served: its products would need rounding to float16 in the kernel, which the compiler may fold away
_DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    _bf16 = bf16_rounding()
    @triton.jit
    def _rotate(x_ptr, out_ptr, heads, s_h, c1, c2, s1, s2, h, i, inside, BF16: tl.constexpr, D2: tl.constexpr):
        keep = (h < heads) & inside
        x1 = tl.load(x_ptr + h * s_h + i, mask=keep, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + h * s_h + D2 + i, mask=keep, other=0.0).to(tl.float32)
        ty = out_ptr.dtype.element_ty
        if BF16:  # each product rounded to bfloat16 before the sum, as separate PyTorch operations round them
            o1 = (_bf16(x1 * c1) - _bf16(x2 * s1)).to(ty)
            o2 = (_bf16(x2 * c2) + _bf16(x1 * s2)).to(ty)
        else:
            o1 = (x1 * c1 - x2 * s1).to(ty)
            o2 = (x2 * c2 + x1 * s2).to(ty)
        tl.store(out_ptr + h * (2 * D2) + i, o1, mask=keep)
        tl.store(out_ptr + h * (2 * D2) + D2 + i, o2, mask=keep)

    @triton.jit
    def rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, HQ, HK,
                    q_sb, q_st, q_sh, k_sb, k_st, k_sh, c_sb, c_st,
                    D2: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_H: tl.constexpr, BF16: tl.constexpr,
                    PDL: tl.constexpr = False):
        if PDL:  # triton_backend.pdl_launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row % T
        i = tl.arange(0, BLOCK_D2)[None, :]
        h = tl.arange(0, BLOCK_H)[:, None]
        inside = i < D2
        trig = b * c_sb + t * c_st + i
        c1 = tl.load(cos_ptr + trig, mask=inside, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + trig + D2, mask=inside, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + trig, mask=inside, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + trig + D2, mask=inside, other=0.0).to(tl.float32)
        _rotate(q_ptr + b * q_sb + t * q_st, qo_ptr + row * HQ * (2 * D2), HQ, q_sh, c1, c2, s1, s2, h, i, inside,
                BF16, D2)
        _rotate(k_ptr + b * k_sb + t * k_st, ko_ptr + row * HK * (2 * D2), HK, k_sh, c1, c2, s1, s2, h, i, inside,
                BF16, D2)

    return rope_kernel


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q_embed, k_embed) of transformers' apply_rotary_pos_emb(q, k, cos, sin) for q (B, Hq, T, D), k (B, Hk, T, D)
    and cos, sin (B or 1, T, D), all one dtype on one CUDA device; None where the kernel does not serve the call
    (the caller then runs transformers' own)."""
    if not (q.is_cuda and q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and cos.shape == sin.shape):
        return None
    b, hq, t, d = q.shape
    if (k.shape[0] != b or k.shape[2:] != (t, d) or cos.shape[1:] != (t, d) or cos.shape[0] not in (1, b)
            or d % 2 or q.dtype not in _DTYPES or {k.dtype, cos.dtype, sin.dtype} != {q.dtype}
            or len({q.device, k.device, cos.device, sin.device}) > 1 or cos.stride() != sin.stride()
            or q.stride(3) != 1 or k.stride(3) != 1 or cos.stride(2) != 1 or q.numel() == 0 or k.numel() == 0
            or not triton_available()):
        return None
    hk = k.shape[1]
    q_out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(b, t, hk, d, dtype=q.dtype, device=q.device)
    block_h = 1 << (max(hq, hk) - 1).bit_length()
    block_d2 = max(2, 1 << (d // 2 - 1).bit_length())
    warps = 4 if block_h * block_d2 <= 2048 else 8
    pdl = pdl_launch(q.device)
    with torch.cuda.device(q.device):
        _kernel()[(b * t,)](
            q, k, cos, sin, q_out, k_out, t, hq, hk,
            q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
            0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1),
            D2=d // 2, BLOCK_D2=block_d2, BLOCK_H=block_h, BF16=q.dtype == torch.bfloat16, PDL=pdl,
            num_warps=warps, launch_pdl=pdl)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)
