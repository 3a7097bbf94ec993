"""Attention of a few new tokens over a long KV cache, split along the cache (flash-decoding), in Triton (CUDA).

At batch-1 decode a query is one row per head against every position of the static cache (inference/
static_decode.py keeps `max_len` positions and masks those not written yet). PyTorch's SDPA runs that as one
program per query head walking the whole cache: on a 7B grouped-query model (8 key/value heads) that is 25 µs
over 640 positions and 182 µs over 8192 on an H200, each head's keys and values read again for every query head
of its group. Here the cache is split (flash-decoding):

- `_partial_kernel`: one program per (sequence, key/value head, split of the cache), enough splits that the
  programs fill the GPU a few times over (`split_plan`). A program holds the query rows of its key/value head (the G
  query heads of the group times the T query tokens) as one tile, walks its split in blocks of BLOCK_S positions
  with an online softmax, and writes per row its largest score m, the sum l of exp(score - m) and the sum of
  exp(score - m) * value. Keys and values are read once for the whole group. A block no row may attend (beyond
  the written part of the cache, outside a sliding window) is skipped: its keys and values are not read.
  Where each key/value head has one query row (a key/value head per query head, one token) and the cache is int8
  codes or the programs fill the GPU (`one_row_kernels`), the row is not padded to a 16-row tensor-core tile:
  products and sums run on the CUDA cores, one warp a program, with no tile to lay out for the MMA; their splits
  take every splits-th block of the cache, so that a cache written in part still spreads over all of them.
- `_combine_kernel` merges the splits of each query row: with M the largest m, out = sum(exp(m - M) acc) /
  sum(exp(m - M) l), written as transformers' attention functions return it, (B, T, H, D).

Precision: the scores are the tensor cores' products of the stored queries and keys summed in float32 (exact
products for 16-bit inputs); the softmax is float32; the probabilities multiply the values in the values' 16-bit
type with float32 sums, as FlashAttention does (float32 inputs: TF32x3 products, float32 accuracy); one rounding
to the query's dtype at the end; the one-row kernels multiply and sum everything in float32 on the CUDA cores.
The mask is additive (a float tensor: values at or below half the dtype's minimum exclude a position, others are
added to the scores, as SDPA adds them) or boolean (True attends).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from modelpress.nn.triton_backend import _interpreting, pdl_launch, triton_available

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TOKENS = 16  # query tokens per call served (decode steps, speculative verification); more: the caller's SDPA
MAX_HEAD_DIM = 256
MAX_ROWS = 64  # query heads sharing a key/value head, times the query tokens
# One query row a key/value head (a key/value head per query head, one token) on the CUDA cores instead of a tile of
# 16 rows, 15 of them padding, on the tensor cores: for int8 codes always, for float states where the (sequence,
# key/value head) programs fill the GPU at least VECTOR_MIN_WAVES times without splitting the cache. H100, Llama-2-7B
# shape, 16 sequences over 640 positions, µs a layer (bench/decode_attention.py --batch 16 [--codes] [--vector
# never]): float cache 92.6 -> 71.3, int8 codes 102.8 -> 57.4 (with the plans of then); decode through generate,
# int4/g128 at 16 rows: 2740.5 -> 3052.6 tok/s on the float cache, 2559.9 -> 2952.1 on the int8 one. One sequence's
# int8 codes, with ONE_ROW_CODES_PLAN (session 38, --batch 1 --codes --vector always): 8.8 -> 7.7 µs over 640
# positions, 14.5 -> 9.7 over a 2048-position cache with 600 written, 40.7 -> 20.5 over a full 4096 (SDPA on the
# dequantized states 29.5). One sequence's float states stay on the tiles (measured before the one-warp plan: 8.9
# against 9.3 µs over 640 positions, 13.4 against 16.4 over 2048).
VECTOR_ROWS = True
VECTOR_MIN_WAVES = 1.0
VECTOR_MIN_WAVES_CODES = 0.0
# The kernels on int8 codes apply each token's scale to its score and its probability instead of decoding every
# value to the query's dtype: code - 128 is exact in every query dtype, so no rounding of the decoded states (the
# result is not bit for bit that of the kernels on the dequantized states, and closer to the exact attention of the
# codes: test_attention_codes.py) and fewer operations a value. H100, Llama-2-7B shape, int8 codes, µs a layer
# (bench/decode_attention.py --codes [--no-fold]): 16 sequences over 640 positions (one-row kernels) 59.9 -> 46.6
# (SDPA on float states: 58.3); one sequence 9.8 -> 8.5 over 640, 44.5 -> 40.7 over a full 4096. Decode through
# generate, int4/g128 on the int8 cache (bench/decode.py +nofold): 16 rows, 512-token prompts 3047 -> 3359 tok/s
# (the float cache: 3047), one row, 2048-token prompts 300.7 -> 342.0 (the float cache: 341.6). In float16 the tiles
# take each block's value scales relative to its largest, or probabilities times small scales (values of 1e-3) fall
# below float16's normal range (3.5x the decoded codes' error under the interpreter); not for bfloat16, where that
# costs back the gain at one sequence (H100, every dtype relative: 8.5 -> 10.0 µs over 640 positions).
FOLD_CODE_SCALES = True
# The one-row kernels' split s of the cache takes blocks s, s + splits, s + 2 splits, ... instead of one contiguous
# run, so that a static cache written only in part (a generation's early steps) still spreads its written blocks over
# every split (16 sequences' int8 codes over a 2048-position cache with 600 written: 64.8 -> 39.3 µs a layer). The
# tiles keep contiguous runs: interleaved, one sequence's int8 codes took 17.2 µs there against 14.5 (not analysed).
INTERLEAVED_SPLITS = True
# The one-row kernels' (BLOCK_S, waves, num_warps) on float states and on int8 codes: one warp a program (no sums
# across warps), blocks of 32 positions, programs filling the GPU 16 times over. H100, Llama-2-7B shape, 16 sequences,
# µs a layer over 640 / 2048 (600 written) positions (bench/decode_attention.py --batch 16 [--codes], session 38):
# float 71.5 / 75.7 -> 64.8 / 64.6 (SDPA 59.5 / 178.4; blocks of 64 with 4 warps and 4 waves before, contiguous),
# codes 46.4 / 44.8 -> 38.8 / 39.3 (blocks of 128 with 4 warps and 8 waves before). Over a full 4096-position
# cache: float 462.7 -> 366.1 (SDPA 350.9), codes 192.9 (537 MB of codes at 2.8 TB/s). 8 sequences' float cache over
# 640: 41.6 -> 35.1 (SDPA 31.5-32.0).
ONE_ROW_PLAN = (32, 16.0, 1)
ONE_ROW_CODES_PLAN = (32, 16.0, 1)


def one_row_kernels(rows_per_kv_head: int, programs: int, multiprocessors: int, codes: bool = False) -> bool:
    """Whether the partial kernel takes its one-row variant (VECTOR_ROWS) for `programs` (sequence, key/value head)
    pairs with `rows_per_kv_head` query rows each, on int8 codes (codes) or float states."""
    waves = VECTOR_MIN_WAVES_CODES if codes else VECTOR_MIN_WAVES
    return VECTOR_ROWS and rows_per_kv_head == 1 and programs >= waves * multiprocessors


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, ks_ptr, vs_ptr,
                        S, T, G, HKV, SPLITS, BLOCKS_PER_SPLIT, D, scaling, masked_below,
                        q_sb, q_sh, q_st, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, mask_sb, mask_st,
                        ks_sb, ks_sh, ks_ss, vs_sb, vs_sh, vs_ss,
                        MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, CODES: tl.constexpr = False, VECTOR: tl.constexpr = False,
                        FOLD: tl.constexpr = False, HALF: tl.constexpr = False, INTERLEAVED: tl.constexpr = False,
                        PDL: tl.constexpr = False):
        if PDL:  # triton_backend.pdl_launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // HKV).to(tl.int64)
        kvh = (bh % HKV).to(tl.int64)
        # query rows: the G heads that share this key/value head, for each of the T tokens
        r = tl.arange(0, ROWS)
        in_r = r < G * T
        t = r // G
        h = kvh * G + r % G
        d = tl.arange(0, BLOCK_D)
        in_d = d < D
        first = split * BLOCKS_PER_SPLIT  # INTERLEAVED (one-row kernels): the i-th block is split + i * SPLITS instead
        if VECTOR:  # one query row (G * T == 1): products and sums on the CUDA cores, no tile to lay out for MMA
            qv = tl.load(q_ptr + b * q_sb + kvh * q_sh + d, mask=in_d, other=0.0).to(tl.float32)
            top = tl.full((), float("-inf"), tl.float32)
            total = tl.zeros((), tl.float32)
            accv = tl.zeros((BLOCK_D,), tl.float32)
            for i in range(0, BLOCKS_PER_SPLIT):
                block = split + i * SPLITS if INTERLEAVED else first + i
                s = block * BLOCK_S + tl.arange(0, BLOCK_S)
                in_s = s < S
                if MASK == 0:
                    allowed = in_s
                    bias = tl.zeros((BLOCK_S,), tl.float32)
                else:
                    bias = tl.load(mask_ptr + b * mask_sb + s, mask=in_s, other=0).to(tl.float32)
                    allowed = in_s & (bias > masked_below)
                    bias = tl.where(allowed & (MASK == 1), bias, 0.0)
                if tl.max(allowed.to(tl.int32), axis=0) > 0:
                    kv_tile = allowed[:, None] & in_d[None, :]
                    k = tl.load(k_ptr + b * k_sb + kvh * k_sh + s[:, None] * k_ss + d[None, :], mask=kv_tile,
                                other=0)
                    v = tl.load(v_ptr + b * v_sb + kvh * v_sh + s[:, None] * v_ss + d[None, :], mask=kv_tile,
                                other=0)
                    if CODES:
                        k_scale = tl.load(ks_ptr + b * ks_sb + kvh * ks_sh + s * ks_ss, mask=allowed,
                                          other=0.0).to(tl.float32)
                        v_scale = tl.load(vs_ptr + b * vs_sb + kvh * vs_sh + s * vs_ss, mask=allowed,
                                          other=0.0).to(tl.float32)
                        if FOLD:  # (code - 128) exactly in float32; the scales on the sums, not on each value
                            k = k.to(tl.float32) - 128.0
                            v = v.to(tl.float32) - 128.0
                        else:  # decoded and rounded to the query's dtype, as in the tile path below
                            dtype = q_ptr.dtype.element_ty
                            k = ((k.to(tl.int32) - 128).to(tl.float32) * k_scale[:, None]).to(dtype)
                            v = ((v.to(tl.int32) - 128).to(tl.float32) * v_scale[:, None]).to(dtype)
                    scores = tl.sum(k.to(tl.float32) * qv[None, :], axis=1)
                    if CODES and FOLD:
                        scores = scores * k_scale
                    scores = tl.where(allowed, scores * scaling + bias, float("-inf"))
                    new_top = tl.maximum(top, tl.max(scores, axis=0))
                    base = tl.where(new_top == float("-inf"), 0.0, new_top)
                    keep = tl.exp(top - base)
                    p = tl.exp(scores - base)
                    total = total * keep + tl.sum(p, axis=0)
                    weights = p * v_scale if CODES and FOLD else p
                    accv = accv * keep + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
                    top = new_top
            out = (b * (HKV * G) + kvh) * SPLITS + split
            tl.store(m_ptr + out, top)
            tl.store(l_ptr + out, total)
            tl.store(acc_ptr + out * D + d, accv, mask=in_d)
        else:
            q = tl.load(q_ptr + b * q_sb + h[:, None] * q_sh + t[:, None] * q_st + d[None, :],
                        mask=in_r[:, None] & in_d[None, :], other=0.0)
            top = tl.full((ROWS,), float("-inf"), tl.float32)
            total = tl.zeros((ROWS,), tl.float32)
            acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
            for block in range(first, first + BLOCKS_PER_SPLIT):
                s = block * BLOCK_S + tl.arange(0, BLOCK_S)
                in_s = s < S
                if MASK == 0:
                    allowed = in_r[:, None] & in_s[None, :]
                    bias = tl.zeros((ROWS, BLOCK_S), tl.float32)
                else:
                    tile = in_r[:, None] & in_s[None, :]
                    bias = tl.load(mask_ptr + b * mask_sb + t[:, None] * mask_st + s[None, :], mask=tile,
                                   other=0).to(tl.float32)
                    allowed = tile & (bias > masked_below)
                    bias = tl.where(allowed & (MASK == 1), bias, 0.0)  # additive masks add what they keep
                needed = tl.max(allowed.to(tl.int32), axis=0) > 0  # (BLOCK_S,) positions some row attends
                if tl.max(needed.to(tl.int32), axis=0) > 0:  # else the block is skipped: nothing read
                    kv_tile = needed[:, None] & in_d[None, :]
                    k = tl.load(k_ptr + b * k_sb + kvh * k_sh + s[:, None] * k_ss + d[None, :], mask=kv_tile,
                                other=0)
                    v = tl.load(v_ptr + b * v_sb + kvh * v_sh + s[:, None] * v_ss + d[None, :], mask=kv_tile,
                                other=0)
                    if CODES:  # int8 codes (offset-binary uint8) and one scale a token
                        k_scale = tl.load(ks_ptr + b * ks_sb + kvh * ks_sh + s * ks_ss, mask=needed,
                                          other=0.0).to(tl.float32)
                        v_scale = tl.load(vs_ptr + b * vs_sb + kvh * vs_sh + s * vs_ss, mask=needed,
                                          other=0.0).to(tl.float32)
                        if FOLD:  # code - 128 is exact in every query dtype; the scales go on scores, probabilities
                            k = (k.to(tl.float32) - 128.0).to(q.dtype)
                            v = (v.to(tl.float32) - 128.0).to(q.dtype)
                        else:  # times the token's scale and rounded to the query's dtype, as kv_quant dequantizes
                            k = ((k.to(tl.int32) - 128).to(tl.float32) * k_scale[:, None]).to(q.dtype)
                            v = ((v.to(tl.int32) - 128).to(tl.float32) * v_scale[:, None]).to(q.dtype)
                    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                    if CODES and FOLD:
                        scores = scores * k_scale[None, :]
                    scores = tl.where(allowed, scores * scaling + bias, float("-inf"))
                    new_top = tl.maximum(top, tl.max(scores, axis=1))
                    base = tl.where(new_top == float("-inf"), 0.0, new_top)
                    keep = tl.exp(top - base)
                    p = tl.exp(scores - base[:, None])  # 0 where excluded
                    total = total * keep + tl.sum(p, axis=1)
                    if CODES and FOLD and HALF:  # probabilities times scales relative to the block's largest:
                        unit = tl.max(v_scale, axis=0)  # below float16's normal range otherwise for small values
                        unit = tl.where(unit > 0, unit, 1.0)  # (values of 1e-3: 3.5x the rounding error)
                        weights = (p * (v_scale / unit)[None, :]).to(v.dtype)
                        acc = acc * keep[:, None] + tl.dot(weights, v, input_precision=PRECISION) * unit
                    elif CODES and FOLD:  # bfloat16 and float32 have float32's exponent range
                        acc = acc * keep[:, None] + tl.dot((p * v_scale[None, :]).to(v.dtype), v,
                                                           input_precision=PRECISION)
                    else:
                        acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                    top = new_top
            out = ((b * (HKV * G) + h) * T + t) * SPLITS + split
            tl.store(m_ptr + out, top, mask=in_r)
            tl.store(l_ptr + out, total, mask=in_r)
            tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=in_r[:, None] & in_d[None, :])

    @triton.jit
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, H, T, CHUNKS, D, o_sb, o_st, o_sh,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # triton_backend.pdl_launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)  # (b * H + h) * T + t
        t = row % T
        h = (row // T) % H
        b = row // (T * H)
        c = tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        in_d = d < D
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for c0 in range(0, CHUNKS, BLOCK_C):
            cc = c0 + c
            inside = cc < CHUNKS
            m = tl.load(m_ptr + row * CHUNKS + cc, mask=inside, other=float("-inf"))
            l = tl.load(l_ptr + row * CHUNKS + cc, mask=inside, other=0.0)
            a = tl.load(acc_ptr + (row * CHUNKS + cc)[:, None] * D + d[None, :], mask=inside[:, None] & in_d[None, :],
                        other=0.0)
            new_top = tl.maximum(top, tl.max(m, axis=0))
            base = tl.where(new_top == float("-inf"), 0.0, new_top)
            keep = tl.exp(top - base)
            w = tl.exp(m - base)
            total = total * keep + tl.sum(w * l, axis=0)
            acc = acc * keep + tl.sum(w[:, None] * a, axis=0)
            top = new_top
        tl.store(out_ptr + b * o_sb + t * o_st + h * o_sh + d, (acc / total).to(out_ptr.dtype.element_ty), mask=in_d)

    return _partial_kernel, _combine_kernel


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def split_plan(positions: int, programs: int, multiprocessors: int, block_s: int | None = None,
               warps: int | None = None, waves: float | None = None, one_row: bool = False,
               codes: bool = False, head_dim: int = 128) -> tuple[int, int, int]:
    """(BLOCK_S, splits, num_warps) for a cache of `positions` and `programs` (sequence, key/value head) pairs:
    enough splits of the cache that the programs fill the GPU `waves` times over (one program per multiprocessor
    and wave), blocks of `block_s` positions. The tiles' defaults from bench/decode_attention.py on an H200: blocks
    of 64, 4 warps and 4 waves up to 4096 positions, blocks of 128 and 2 waves beyond (fewer splits to merge).
    one_row (the one-row kernels), on float states or int8 codes: ONE_ROW_PLAN or ONE_ROW_CODES_PLAN at any length,
    their blocks shortened for heads wider than 128 so that a warp's tile holds no more values than timed (16 sequences
    over 640 positions: one warp holding 16 KB of a tile, 128 positions of 128 codes, took 645.7 µs; 8 KB, 46.2)."""
    if one_row:
        default_block, default_waves, default_warps = ONE_ROW_CODES_PLAN if codes else ONE_ROW_PLAN
        width = 1 << (max(head_dim, 128) - 1).bit_length()  # the head as the kernel pads it (BLOCK_D)
        default_block = max(16, default_block * 128 // width)
    elif positions > 4096:
        default_block, default_waves, default_warps = 128, 2.0, 4
    else:
        default_block, default_waves, default_warps = 64, 4.0, 4
    block_s, waves, warps = block_s or default_block, waves or default_waves, warps or default_warps
    blocks = -(-positions // block_s)
    splits = max(1, min(blocks, round(waves * multiprocessors / programs)))
    return block_s, splits, warps


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, plan: tuple[int, int, int] | None = None, key_scale: torch.Tensor | None = None,
                     value_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(query key^T * scaling + mask) value for query (B, H, T, D) over key and value (B, HKV, S, D) (H a
    multiple of HKV: grouped-query heads share a key/value head), as (B, T, H, D) in the query's dtype; None where
    the kernels do not serve the call (not CUDA, more than MAX_TOKENS query tokens or MAX_ROWS query rows a
    key/value head, a per-head mask, mixed dtypes or devices, rows not contiguous): the caller runs its own
    attention. mask: None (every position attends; one query token only), or (B or 1, 1, T, S), additive float or
    boolean. plan: (BLOCK_S, splits, num_warps), else split_plan's.

    key_scale, value_scale: key and value are then the int8 KV cache's codes (kv_cache.py's per-token `int8` mode:
    offset-binary uint8, (B, HKV, S, D)) with one float16 scale a token, (B, HKV, S, 1), read at half the bytes:
    code - 128 in the query's dtype, the scales applied to scores and probabilities (FOLD_CODE_SCALES), or else each
    tile decoded as kv_quant.dequantize_per_token does ((code - 128) x scale in float32, rounded to the query's
    dtype: the result of this function on the dequantized states). The static int8 cache (static_kv.py) hands
    attention its codes under fusion.READ_INT8_CODES."""
    codes = key_scale is not None
    if codes:
        if not (value_scale is not None and key.dtype == value.dtype == torch.uint8
                and key_scale.dtype == value_scale.dtype == torch.float16 and key_scale.dim() == value_scale.dim() == 4
                and key_scale.shape == value_scale.shape == (*key.shape[:3], 1)
                and key_scale.device == value_scale.device == key.device):
            return None
    if not ((query.is_cuda or _interpreting()) and query.dim() == 4 and key.dim() == 4 and key.shape == value.shape
            and query.dtype in _DTYPES and (codes or (key.dtype == query.dtype and value.dtype == query.dtype))
            and triton_available()):
        return None
    b, h, t, d = query.shape
    _, hkv, s, _ = key.shape
    if not (key.shape[0] == b and key.shape[3] == d and 0 < t <= MAX_TOKENS and d <= MAX_HEAD_DIM and s > 0
            and hkv > 0 and h % hkv == 0 and h // hkv * t <= MAX_ROWS and query.stride(3) == 1
            and key.stride(3) == 1 and value.stride(3) == 1 and len({query.device, key.device, value.device}) == 1):
        return None
    kind, masked_below, mask_sb, mask_st = 0, 0.0, 0, 0
    if mask is None:
        if t != 1:  # several tokens without a mask: which may see which is not said
            return None
    else:
        if not (mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1] == 1 and mask.shape[2] == t
                and mask.shape[3] == s and mask.stride(3) == 1 and mask.device == query.device):
            return None
        if mask.dtype == torch.bool:
            kind, mask, masked_below = 2, mask.view(torch.int8), 0.5  # True (1) attends
        elif mask.is_floating_point():
            kind, masked_below = 1, torch.finfo(mask.dtype).min / 2
        else:
            return None
        mask_sb = mask.stride(0) if mask.shape[0] == b and b > 1 else 0
        mask_st = mask.stride(2)
    sms = _multiprocessors(query.device)
    vector = one_row_kernels(h // hkv * t, b * hkv, sms, codes)
    block_s, splits, warps = plan or split_plan(s, b * hkv, sms, one_row=vector, codes=codes, head_dim=d)
    blocks_per_split = -(-(-(-s // block_s)) // splits)
    splits = -(-(-(-s // block_s)) // blocks_per_split)  # none left empty
    rows = b * h * t
    m = torch.empty(rows * splits, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    acc = torch.empty(rows * splits * d, dtype=torch.float32, device=query.device)
    out = torch.empty(b, t, h, d, dtype=query.dtype, device=query.device)
    block_d = max(16, 1 << (d - 1).bit_length())
    partial, combine = _kernels()
    pdl = pdl_launch(query.device)
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        scales = (key_scale, value_scale) if codes else (m, m)   # unread without codes
        scale_strides = [*key_scale.stride()[:3], *value_scale.stride()[:3]] if codes else [0] * 6
        partial[(b * hkv, splits)](
            query, key, value, mask if mask is not None else query, m, l, acc, *scales,
            s, t, h // hkv, hkv, splits, blocks_per_split, d, float(scaling), float(masked_below),
            query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), mask_sb, mask_st, *scale_strides,
            MASK=kind, ROWS=max(16, 1 << (h // hkv * t - 1).bit_length()), BLOCK_S=block_s, BLOCK_D=block_d,
            PRECISION="tf32x3" if query.dtype == torch.float32 else "tf32", CODES=codes,
            VECTOR=vector, FOLD=codes and FOLD_CODE_SCALES, HALF=query.dtype == torch.float16,
            INTERLEAVED=vector and INTERLEAVED_SPLITS, PDL=pdl, num_warps=warps,
            launch_pdl=pdl)
        combine[(rows,)](m, l, acc, out, h, t, splits, d, out.stride(0), out.stride(1), out.stride(2),
                         BLOCK_C=32, BLOCK_D=block_d, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out
