"""A decode step's keys and values written into a static cache in one Triton kernel (CUDA).

The static cache (inference/static_decode.py) writes each attention layer's new keys and values at the step's
positions with two `index_copy_` calls: two launches a layer, each a few microseconds of a GPU with a few
kilobytes to move. `write_kv` does both in one launch, reading keys and values with any strides (a rotary
kernel's output and a value sliced out of a fused q/k/v output are read where they lie). It copies, so the cache
holds exactly what `index_copy_` would have written.
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
    def write_kv_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, index_ptr, H, T,
                        k_sb, k_sh, k_st, v_sb, v_sh, v_st, c_sb, c_sh, c_st, D, BLOCK_D: tl.constexpr,
                        PDL: tl.constexpr = False):
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
        k = tl.load(k_ptr + b * k_sb + h * k_sh + t * k_st + d, mask=inside)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + t * v_st + d, mask=inside)
        tl.store(keys_ptr + dst, k, mask=inside)
        tl.store(values_ptr + dst, v, mask=inside)

    return write_kv_kernel


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
    pdl = pdl_launch(keys.device)
    with torch.cuda.device(keys.device):
        _kernel()[(b * h * t,)](
            key_states, value_states, keys, values, index, h, t,
            key_states.stride(0), key_states.stride(1), key_states.stride(2),
            value_states.stride(0), value_states.stride(1), value_states.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2), d,
            BLOCK_D=max(16, 1 << (d - 1).bit_length()), PDL=pdl, num_warps=1, launch_pdl=pdl)
    return True
