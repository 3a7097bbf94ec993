"""Triton GEMV kernels for weight-only quantized matmul at M = 1 (decode), reading PackedWeight as stored.

At M = 1 the product is a pure weight stream: a 4096 x 4096 int4 matrix is 8.4 MB, about 2 µs at the H200's
4.2 TB/s. What keeps a kernel from that is memory parallelism and instructions per weight, not arithmetic:

- Bytes in flight. By Little's law the H200 needs about 4 MB of loads outstanding (4.2 TB/s x ~1 µs), i.e.
  ~32 KB per multiprocessor. A program here streams BN rows x SUB group tiles of BKG columns per loop step
  (4-16 KB) and loads the next step before decoding the current one; K is split so that the grid fills
  every multiprocessor (triton_backend.gemv_plan).
- Instructions per weight. At the bandwidth limit an SM receives ~32 int4 weights per cycle and can issue
  128 thread-instructions per cycle, so the loop has ~4 instructions per weight. int4 costs three: one LOP3
  and one FADD to decode (the nibble is ORed into the exponent bits of 2**(23 - 4p) so the float reads as
  2**(23 - 4p) + code, no shifts), one FFMA; the group scale multiplies a word's sum of eight products once.
- NF4 without a memory lookup: the 16 float16 levels live in eight 32-bit constants and byte-permute
  instructions select them by code (nf4_ptx.py); float16 keeps the levels to 2**-11 relative, far inside
  the activations' rounding.
- 8-bit formats (int8, fp8) read 16 codes per 16-byte load; each weight is decoded to float32, scaled and
  multiplied in two FMAs, which fits the doubled instruction budget of 8-bit weights.

Split-K partial sums go through a float32 workspace (splits, N); the last program of a row block to arrive
(counted in a lock it resets) loads all of them in one (SPLITS, BN) tile and adds them up in a fixed order,
so results do not depend on timing (a loop over the splits cost one memory latency per split: at 8 splits
that tail alone was as long as a 4096 x 4096 GEMV).
"""

from __future__ import annotations

import triton
import triton.language as tl

from modelpress.nn.nf4_ptx import nf4_levels, word_to_f32
from modelpress.nn.triton_kernels import _decode_bytes


ASM_NF4: tl.constexpr = tl.constexpr(word_to_f32(nf4_levels()))


@triton.jit
def _nibble(word, exponent_bits, MASK: tl.constexpr, MAGIC: tl.constexpr):
    """code - zero as float32 for the nibble MASK = 0xF << 4p of each uint32 in `word`. exponent_bits: the bits
    of 2**(23 - 4p) (a run-time value, so that the AND and the OR fuse into one LOP3 with a register operand);
    MAGIC: 2**(23 - 4p) + zero."""
    return ((word & MASK) | exponent_bits).to(tl.float32, bitcast=True) - MAGIC


@triton.jit
def _split8(xt):
    """(A, B, 8) -> the eight (A, B) slices along the last axis, in order."""
    A: tl.constexpr = xt.shape[0]
    B: tl.constexpr = xt.shape[1]
    even, odd = tl.split(tl.reshape(xt, (A, B, 4, 2)))  # x[8w + 2p], x[8w + 2p + 1]
    e0, e2 = tl.split(tl.reshape(even, (A, B, 2, 2)))  # x[8w + 4r], x[8w + 4r + 2]
    o1, o3 = tl.split(tl.reshape(odd, (A, B, 2, 2)))  # x[8w + 4r + 1], x[8w + 4r + 3]
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e2)
    x1, x5 = tl.split(o1)
    x3, x7 = tl.split(o3)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _load_x(x_ptr, perm_ptr, cols, K, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """x[cols] as float32 (stored-order columns mapped through input_perm); 0 past K."""
    if EVEN_K:
        mask = cols >= 0
    else:
        mask = cols < K
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=mask, other=0)
    else:
        src = cols
    return tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group_rows(ptr, rows, first_cols, K, group_size, stride_sn, stride_sg):
    """(BN, SUB) float32 scales (or offsets) of the sub-tiles starting at first_cols (SUB,); 0 past K."""
    ptrs = ptr + rows[:, None] * stride_sn + (first_cols // group_size)[None, :] * stride_sg
    return tl.load(ptrs, mask=(first_cols < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_row(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_n, n_mask, pid_n, pid_k, N, SPLIT_K: tl.constexpr,
               SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write y[offs_n] = acc (BN,) (+ bias), through the split-K workspace when K is split (module docstring);
    SPLITS: the number of splits rounded up to a power of two."""
    if SPLIT_K:
        tl.store(ws_ptr + pid_k * N + offs_n, acc, mask=n_mask)
        tl.debug_barrier()  # every thread's partial sums are written before the count goes up
        lock = lock_ptr + pid_n
        splits = tl.num_programs(2)
        if tl.atomic_add(lock, 1, sem="acq_rel") == splits - 1:
            split = tl.arange(0, SPLITS)
            parts = tl.load(ws_ptr + split[:, None] * N + offs_n[None, :],
                            mask=(split < splits)[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
            out = tl.sum(parts, axis=0)
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(lock, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _word_values(w, table_ptr, e0, KIND: tl.constexpr, ZERO: tl.constexpr, USE_ASM: tl.constexpr):
    """The eight values of each uint32 word of codes (code i at bits 4i..4i+3), float32: code - ZERO for int4,
    the NF4 level for nf4."""
    if KIND == 1:
        if USE_ASM:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                ASM_NF4, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            v0 = tl.load(table_ptr + (w & 15))
            v1 = tl.load(table_ptr + ((w >> 4) & 15))
            v2 = tl.load(table_ptr + ((w >> 8) & 15))
            v3 = tl.load(table_ptr + ((w >> 12) & 15))
            v4 = tl.load(table_ptr + ((w >> 16) & 15))
            v5 = tl.load(table_ptr + ((w >> 20) & 15))
            v6 = tl.load(table_ptr + ((w >> 24) & 15))
            v7 = tl.load(table_ptr + ((w >> 28) & 15))
    else:
        e1 = e0 - 0x02000000  # bits of 2**23, 2**19, 2**15, 2**11, 2**7
        e2 = e0 - 0x04000000
        e3 = e0 - 0x06000000
        e4 = e0 - 0x08000000
        hi = w >> 12  # codes 4-7 at nibbles p = 1..4
        v0 = _nibble(w, e0, 0xF, 8388608.0 + ZERO)
        v1 = _nibble(w, e1, 0xF0, 524288.0 + ZERO)
        v2 = _nibble(w, e2, 0xF00, 32768.0 + ZERO)
        v3 = _nibble(w, e3, 0xF000, 2048.0 + ZERO)
        v4 = _nibble(hi, e1, 0xF0, 524288.0 + ZERO)
        v5 = _nibble(hi, e2, 0xF00, 32768.0 + ZERO)
        v6 = _nibble(hi, e3, 0xF000, 2048.0 + ZERO)
        v7 = _nibble(hi, e4, 0xF0000, 128.0 + ZERO)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def gemv4_kernel(
    x_ptr, w_ptr, scale_ptr, offset_ptr, perm_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    N, K, group_size, k_per_split, exponent_bits, stride_wn, stride_sn, stride_sg,
    KIND: tl.constexpr, ZERO: tl.constexpr, AFFINE: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SPLITS: tl.constexpr, EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr, BN: tl.constexpr, BKG: tl.constexpr, SUB: tl.constexpr,
):
    """y (1, N) = x (1, K) @ W^T for 4-bit codes (int4 / int4-asym: KIND 0, nf4: KIND 1). Grid: (1, N blocks,
    K splits); w is qdata viewed as uint32 (N, row_bytes / 4). A loop step covers SUB sub-tiles of BKG
    columns (BKG divides the group size: one scale per row and sub-tile) as a (BN, SUB, BKG / 8) word tile;
    the next step's words, scales and x are loaded before the current step is decoded."""
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPG: tl.constexpr = BKG // 8
    STEP: tl.constexpr = BKG * SUB
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1)  # rows past N re-read the last row (results masked at the store)
    sub_cols = tl.arange(0, SUB) * BKG
    step_words = (tl.arange(0, SUB) * WPG)[:, None] + tl.arange(0, WPG)[None, :]  # (SUB, WPG)
    w_rows = w_ptr + rows[:, None, None] * stride_wn
    x_cols = (step_words * 8)[:, :, None] + tl.arange(0, 8)[None, None, :]  # (SUB, WPG, 8)
    k_begin = pid_k * k_per_split
    k_end = min(k_begin + k_per_split, K)
    k_last = k_begin + ((k_end - k_begin - 1) // STEP) * STEP  # start of this program's last step
    acc = tl.zeros((BN, SUB, WPG), tl.float32)
    e0 = exponent_bits.to(tl.uint32, bitcast=True)

    kw = tl.multiple_of(k_begin // 8, WPG)
    if EVEN_K:
        w_next = tl.load(w_rows + kw + step_words[None, :, :])
    else:
        w_next = tl.load(w_rows + kw + step_words[None, :, :], mask=((kw + step_words) * 8 < K)[None, :, :],
                         other=0)
    s_next = _group_rows(scale_ptr, rows, k_begin + sub_cols, K, group_size, stride_sn, stride_sg)
    if AFFINE:
        o_next = _group_rows(offset_ptr, rows, k_begin + sub_cols, K, group_size, stride_sn, stride_sg)
    else:
        o_next = s_next
    x_next = _load_x(x_ptr, perm_ptr, k_begin + x_cols, K, HAS_PERM, EVEN_K)
    for k0 in range(k_begin, k_end, STEP):
        w = w_next.to(tl.uint32, bitcast=True)
        s = s_next
        o = o_next
        xt = x_next
        k1 = min(k0 + STEP, k_last)  # prefetch the next step; after the last one, the loads are masked off
        more = k0 + STEP < k_end
        kw = tl.multiple_of(k1 // 8, WPG)
        if EVEN_K:
            w_next = tl.load(w_rows + kw + step_words[None, :, :], mask=more, other=0)
        else:
            w_next = tl.load(w_rows + kw + step_words[None, :, :],
                             mask=more & ((kw + step_words) * 8 < K)[None, :, :], other=0)
        s_next = _group_rows(scale_ptr, rows, k1 + sub_cols, K, group_size, stride_sn, stride_sg)
        if AFFINE:
            o_next = _group_rows(offset_ptr, rows, k1 + sub_cols, K, group_size, stride_sn, stride_sg)
        x_next = _load_x(x_ptr, perm_ptr, k1 + x_cols, K, HAS_PERM, EVEN_K)

        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xt)
        v0, v1, v2, v3, v4, v5, v6, v7 = _word_values(w, table_ptr, e0, KIND, ZERO, USE_ASM)
        part = v0 * x0[None, :, :]
        part += v1 * x1[None, :, :]
        part += v2 * x2[None, :, :]
        part += v3 * x3[None, :, :]
        part += v4 * x4[None, :, :]
        part += v5 * x5[None, :, :]
        part += v6 * x6[None, :, :]
        part += v7 * x7[None, :, :]
        acc += part * s[:, :, None]
        if AFFINE:  # W = scale · code + offset: add offset · (sum of the word's eight x)
            x_sum = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
            acc += x_sum[None, :, :] * o[:, :, None]

    _store_row(tl.sum(tl.sum(acc, axis=2), axis=1), y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_n, n_mask, pid_n, pid_k,
               N, SPLIT_K, SPLITS, HAS_BIAS)


@triton.jit
def gemv8_kernel(
    x_ptr, q_ptr, scale_ptr, offset_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    N, K, group_size, k_per_split, stride_qn, stride_sn, stride_sg,
    KIND: tl.constexpr, ZERO: tl.constexpr, AFFINE: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SPLITS: tl.constexpr, EVEN_K: tl.constexpr,
    BN: tl.constexpr, BKG: tl.constexpr, SUB: tl.constexpr,
):
    """y (1, N) = x (1, K) @ W^T for 8-bit codes (int8 / int8-asym: KIND 2, fp8-e4m3: 3, fp8-e5m2: 4).
    Grid: (1, N blocks, K splits). A loop step covers a (BN, SUB, BKG) code tile (BKG divides the group size);
    each weight is decoded, scaled (+ offset) and multiplied into a float32 accumulator of the tile's shape,
    which is reduced once at the end."""
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    STEP: tl.constexpr = BKG * SUB
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1)
    sub_cols = tl.arange(0, SUB) * BKG
    step_cols = sub_cols[:, None] + tl.arange(0, BKG)[None, :]  # (SUB, BKG)
    q_rows = q_ptr + rows[:, None, None] * stride_qn
    k_begin = pid_k * k_per_split
    k_end = min(k_begin + k_per_split, K)
    k_last = k_begin + ((k_end - k_begin - 1) // STEP) * STEP
    acc = tl.zeros((BN, SUB, BKG), tl.float32)

    kk = tl.multiple_of(k_begin, STEP)
    if EVEN_K:
        q_next = tl.load(q_rows + kk + step_cols[None, :, :])
    else:
        q_next = tl.load(q_rows + kk + step_cols[None, :, :], mask=(kk + step_cols < K)[None, :, :], other=0)
    s_next = _group_rows(scale_ptr, rows, k_begin + sub_cols, K, group_size, stride_sn, stride_sg)
    if AFFINE:
        o_next = _group_rows(offset_ptr, rows, k_begin + sub_cols, K, group_size, stride_sn, stride_sg)
    else:
        o_next = s_next
    x_next = _load_x(x_ptr, perm_ptr, k_begin + step_cols, K, HAS_PERM, EVEN_K)
    for k0 in range(k_begin, k_end, STEP):
        q = q_next
        s = s_next
        o = o_next
        xt = x_next
        k1 = tl.multiple_of(min(k0 + STEP, k_last), STEP)
        more = k0 + STEP < k_end
        if EVEN_K:
            q_next = tl.load(q_rows + k1 + step_cols[None, :, :], mask=more, other=0)
        else:
            q_next = tl.load(q_rows + k1 + step_cols[None, :, :], mask=more & (k1 + step_cols < K)[None, :, :],
                             other=0)
        s_next = _group_rows(scale_ptr, rows, k1 + sub_cols, K, group_size, stride_sn, stride_sg)
        if AFFINE:
            o_next = _group_rows(offset_ptr, rows, k1 + sub_cols, K, group_size, stride_sn, stride_sg)
        x_next = _load_x(x_ptr, perm_ptr, k1 + step_cols, K, HAS_PERM, EVEN_K)

        w = _decode_bytes(q, KIND, ZERO, tl.float32) * s[:, :, None]
        if AFFINE:
            w += o[:, :, None]
        acc += w * xt[None, :, :]

    _store_row(tl.sum(tl.sum(acc, axis=2), axis=1), y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_n, n_mask, pid_n, pid_k,
               N, SPLIT_K, SPLITS, HAS_BIAS)
