"""A decode step's keys and values written into a static cache in one Triton kernel (CUDA).

The static cache (inference/static_decode.py) writes each attention layer's new keys and values at the step's
positions with two `index_copy_` calls: two launches a layer, each a few microseconds of a GPU with a few
kilobytes to move. `write_kv` does both in one launch, reading keys and values with any strides (a rotary
kernel's output and a value sliced out of a fused q/k/v output are read where they lie). It copies, so the cache
holds exactly what `index_copy_` would have written.

`write_kv_int8` does the same for an int8 cache (inference/static_kv.py), which otherwise quantizes keys and values
with a dozen small PyTorch kernels each (absmax, scale, its float16 rounding, divide, round, clamp, offset, two
index copies): one launch quantizes every (row, head, token) vector and writes its codes and its scale, bit for bit
what kv_quant.quantize_per_token and static_kv.write_store write on CUDA (the scale as PyTorch's division by a
number, a multiplication by its float32 reciprocal; the codes by IEEE division, ties to even).
"""

from __future__ import annotations

import functools

import torch

from modelpress.nn.triton_backend import pdl_launch, triton_available


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def write_kv_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, k_scales, v_scales, index_ptr, H, T,
                        k_sb, k_sh, k_st, v_sb, v_sh, v_st, c_sb, c_sh, c_st, s_sb, s_sh, s_st, D,
                        BLOCK_D: tl.constexpr, INT8: tl.constexpr = False, PDL: tl.constexpr = False):
        """One program per (b, h, t): the key and value vectors copied to position index[t] of the cache, or with
        INT8 their int8 codes there and their float16 scales in k_scales / v_scales."""
        if PDL:  # triton_backend.pdl_launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        program = tl.program_id(0).to(tl.int64)
        h = program % H
        t = (program // H) % T
        b = program // (H * T)
        slot = tl.load(index_ptr + t).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        inside = d < D
        dst = b * c_sb + h * c_sh + slot * c_st + d
        for which in tl.static_range(2):  # keys, then values
            if which == 0:
                x = tl.load(k_ptr + b * k_sb + h * k_sh + t * k_st + d, mask=inside, other=0.0)
            else:
                x = tl.load(v_ptr + b * v_sb + h * v_sh + t * v_st + d, mask=inside, other=0.0)
            if INT8:
                # kv_quant.quantize_per_token as PyTorch runs it on CUDA: scale = absmax · float32(1 / 127)
                # (PyTorch divides by a Python number that way; 1 for an all-zero vector) clamped to float16's
                # normal range and rounded to float16; code = clamp(round-half-even(x / scale), -128, 127) + 128,
                # an IEEE division. Adding and removing 1.5 · 2**23 rounds to an integer, ties to even, wherever
                # |x / scale| < 2**22; beyond that the clamp gives the same code as exact rounding would
                x = x.to(tl.float32)
                amax = tl.max(tl.abs(x), axis=0)
                scale = tl.where(amax > 0, amax * (1.0 / 127.0), 1.0)
                scale = tl.minimum(tl.maximum(scale, 6.103515625e-05), 65504.0).to(tl.float16)
                q = (tl.math.div_rn(x, scale.to(tl.float32)) + 12582912.0) - 12582912.0
                x = (tl.minimum(tl.maximum(q, -128.0), 127.0) + 128.0).to(tl.uint8)
                scale_dst = b * s_sb + h * s_sh + slot * s_st
                if which == 0:
                    tl.store(k_scales + scale_dst, scale)
                else:
                    tl.store(v_scales + scale_dst, scale)
            if which == 0:
                tl.store(keys_ptr + dst, x, mask=inside)
            else:
                tl.store(values_ptr + dst, x, mask=inside)

    return write_kv_kernel


def write_kv_int8(key_codes: torch.Tensor, key_scales: torch.Tensor, value_codes: torch.Tensor,
                  value_scales: torch.Tensor, index: torch.Tensor, key_states: torch.Tensor,
                  value_states: torch.Tensor) -> bool:
    """An int8 cache's per-token quantization and its writes in one launch: for each (b, h, t) the codes of
    key_states[b, h, t] and value_states[b, h, t] (B, H, T, D) at position index[t] of key_codes / value_codes
    (uint8, (B, H, L, D)) and their float16 scales there in key_scales / value_scales ((B, H, L, 1)). False
    (nothing written) where the kernel does not serve the call; the caller then quantizes and copies itself. As
    write_kv, positions are not bounds-checked on the device."""
    b, h, t, d = key_states.shape
    if not (key_codes.is_cuda and key_codes.dim() == 4 and value_states.shape == key_states.shape
            and key_codes.shape[:2] == (b, h) and key_codes.shape[3] == d and value_codes.shape == key_codes.shape
            and value_codes.stride() == key_codes.stride() and key_codes.stride(3) == 1
            and key_codes.dtype == value_codes.dtype == torch.uint8
            and key_scales.shape == value_scales.shape == (*key_codes.shape[:3], 1)
            and key_scales.stride() == value_scales.stride()
            and key_scales.dtype == value_scales.dtype == torch.float16
            and key_states.dtype == value_states.dtype
            and key_states.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and key_states.stride(3) == 1 and value_states.stride(3) == 1
            and index.shape == (t,) and not index.is_floating_point()
            and len({key_codes.device, value_codes.device, key_scales.device, value_scales.device,
                     key_states.device, value_states.device, index.device}) == 1
            and key_states.numel() and triton_available()):
        return False
    _launch(key_states, value_states, key_codes, value_codes, index, (key_scales, value_scales))
    return True


def write_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, key_states: torch.Tensor,
             value_states: torch.Tensor) -> bool:
    """keys.index_copy_(2, index, key_states) and the same for values, in one launch; False (nothing written)
    where the kernel does not serve the call: the caller copies itself. keys and values (B, H, L, D) of one
    layout; key_states and value_states (B, H, T, D) of their dtype, each with its last dimension contiguous;
    index (T,) integer positions, on the same CUDA device. The positions must lie inside the cache: index_copy_'s
    bounds check on the device is not repeated (StaticDecoder checks its positions on the host before each
    forward)."""
    b, h, t, d = key_states.shape
    if not (keys.is_cuda and keys.dim() == 4 and value_states.shape == key_states.shape
            and keys.shape[:2] == (b, h) and keys.shape[3] == d and values.shape == keys.shape
            and values.stride() == keys.stride() and keys.stride(3) == 1
            and key_states.stride(3) == 1 and value_states.stride(3) == 1
            and {keys.dtype, values.dtype, key_states.dtype, value_states.dtype} == {keys.dtype}
            and index.shape == (t,) and not index.is_floating_point()
            and len({keys.device, values.device, key_states.device, value_states.device, index.device}) == 1
            and key_states.numel() and triton_available()):
        return False
    _launch(key_states, value_states, keys, values, index)
    return True


def _launch(key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            index: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The write kernel over (B, H, T, D) states into the (B, H, L, D) cache: a copy, or with `scales` (the
    int8 cache's (B, H, L, 1) key and value scales) the codes and their scales."""
    b, h, t, d = key_states.shape
    key_scales, value_scales = scales if scales is not None else (keys, values)  # unread without INT8
    scale_strides = key_scales.stride()[:3] if scales is not None else (0, 0, 0)
    pdl = pdl_launch(keys.device)
    with torch.cuda.device(keys.device):
        _kernel()[(b * h * t,)](
            key_states, value_states, keys, values, key_scales, value_scales, index, h, t,
            *key_states.stride()[:3], *value_states.stride()[:3], *keys.stride()[:3], *scale_strides, d,
            BLOCK_D=max(16, 1 << (d - 1).bit_length()), INT8=scales is not None, PDL=pdl, num_warps=1,
            launch_pdl=pdl)
