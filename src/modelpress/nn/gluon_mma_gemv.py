"""The M = 1 GEMV for 4-bit codes (int4, int4-asym, nf4) on the tensor cores, from weights laid out for the MMA's
fragments.

Why: the CUDA-core GEMV (gluon_gemv.py) spends about 4.2 instructions per weight over a launch (decode, products, the
activations' conversion, addressing) and keeps DRAM only 28-49% busy (Nsight Compute, H100): issue slots, not
memory, set its pace. Here the products go to `mma.sync.m16n8k16` (bfloat16 or float16 in, float32 sums), 256
weights x 8 activation columns per instruction, and a weight costs the decode's LOP3 and SHF per pair of codes
plus an eighth of a float32 FMA: 2.25 instructions per weight in the loop's SASS against the CUDA-core GEMV's 3.62
(bench/sass.py --mma, int4/g128 on 12288x4096).

The weights are the MMA's A (16 rows x 16 columns of K); the activations are B (16 x 8), the one row of x in
all eight columns, so every column of the result holds y and every lane has the rows it needs. Columns of K may
go to the MMA's k-slots in any order, as long as A and B agree: lane (g, t) = (lane // 4, lane % 4) of MMA j of
a 64-column chunk takes columns 16j + 4t + {0, 1} in its first k-slots and 16j + 4t + {2, 3} in the second, so
its activations for an MMA are 8 contiguous bytes of x, one 64-bit load, used as they are.

mma_ptx.mma_layout re-lays the stored codes once (the same bytes; the last row tile padded to 16 rows): per
16-row tile and 64-column chunk, lane (g, t) owns four 32-bit words (16 bytes, so a warp reads 512 contiguous
bytes a chunk), for row g and MMAs 0-1, row g + 8 and MMAs 0-1, row g and MMAs 2-3, row g + 8 and MMAs 2-3. A
word's nibbles i and i + 4 are the two columns of one k-slot pair: a LOP3 with mask 0x000F000F ORs them (the
word shifted right by 4i) into the mantissas of a pair of 16-bit MAGIC numbers (128 in bfloat16, 1024 in
float16, whose last mantissa bit is worth 1), giving MAGIC + code exactly. The magic number is not removed per
weight: the MMAs sum (MAGIC + code) * x, exactly (the products are exact in float32), and one more MMA per
chunk, of ones with x, gives each half chunk's sum of x, shared by all the program's row tiles; the kernel
subtracts (MAGIC + code zero) times it. Then each half chunk's sum is multiplied by its group's scale (groups
of a multiple of 64 columns), and for int4-asym the offset times the sum of x is added.

NF4 codes are laid out with NF4_NIBBLE_OF (nibbles 2i and 2i + 1 pair up) and decoded by nf4_ptx's byte-permute
lookup straight into 16-bit level pairs (no magic number, no sums of x); the eight table registers come from a
per-lane copy in memory, so that ptxas keeps them in ordinary registers.

Rows mode (2 to MAX_ROWS = 8 rows of x: batched decoding, speculative verify passes): x row r goes to column r of B
instead of x in every column, lane (g, t) reading row g at the same offsets; each lane's four D slots are then four
outputs, weight rows g and g + 8 against x rows 2t and 2t + 1, and the four MMAs of a chunk run as one chain (a
slot's sum is wanted whole). The sums of x come from the same MMA of ones, now one per x row. 2.39 instructions a
weight against one row's 2.25; 13.3 µs for 2-4 rows of 12288x4096 on an H100 against the stored layout's kernels'
17-18 (bench/mma_gemv.py --rows). Decode reads x for it in fragment order where a norm wrote that copy (the
kernel's XL; nn/triton_norm.py): 256 contiguous bytes a warp load instead of 8 bytes from each of 8 rows.

Rounding: none in the int4 products; float32 sums whose largest terms are MAGIC + 15 times |x|, so the subtraction
leaves an error of about 2**-24 * (MAGIC + 15) * sum |x| per half chunk, far below the bfloat16 or float16
output's rounding (the CUDA-core GEMV sums float16 products, 2**-11 each).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from modelpress.nn.gluon_gemv import gdc_launch_dependents, gdc_wait
from modelpress.nn.mma_ptx import (CHUNK, KERNEL_ROWS, MAGIC, TILE, mma_asm, mma_constraints, nf4_table, xsum_asm,
                                   xsum_constraints)


@gluon.jit
def gemv4_mma_kernel(x_ptr, w_ptr, scale_ptr, offset_ptr, table_ptr, y_ptr, ws_ptr, lock_ptr, N, chunks,
                     chunks_per_split, stride_sn, stride_sg, M, MMA_ASM: gl.constexpr, XSUM_ASM: gl.constexpr,
                     MMA_CONSTRAINTS: gl.constexpr, XSUM_CONSTRAINTS: gl.constexpr,
                     CORRECTION: gl.constexpr, AFFINE: gl.constexpr, GS: gl.constexpr, EVEN: gl.constexpr,
                     RT: gl.constexpr, CS: gl.constexpr, WR: gl.constexpr, WK: gl.constexpr, PDL: gl.constexpr,
                     XSUM: gl.constexpr = True, NF4: gl.constexpr = False, SPLIT_K: gl.constexpr = False,
                     SPLITS: gl.constexpr = 1, INTERLEAVE: gl.constexpr = False, ACT: gl.constexpr = False,
                     FRAGMENTS: gl.constexpr = 0, XL: gl.constexpr = False, DEPTH: gl.constexpr = 1):
    """y (1, N) = x (1, K) @ W^T for 4-bit codes in mma_layout, K = 64 * chunks, groups of GS columns (a multiple
    of 64). FRAGMENTS = 1 (rows mode): y (M, N) = x (M, K) @ W^T for M <= 8 rows of a contiguous x, row r of x in
    column r of the MMAs' B (mma_ptx.mma_asm's fragments), every lane storing its four sums; not with SPLIT_K or
    INTERLEAVE. A program owns RT * WR row tiles of 16 rows (WR warps along them) and, of K, the chunks_per_split
    chunks of split program_id(1), which its WK warps along K walk CS chunks at a time each; the next step's
    words are loaded before this step's MMAs. EVEN: every split is a whole number of steps. SPLIT_K: the splits'
    float32 partial sums go through ws_ptr (splits, N), and the last program of a row block to arrive (counted in
    lock_ptr, which it resets) adds them in a fixed order (SPLITS: the split count rounded up to a power of two).
    W = scale * (code - zero) (CORRECTION = MAGIC + zero), or with AFFINE scale * code + offset (CORRECTION =
    MAGIC): each slot adds scale * (raw - CORRECTION * sum x) (+ offset * sum x). XSUM=False (NF4: raw is
    sum level * x already): each slot adds scale * raw, and no sums of x are taken. NF4: MMA_ASM takes the eight
    int32 lookup registers (mma_ptx.nf4_table) as operands, from table_ptr's (32, 8) copies, one per lane.
    INTERLEAVE: the weight is a gated MLP's [gate | up] (N = 2 I rows) with its rows re-laid in the order of
    interleave_rows, so that row tile t holds gate rows 8t..8t+7 then up rows 8t..8t+7; scales and outputs are
    those of the rows as stored. ACT (with INTERLEAVE, without SPLIT_K): y (1, I) = silu(gate) * up instead, each
    lane holding a gate row and its up row, the two rounded to y's dtype first as the matmul's output would be
    (silu's division approximate: within 2 ulp of float32 before the rounding to y's dtype).
    FRAGMENTS = 2: 9 to 16 rows, rows 8..15 in a second B fragment (one decode of the codes for both). XL: x_ptr
    holds x in fragment order (mma_ptx.fragment_order: a warp's load is 256 contiguous bytes, not 8 bytes from each
    of 8 rows). DEPTH = 2: the words of the two next steps in flight, not one. Timed on an H200 at 8 rows of the 7B
    shape's q/k/v and gate/up (bench/mma_gemv.py --rows 8 --laid --depths 1 2): as stored 16.0 / 28.6 µs, XL 12.9 /
    20.6 (decode's path: the norms before those layers write the laid copy), XL with DEPTH 2 12.6 / 20.4; x loaded
    coalesced and converted to X in the kernel (through shared memory, session 42) 14.3 / 25.6, and slower than x
    as stored at 2 and 4 rows, so not kept; at one row DEPTH 2 12.63 / 21.46 against 12.72 / 21.53 (not taken)."""
    BT: gl.constexpr = RT * WR
    CK: gl.constexpr = CS * WK
    P: gl.constexpr = gl.BlockedLayout([RT, CS, 1, 4], [1, 1, 32, 1], [WR, WK, 1, 1], [3, 2, 1, 0])
    X: gl.constexpr = gl.SliceLayout(0, P)  # (CK, 32, 4): per chunk, lane and slot; shared by the row tiles
    S: gl.constexpr = gl.SliceLayout(3, P)  # (BT, CK, 32): per row tile, chunk and lane (scales)
    tiles = gl.cdiv(N, 16)
    first_tile = gl.program_id(0) * BT
    if SPLIT_K:
        c_begin = gl.program_id(1) * chunks_per_split
        c_end = gl.minimum(c_begin + chunks_per_split, chunks)
    else:  # all of K: the loop's bounds known to start at 0 (a run-time start cost int4-asym 12 IMADs a step)
        c_begin = 0
        c_end = chunks
    tile = gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, P))))
    tile = gl.minimum(first_tile + tile, tiles - 1)[:, None, None, None]  # past the last: re-read, not stored
    chunk = gl.arange(0, CK, layout=gl.SliceLayout(1, gl.SliceLayout(2, X)))[:, None, None]
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, X)))[None, :, None]
    slot = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, X)))[None, None, :]
    s_tile = gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, S)))
    s_tile = gl.minimum(first_tile + s_tile, tiles - 1)[:, None, None]
    s_chunk = gl.arange(0, CK, layout=gl.SliceLayout(0, gl.SliceLayout(2, S)))[None, :, None]
    s_lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, S)))[None, None, :]

    words = w_ptr + tile * (chunks * 128) + (((c_begin + chunk) * 32 + lane) * 4 + slot)[None, :, :, :]  # step 1's
    x_quads = x_ptr.to(gl.pointer_type(gl.int64), bitcast=True) + (16 * chunk + 4 * slot + lane % 4)
    if XL:  # x pre-laid in fragment order (fragment_order): (chunk, fragment, MMA j, lane) words, 256 bytes a load
        x_quads = x_ptr.to(gl.pointer_type(gl.int64), bitcast=True) + ((chunk * FRAGMENTS) * 4 + slot) * 32 + lane
        x_in = lane < 32
        x_in1 = x_in
    elif FRAGMENTS > 0:  # lane (g, t) reads x row g: column g of B (and row 8 + g: column g of the second fragment)
        x_quads += (lane // 4) * (chunks * 16)
        x_in = lane // 4 < M
        x_in1 = lane // 4 + 8 < M
    if INTERLEAVE:  # the tile's row g is gate row 8t + g, its row g + 8 up row 8t + g
        rows = gl.minimum(s_tile * 8 + s_lane // 4, N // 2 - 1)
        rows_hi = rows + N // 2
    else:
        rows = gl.minimum(s_tile * 16 + s_lane // 4, N - 1)  # row g of each lane; row g + 8 below
        rows_hi = gl.minimum(s_tile * 16 + s_lane // 4 + 8, N - 1)
    s_low = scale_ptr + rows * stride_sn
    s_high = scale_ptr + rows_hi * stride_sn
    o_low = offset_ptr + rows * stride_sn
    o_high = offset_ptr + rows_hi * stride_sn
    if FRAGMENTS > 0:
        even_slot = (slot < 2)[None, :, :, :]  # slots 0, 1: weight row g (rows mode), else row g + 8
    else:
        even_slot = (slot % 2 == 0)[None, :, :, :]  # slots 0, 2: weight row g

    if NF4:  # one copy of the table per lane: values the compiler cannot prove uniform stay in ordinary registers
        t_lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, P))))
        t_row = table_ptr + t_lane[None, None, :, None] * 8
        t0 = gl.load(t_row)
        t1 = gl.load(t_row + 1)
        t2 = gl.load(t_row + 2)
        t3 = gl.load(t_row + 3)
        t4 = gl.load(t_row + 4)
        t5 = gl.load(t_row + 5)
        t6 = gl.load(t_row + 6)
        t7 = gl.load(t_row + 7)
    if EVEN:
        w_next = gl.load(words)
        if DEPTH == 2:  # the step after it too: two steps of weights in flight
            w_next2 = gl.load(words + CK * 128, mask=c_begin + CK < c_end, other=0)
    else:
        w_next = gl.load(words, mask=(c_begin + chunk < c_end)[None, :, :, :], other=0)
        if DEPTH == 2:
            w_next2 = gl.load(words + CK * 128, mask=(c_begin + CK + chunk < c_end)[None, :, :, :], other=0)
    if PDL:  # the weights are ours; x and y belong to the kernels around us
        gdc_launch_dependents()
        gdc_wait()
    acc = gl.zeros((BT, CK, 32, 4), gl.float32, layout=P)
    if FRAGMENTS == 2:
        acc1 = gl.zeros((BT, CK, 32, 4), gl.float32, layout=P)  # the second fragment's (x rows 8..15)
    X_STEP: gl.constexpr = FRAGMENTS * 128 if XL else 16  # x words a chunk
    X_SECOND: gl.constexpr = 128 if XL else 0  # the second fragment's offset, in words (plus 8 rows, unlaid)
    for c0 in range(c_begin, c_end, CK):
        w = w_next
        words += CK * 128
        if EVEN:
            if DEPTH == 2:
                w_next = w_next2
                w_next2 = gl.load(words + CK * 128, mask=c0 + 2 * CK < c_end, other=0)
            else:
                w_next = gl.load(words, mask=c0 + CK < c_end, other=0)
            if FRAGMENTS > 0:
                xv = gl.load(x_quads + c0 * X_STEP, mask=x_in, other=0)
                if FRAGMENTS == 2:
                    xv1 = gl.load(x_quads + (c0 * X_STEP + X_SECOND if XL else (c0 + 8 * chunks) * 16), mask=x_in1,
                                  other=0)
            else:
                xv = gl.load(x_quads + c0 * 16)
            group = ((c0 + s_chunk) * 64 // GS) * stride_sg
        else:  # chunks past the split: zero codes times zero activations, scales of its last group (finite)
            if DEPTH == 2:
                w_next = w_next2
                w_next2 = gl.load(words + CK * 128, mask=(c0 + 2 * CK + chunk < c_end)[None, :, :, :], other=0)
            else:
                w_next = gl.load(words, mask=(c0 + CK + chunk < c_end)[None, :, :, :], other=0)
            if FRAGMENTS > 0:
                xv = gl.load(x_quads + c0 * X_STEP, mask=(c0 + chunk < c_end) & x_in, other=0)
                if FRAGMENTS == 2:
                    xv1 = gl.load(x_quads + (c0 * X_STEP + X_SECOND if XL else (c0 + 8 * chunks) * 16),
                                  mask=(c0 + chunk < c_end) & x_in1, other=0)
            else:
                xv = gl.load(x_quads + c0 * 16, mask=c0 + chunk < c_end, other=0)
            group = (gl.minimum(c0 + s_chunk, c_end - 1) * 64 // GS) * stride_sg
        s = gl.where(even_slot, gl.load(s_low + group).to(gl.float32)[:, :, :, None],
                     gl.load(s_high + group).to(gl.float32)[:, :, :, None])
        if FRAGMENTS == 2:  # one decode of the codes for both fragments
            if NF4:
                raw, raw1 = gl.inline_asm_elementwise(
                    MMA_ASM, MMA_CONSTRAINTS, [w, xv[None, :, :, :], xv1[None, :, :, :], t0, t1, t2, t3, t4, t5, t6,
                                               t7], dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
            else:
                raw, raw1 = gl.inline_asm_elementwise(MMA_ASM, MMA_CONSTRAINTS,
                                                      [w, xv[None, :, :, :], xv1[None, :, :, :]],
                                                      dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
        elif NF4:
            raw = gl.inline_asm_elementwise(MMA_ASM, MMA_CONSTRAINTS, [w, xv[None, :, :, :], t0, t1, t2, t3, t4, t5,
                                                                       t6, t7], dtype=gl.float32, is_pure=True, pack=4)
        else:
            raw = gl.inline_asm_elementwise(MMA_ASM, MMA_CONSTRAINTS, [w, xv[None, :, :, :]], dtype=gl.float32,
                                            is_pure=True, pack=4)
        if XSUM:
            if FRAGMENTS == 2:
                x_sum, x_sum1 = gl.inline_asm_elementwise(XSUM_ASM, XSUM_CONSTRAINTS, [xv, xv1],
                                                          dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
                x_sum1 = x_sum1[None, :, :, :]
                acc1 += (raw1 - CORRECTION * x_sum1) * s
            else:
                x_sum = gl.inline_asm_elementwise(XSUM_ASM, XSUM_CONSTRAINTS, [xv], dtype=gl.float32, is_pure=True,
                                                  pack=4)
            x_sum = x_sum[None, :, :, :]
            acc += (raw - CORRECTION * x_sum) * s
        else:
            acc += raw * s
            if FRAGMENTS == 2:
                acc1 += raw1 * s
        if AFFINE:
            o = gl.where(even_slot, gl.load(o_low + group).to(gl.float32)[:, :, :, None],
                         gl.load(o_high + group).to(gl.float32)[:, :, :, None])
            acc += x_sum * o
            if FRAGMENTS == 2:
                acc1 += x_sum1 * o

    total = gl.sum(acc, axis=1)  # (BT, 32, 4)
    T: gl.constexpr = gl.SliceLayout(1, P)
    if FRAGMENTS > 0:  # lane (g, t), slot q: weight row g + 8 (q // 2) of its tile, x row 2t + q % 2
        r_slot = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, T)))[None, None, :]
        r_lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, T)))[None, :, None]
        r_tile = (first_tile + gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, T))))[:, None, None]
        n_out = r_tile * 16 + r_lane // 4 + 8 * (r_slot // 2)
        m_out = 2 * (r_lane % 4) + r_slot % 2
        gl.store(y_ptr + m_out * N + n_out, total.to(y_ptr.dtype.element_ty), mask=(m_out < M) & (n_out < N))
        if FRAGMENTS == 2:
            gl.store(y_ptr + (m_out + 8) * N + n_out, gl.sum(acc1, axis=1).to(y_ptr.dtype.element_ty),
                     mask=(m_out + 8 < M) & (n_out < N))
    else:
        t_slot = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, T)))[None, None, :]
        low = gl.sum(gl.where(t_slot % 2 == 0, total, 0.0), axis=2)  # (BT, 32): row g of each lane's tile
        high = gl.sum(gl.where(t_slot % 2 == 1, total, 0.0), axis=2)  # row g + 8
        o_tile = first_tile + gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, T)))
        o_lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, T)))
        if INTERLEAVE:
            row = o_tile[:, None] * 8 + o_lane[None, :] // 4  # the stored rows of each lane's two sums
            row_hi = row + N // 2
            inside = row < N // 2
            inside_hi = inside
        else:
            row = o_tile[:, None] * 16 + o_lane[None, :] // 4
            row_hi = row + 8
            inside = row < N
            inside_hi = row_hi < N
        first = (o_lane % 4 == 0)[None, :]  # the four lanes of a row hold the same sums: one stores
        if SPLIT_K:
            part = ws_ptr + gl.program_id(1) * N
            gl.store(part + row, low, mask=first & inside)
            gl.store(part + row_hi, high, mask=first & inside_hi)
            gl.thread_barrier()  # every thread's partial sums are written before the count goes up
            lock = lock_ptr + gl.program_id(0)
            splits = gl.num_programs(1)
            if gl.atomic_add(lock, 1, sem="acq_rel") == splits - 1:
                E: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, WR * WK], [1, 0])
                split = gl.arange(0, SPLITS, layout=gl.SliceLayout(1, E))
                r = gl.arange(0, BT * 16, layout=gl.SliceLayout(0, E))
                t = first_tile + r // 16
                if INTERLEAVE:
                    block = gl.where(r % 16 < 8, t * 8 + r % 16, N // 2 + t * 8 + r % 16 - 8)
                    kept = t * 8 < N // 2
                else:
                    block = t * 16 + r % 16
                    kept = block < N
                parts = gl.load(ws_ptr + split[:, None] * N + block[None, :],
                                mask=(split < splits)[:, None] & kept[None, :], other=0.0, cache_modifier=".cg")
                gl.store(y_ptr + block, gl.sum(parts, axis=0).to(y_ptr.dtype.element_ty), mask=kept)
                gl.atomic_xchg(lock, 0)
        elif ACT:  # silu(gate) * up from the matmul's rounded output, as silu_mul computes it but for the division
            gate = low.to(y_ptr.dtype.element_ty).to(gl.float32)
            up = high.to(y_ptr.dtype.element_ty).to(gl.float32)
            # div.full (approximate, 2 ulp): an IEEE division's slow-path call made ptxas spill registers in the loop
            act = (gate / (1.0 + gl.exp(-gate))).to(y_ptr.dtype.element_ty).to(gl.float32)
            gl.store(y_ptr + row, (act * up).to(y_ptr.dtype.element_ty), mask=first & inside)
        else:
            gl.store(y_ptr + row, low.to(y_ptr.dtype.element_ty), mask=first & inside)
            gl.store(y_ptr + row_hi, high.to(y_ptr.dtype.element_ty), mask=first & inside_hi)


def launch(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, n: int,
           group_size: int, zero: int | None = 8, rows_per_thread: int = 1, chunks_per_step: int = 2,
           warps_rows: int = 1, warps_k: int = 4, split: int = 1, pdl: bool = False,
           out: torch.Tensor | None = None, interleave: bool = False, act: bool = False,
           laid: torch.Tensor | None = None, depth: int = 1) -> tuple:
    """(kernel, grid, positional arguments, keyword constants) of mma_gemv's launch; args[5] is y. zero=None:
    NF4 codes (mma_layout with NF4_NIBBLE_OF). split > 1: K is split into that many ranges of whole steps (fewer
    where the steps run out), their partial sums added through triton_backend's split-K workspace. interleave:
    [gate | up] rows re-laid in interleave_rows' order; act: y (1, N / 2) = silu(gate) * up (no split). x of
    2..KERNEL_ROWS rows (contiguous): the rows mode, y (M, N), whole K, rows not interleaved; laid: x's copy in
    fragment order (mma_ptx.fragment_order) read instead of x; depth 2: two loop steps of weights in flight (the
    kernel's XL and DEPTH)."""
    if group_size % CHUNK:
        raise ValueError(f"the MMA GEMV needs groups of a multiple of {CHUNK} columns, got {group_size}")
    if act and (not interleave or split > 1):
        raise ValueError("the MMA GEMV's activation needs [gate | up] rows interleaved and K not split")
    if interleave and n % TILE:
        raise ValueError(f"interleaved [gate | up] rows need N a multiple of {TILE}, got {n}")
    k = x.shape[-1]
    m = x.numel() // k
    chunks = k // CHUNK
    if tuple(words.shape[:2]) != (-(-n // TILE), chunks):
        raise ValueError(f"words of shape {tuple(words.shape)} do not lay out a ({n}, {k}) weight")
    if x.data_ptr() % 16:
        raise ValueError("the MMA GEMV reads x 8 bytes at a time: it must be 16-byte aligned")
    if not 1 <= m <= KERNEL_ROWS:
        raise ValueError(f"the MMA GEMV takes 1 to {KERNEL_ROWS} rows of x, got {m}")
    fragments = 0 if m == 1 else -(-m // 8)
    if laid is not None and (fragments == 0 or tuple(laid.shape) != (chunks, fragments, 4, 32)):
        raise ValueError("x laid out in fragment order must be fragment_order(x) of 2 or more rows")
    if fragments and (interleave or split > 1 or not x.is_contiguous()):
        raise ValueError("the MMA GEMV's rows mode takes contiguous rows of x, whole K and rows not interleaved")
    y = torch.empty((m, n // 2 if act else n), device=x.device, dtype=x.dtype) if out is None else out
    bf16 = x.dtype == torch.bfloat16
    bt = rows_per_thread * warps_rows
    ck = chunks_per_step * warps_k
    per_split = -(-chunks // (split * ck)) * ck  # whole steps per split
    splits = -(-chunks // per_split)
    grid = (-(-n // (TILE * bt)), splits)
    if splits > 1:
        from modelpress.nn.triton_backend import split_locks, split_workspace

        workspace, locks = split_workspace(x.device, splits * n), split_locks(x.device, grid[0])
    else:
        workspace = locks = y  # never touched
    nf4 = zero is None
    table = _nf4_table(x.device, bf16) if nf4 else scale
    args = (x if laid is None else laid, words, scale, offset if offset is not None else scale, table, y, workspace,
            locks, n, chunks, per_split,
            scale.stride(0), scale.stride(1), m)
    constants = dict(MMA_ASM=mma_asm(bf16, nf4, fragments), XSUM_ASM=xsum_asm(bf16, fragments),
                     MMA_CONSTRAINTS=mma_constraints(nf4, fragments), XSUM_CONSTRAINTS=xsum_constraints(fragments),
                     CORRECTION=0.0 if nf4 else MAGIC[bf16] + zero,
                     AFFINE=offset is not None, GS=group_size, EVEN=chunks % ck == 0 and per_split % ck == 0,
                     RT=rows_per_thread, CS=chunks_per_step, WR=warps_rows, WK=warps_k, PDL=pdl,
                     XSUM=not nf4 or offset is not None, NF4=nf4, SPLIT_K=splits > 1, INTERLEAVE=interleave, ACT=act,
                     SPLITS=1 << max(0, (splits - 1).bit_length()), FRAGMENTS=fragments, XL=laid is not None,
                     DEPTH=depth,
                     num_warps=warps_rows * warps_k, launch_pdl=pdl)
    return gemv4_mma_kernel, grid, args, constants


def mma_gemv(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, n: int,
             group_size: int, zero: int | None = 8, rows_per_thread: int = 1, chunks_per_step: int = 2,
             warps_rows: int = 1, warps_k: int = 4, split: int = 1, pdl: bool = False,
             out: torch.Tensor | None = None, interleave: bool = False, act: bool = False,
             laid: torch.Tensor | None = None, depth: int = 1) -> torch.Tensor:
    """y (M, N) = x (M, K) @ W^T for int4 weights re-laid by mma_layout, M <= KERNEL_ROWS: W = scale * (code - zero),
    or with an offset scale * code + offset (zero 0), or NF4 (zero None: W = scale * level(code)), scale and offset
    (N, G) per group of `group_size` columns (a multiple of 64; G = 1 per channel). x must be 16-byte aligned."""
    kernel, grid, args, constants = launch(x, words, scale, offset, n, group_size, zero, rows_per_thread,
                                           chunks_per_step, warps_rows, warps_k, split, pdl, out, interleave, act,
                                           laid, depth)
    kernel[grid](*args, **constants)
    return args[5]


def _nf4_table(device: torch.device, bf16: bool, cache: dict = {}) -> torch.Tensor:  # noqa: B006
    key = (device, bf16)
    if key not in cache:
        cache[key] = torch.tensor([nf4_table(bf16)] * 32, dtype=torch.int32, device=device)
    return cache[key]
