"""The M = 1 GEMV for 4-bit codes written in Gluon (Triton's explicit-layout dialect), so that no tile changes
layout inside the loop.

Why not plain Triton (triton_gemv.gemv4_kernel): there the compiler picks each tensor's layout, and the x
slice, loaded as (SUB, WPG, 8) columns and split into eight (SUB, WPG) planes to meet the word tile, is
converted through shared memory with a barrier every loop step (the H200 SASS of that kernel: ~13 BAR.SYNC,
~20 STS and ~25 LDS per launch body). At M = 1 the kernel is a pure weight stream, and every barrier stalls
the loads that should be in flight.

Here one 4-D layout P4 = (BN rows, SUB group tiles, WPG words, 8 codes) owns everything: each thread holds
RPT rows x 4 consecutive uint32 words (16-byte loads) x the 8 codes of each word in registers. The word tile
is P4 without its code axis, the x tile (SUB, WPG, 8) is P4 without its row axis (each thread loads the 32
consecutive activations its four words need: 64 contiguous bytes), and the product reduces over the code
axis inside a thread. Nothing moves between threads until the final (BN,) reduction.

Decode as in triton_gemv: a nibble ORed into the exponent bits of 2**(23 - 4p) reads as 2**(23 - 4p) + code
(one LOP3 + one FADD per weight); NF4 through nf4_ptx's byte permutes. The per-code constants are functions
of the register index along the code axis, so they fold at compile time.

PDL (programmatic dependent launch): launched with launch_pdl, a program issues its first weight loads, then
waits (griddepcontrol.wait) for the previous kernel in the stream before it reads x or writes anything, and
lets the next kernel launch early (griddepcontrol.launch_dependents). Weights never depend on the previous
kernel, so back-to-back GEMVs overlap one kernel's tail and launch with the next one's first loads.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from modelpress.nn import half_dot_ptx
from modelpress.nn.nf4_ptx import nf4_levels, word_to_f32

ASM_NF4: gl.constexpr = gl.constexpr(word_to_f32(nf4_levels()))
DOT_CONSTRAINTS: gl.constexpr = gl.constexpr(half_dot_ptx.dot_constraints())
PAIRS_CONSTRAINTS: gl.constexpr = gl.constexpr(half_dot_ptx.x_pairs_constraints())


def half_asm(zero: int, affine: bool, bf16: bool) -> tuple[str, str]:
    """(DOT_ASM, PAIRS_ASM): the kernel's constants for HALF=True (int4 codes with code zero `zero`; half_dot_ptx)."""
    return half_dot_ptx.int4_dot(zero), half_dot_ptx.x_pairs(bf16=bf16, with_sum=affine)


@gluon.jit
def gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _codes(w4, code_idx, exponent_bits, KIND: gl.constexpr, ZERO: gl.constexpr, USE_ASM: gl.constexpr):
    """(BN, SUB, WPG, 8) float32 values of the codes of each word (code i at bits 4i..4i+3; w4 has a unit last
    axis, code_idx is 0..7 along it): code - ZERO for int4, the NF4 level for nf4 (PTX lookups only)."""
    if KIND == 1:
        gl.static_assert(USE_ASM, "the Gluon GEMV decodes nf4 with the PTX lookup only")
        words = w4 + (code_idx * 0).to(gl.uint32)  # one copy per code: the asm takes eight, reads the first
        return gl.inline_asm_elementwise(ASM_NF4, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r", [words],
                                         dtype=gl.float32, is_pure=True, pack=8)
    else:
        p = gl.where(code_idx < 4, code_idx, code_idx - 3)  # nibble of `src`: codes 4-7 come from w >> 12
        src = gl.where(code_idx < 4, w4, w4 >> 12)
        # bits of 2**(23 - 4p), from a run-time argument: with a register operand the AND (an immediate mask) and
        # the OR fuse into one LOP3; two immediates would take two
        exponent = (exponent_bits - p * 0x02000000).to(gl.uint32, bitcast=True)
        magic = (0x4B000000 - p * 0x02000000).to(gl.float32, bitcast=True) + ZERO
        mask = (15 << (4 * p)).to(gl.uint32, bitcast=True)
        return ((src & mask) | exponent).to(gl.float32, bitcast=True) - magic


@gluon.jit
def gemv4_gluon_kernel(
    x_ptr, w_ptr, scale_ptr, offset_ptr, perm_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    N, K, group_size, k_per_split, exponent_bits, stride_wn, stride_sn, stride_sg,
    KIND: gl.constexpr, ZERO: gl.constexpr, AFFINE: gl.constexpr, HAS_PERM: gl.constexpr,
    HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, SPLITS: gl.constexpr, EVEN_K: gl.constexpr,
    USE_ASM: gl.constexpr, PDL: gl.constexpr, BN: gl.constexpr, BKG: gl.constexpr, SUB: gl.constexpr,
    RPT: gl.constexpr, WARPS: gl.constexpr, WARPS_K: gl.constexpr, STAGES: gl.constexpr,
    HALF: gl.constexpr = False, DOT_ASM: gl.constexpr = "", PAIRS_ASM: gl.constexpr = "",
):
    """y (1, N) = x (1, K) @ W^T for 4-bit codes (int4 / int4-asym: KIND 0, nf4: KIND 1), as
    triton_gemv.gemv4_kernel (same grid and arguments; table_ptr unused: nf4 decodes in registers).
    RPT: rows per thread. WARPS: num_warps, WARPS_K of them along the sub-tiles (K), the rest along the rows.
    STAGES > 1: the words go through a ring of STAGES steps in shared memory filled by cp.async, STAGES - 1
    steps ahead (each thread reads back the chunks it copied; Triton's barrier pass still adds two barriers per
    step). STAGES = 1: the next step's words are prefetched into registers.
    HALF (int4 only): 16-bit activations are read as pairs (one 32-bit word each), turned into float16 pairs under
    a power-of-two scale by PAIRS_ASM once per thread and step, and each thread's four weight words are
    multiplied and summed in float16 pairs by DOT_ASM (half_dot_ptx; gluon_gemv.half_asm gives both); every sum
    above that is float32, multiplied back by the scale's inverse."""
    WPG: gl.constexpr = BKG // 8  # words per group sub-tile (4, 8 or 16)
    TW: gl.constexpr = WPG // 4  # threads across a sub-tile's words, 4 words (16 bytes) each
    TS: gl.constexpr = SUB // WARPS_K if SUB // WARPS_K * TW <= 32 else 32 // TW  # threads across sub-tiles
    TR: gl.constexpr = 32 // (TW * TS)
    CODES: gl.constexpr = 4 if HALF else 8  # per word, x as 4 pairs (HALF) or as 8 values
    P4: gl.constexpr = gl.BlockedLayout([RPT, 1, 4, CODES], [TR, TS, TW, 1], [WARPS // WARPS_K, WARPS_K, 1, 1],
                                        [3, 2, 1, 0])
    W3: gl.constexpr = gl.SliceLayout(3, P4)  # (BN, SUB, WPG) words
    X3: gl.constexpr = gl.SliceLayout(0, P4)  # (SUB, WPG, CODES) activations
    S2: gl.constexpr = gl.SliceLayout(2, W3)  # (BN, SUB) scales
    ROW: gl.constexpr = gl.SliceLayout(1, S2)  # (BN,)
    STEP: gl.constexpr = BKG * SUB

    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    offs_n = pid_n * BN + gl.arange(0, BN, layout=ROW)
    rows = gl.minimum(offs_n, N - 1)  # rows past N re-read the last row (results masked at the store)
    # word offsets (SUB, WPG) of a step, in the word tile's and in the x tile's layout
    w_sub = gl.arange(0, SUB, layout=gl.SliceLayout(1, gl.SliceLayout(0, W3)))
    w_word = gl.arange(0, WPG, layout=gl.SliceLayout(0, gl.SliceLayout(0, W3)))
    step_words = w_sub[:, None] * WPG + w_word[None, :]
    x_sub = gl.arange(0, SUB, layout=gl.SliceLayout(1, gl.SliceLayout(2, X3)))
    x_word = gl.arange(0, WPG, layout=gl.SliceLayout(0, gl.SliceLayout(2, X3)))
    x_code = gl.arange(0, CODES, layout=gl.SliceLayout(0, gl.SliceLayout(1, X3)))
    # (SUB, WPG, CODES): columns of x from the step's first, or with HALF the step's 32-bit pairs of x
    x_cols = ((x_sub[:, None] * WPG + x_word[None, :]) * CODES)[:, :, None] + x_code[None, None, :]
    if not HALF:
        code_idx = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, P4))))
        code_idx = code_idx[None, None, None, :]  # (1, 1, 1, 8)
    sub_cols = gl.arange(0, SUB, layout=gl.SliceLayout(0, S2)) * BKG  # first column of each sub-tile

    w_rows = w_ptr + rows[:, None, None] * stride_wn
    s_rows = scale_ptr + rows[:, None] * stride_sn
    o_rows = offset_ptr + rows[:, None] * stride_sn
    k_begin = pid_k * k_per_split
    k_end = gl.minimum(k_begin + k_per_split, K)
    k_last = k_begin + ((k_end - k_begin - 1) // STEP) * STEP  # start of this program's last step

    if STAGES > 1:
        ring = gl.allocate_shared_memory(gl.int32, [STAGES, BN, SUB, WPG],
                                         gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        for stage in gl.static_range(STAGES - 1):
            _copy_step(ring.index(stage), w_rows, k_begin + stage * STEP, k_end, step_words, WPG, EVEN_K)
            async_copy.commit_group()
        w_next = gl.zeros((BN, SUB, WPG), gl.int32, layout=W3)
    else:
        kw = gl.multiple_of(k_begin // 8, WPG)
        if EVEN_K:
            w_next = gl.load(w_rows + kw + step_words[None, :, :])
        else:
            w_next = gl.load(w_rows + kw + step_words[None, :, :], mask=((kw + step_words) * 8 < K)[None, :, :],
                             other=0)
    s_mask = (k_begin + sub_cols < K)[None, :]
    s_next = gl.load(s_rows + ((k_begin + sub_cols) // group_size)[None, :] * stride_sg, mask=s_mask, other=0.0)
    if AFFINE:
        o_next = gl.load(o_rows + ((k_begin + sub_cols) // group_size)[None, :] * stride_sg, mask=s_mask, other=0.0)
    else:
        o_next = s_next
    if PDL:  # weights are ours; x and every output belong to the kernels around us
        gdc_launch_dependents()
        gdc_wait()
    if HALF:
        x_next = _load_x_pairs(x_ptr, k_begin, x_cols, K, EVEN_K)
    else:
        x_next = _load_x(x_ptr, perm_ptr, k_begin + x_cols, K, HAS_PERM, EVEN_K)

    acc = gl.zeros((BN, SUB, WPG), gl.float32, layout=W3)
    i = 0
    for k0 in range(k_begin, k_end, STEP):
        if STAGES > 1:
            _copy_step(ring.index((i + STAGES - 1) % STAGES), w_rows, k0 + (STAGES - 1) * STEP, k_end, step_words,
                       WPG, EVEN_K)
            async_copy.commit_group()
            async_copy.wait_group(STAGES - 1)  # this thread's copies of step i have landed
            w = ring.index(i % STAGES).load(W3).to(gl.uint32, bitcast=True)
            i += 1
        else:
            w = w_next.to(gl.uint32, bitcast=True)
        s = s_next.to(gl.float32)
        o = o_next.to(gl.float32)
        xt = x_next
        k1 = gl.minimum(k0 + STEP, k_last)  # prefetch the next step; after the last one, the loads are masked off
        more = k0 + STEP < k_end
        if STAGES == 1:
            kw = gl.multiple_of(k1 // 8, WPG)
            if EVEN_K:
                w_next = gl.load(w_rows + kw + step_words[None, :, :], mask=more, other=0)
            else:
                w_next = gl.load(w_rows + kw + step_words[None, :, :],
                                 mask=more & ((kw + step_words) * 8 < K)[None, :, :], other=0)
        s_mask = (k1 + sub_cols < K)[None, :]
        s_next = gl.load(s_rows + ((k1 + sub_cols) // group_size)[None, :] * stride_sg, mask=s_mask, other=0.0)
        if AFFINE:
            o_next = gl.load(o_rows + ((k1 + sub_cols) // group_size)[None, :] * stride_sg, mask=s_mask, other=0.0)
        if HALF:
            x_next = _load_x_pairs(x_ptr, k1, x_cols, K, EVEN_K)
            # pack=16: one call per thread over its four words' activations (one power-of-two scale for them)
            pairs, aux = gl.inline_asm_elementwise(PAIRS_ASM, PAIRS_CONSTRAINTS, [xt], dtype=(gl.int32, gl.float32),
                                                   is_pure=True, pack=16)
            unscale = _slot(aux, 1, gl.SliceLayout(0, W3))  # (SUB, WPG): 2**s, the inverse of the word's scale
            part = _half_dot(w, pairs, DOT_ASM, gl.SliceLayout(0, W3)) * unscale[None, :, :]
            if AFFINE:
                x_sum = _slot(aux, 0, gl.SliceLayout(0, W3)) * unscale  # each word's activations, summed
        else:
            x_next = _load_x(x_ptr, perm_ptr, k1 + x_cols, K, HAS_PERM, EVEN_K)
            values = _codes(w[:, :, :, None], code_idx, exponent_bits, KIND, ZERO, USE_ASM)  # (BN, SUB, WPG, 8)
            part = gl.sum(values * xt[None, :, :, :], axis=3)  # (BN, SUB, WPG), inside each thread
            if AFFINE:
                x_sum = gl.convert_layout(gl.sum(xt, axis=2), gl.SliceLayout(0, W3), assert_trivial=True)
        acc += part * s[:, :, None]
        if AFFINE:  # W = scale · code + offset: add offset · (sum of the word's eight x)
            acc += x_sum[None, :, :] * o[:, :, None]

    _store_row(gl.sum(gl.sum(acc, axis=2), axis=1), y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_n, offs_n < N, pid_n,
               pid_k, N, SPLIT_K, SPLITS, HAS_BIAS, WARPS)


@gluon.jit
def _copy_step(slot, w_rows, k0, k_end, step_words, WPG: gl.constexpr, EVEN_K: gl.constexpr):
    """cp.async the (BN, SUB, WPG) words of the step starting at column k0 into `slot`; zeros from k_end on."""
    kw = gl.multiple_of(k0 // 8, WPG)
    if EVEN_K:  # steps tile the split: a step is in or out as a whole
        mask = (k0 < k_end) & (step_words >= 0)
    else:
        mask = (kw + step_words) * 8 < k_end
    async_copy.async_copy_global_to_shared(slot, w_rows + kw + step_words[None, :, :], mask=mask[None, :, :])


@gluon.jit
def _load_x_pairs(x_ptr, k0, pairs, K, EVEN_K: gl.constexpr):
    """The 16-bit activations from column k0 (even) on as 32-bit words of two: word i holds columns k0 + 2i and
    k0 + 2i + 1 (K is a multiple of 8: the codes are read as uint32 words of eight); 0 past K."""
    words = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + k0 // 2
    if EVEN_K:
        return gl.load(words + pairs)
    return gl.load(words + pairs, mask=k0 + 2 * pairs < K, other=0)


@gluon.jit
def _half_dot(w, pairs, DOT_ASM: gl.constexpr, XL: gl.constexpr):
    """(BN, SUB, WPG) float32 products of the int4 weight words w with their activations, given as the (SUB, WPG,
    4) float16 pairs of half_dot_ptx.x_pairs (scaled): the sum over a thread's four words in the first word's
    slot, 0 in the others. XL: the (SUB, WPG) slice of w's layout."""
    even, odd = gl.split(gl.reshape(pairs, [pairs.shape[0], pairs.shape[1], 2, 2]))  # pairs (0, 2), (1, 3)
    p0, p2 = gl.split(even)
    p1, p3 = gl.split(odd)
    p0 = gl.convert_layout(p0, XL, assert_trivial=True)[None, :, :]
    p1 = gl.convert_layout(p1, XL, assert_trivial=True)[None, :, :]
    p2 = gl.convert_layout(p2, XL, assert_trivial=True)[None, :, :]
    p3 = gl.convert_layout(p3, XL, assert_trivial=True)[None, :, :]
    # pack=4: one asm call per thread takes its four consecutive words (16 bytes, one group) and their pairs
    return gl.inline_asm_elementwise(DOT_ASM, DOT_CONSTRAINTS, [w, p0, p1, p2, p3], dtype=gl.float32,
                                     is_pure=True, pack=4)


@gluon.jit
def _slot(t, which: gl.constexpr, XL: gl.constexpr):
    """t[:, :, which] (which 0 or 1) of a (SUB, WPG, 4) tensor, in layout XL."""
    even, odd = gl.split(gl.reshape(t, [t.shape[0], t.shape[1], 2, 2]))  # slots (0, 2), (1, 3)
    if which == 0:
        return gl.convert_layout(gl.split(even)[0], XL, assert_trivial=True)
    return gl.convert_layout(gl.split(odd)[0], XL, assert_trivial=True)


@gluon.jit
def _load_x(x_ptr, perm_ptr, cols, K, HAS_PERM: gl.constexpr, EVEN_K: gl.constexpr):
    """x[cols] as float32 (stored-order columns mapped through input_perm); 0 past K."""
    if EVEN_K:
        mask = cols >= 0
    else:
        mask = cols < K
    if HAS_PERM:
        src = gl.load(perm_ptr + cols, mask=mask, other=0)
    else:
        src = cols
    return gl.load(x_ptr + src, mask=mask, other=0.0).to(gl.float32)


@gluon.jit
def _store_row(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_n, n_mask, pid_n, pid_k, N, SPLIT_K: gl.constexpr,
               SPLITS: gl.constexpr, HAS_BIAS: gl.constexpr, WARPS: gl.constexpr):
    """y[offs_n] = acc (BN,) (+ bias), through the split-K workspace when K is split: the last program of a row
    block to arrive adds the (SPLITS, BN) partial sums in a fixed order (triton_gemv's module docstring)."""
    if SPLIT_K:
        gl.store(ws_ptr + pid_k * N + offs_n, acc, mask=n_mask)
        gl.thread_barrier()  # every thread's partial sums are written before the count goes up
        lock = lock_ptr + pid_n
        splits = gl.num_programs(2)
        if gl.atomic_add(lock, 1, sem="acq_rel") == splits - 1:
            E2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, WARPS], [1, 0])
            split = gl.arange(0, SPLITS, layout=gl.SliceLayout(1, E2))
            cols = gl.convert_layout(offs_n, gl.SliceLayout(0, E2))
            col_mask = cols < N
            parts = gl.load(ws_ptr + split[:, None] * N + cols[None, :],
                            mask=(split < splits)[:, None] & col_mask[None, :], other=0.0, cache_modifier=".cg")
            out = gl.sum(parts, axis=0)
            if HAS_BIAS:
                out += gl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(gl.float32)
            gl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=col_mask)
            gl.atomic_xchg(lock, 0)
    else:
        if HAS_BIAS:
            acc += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)
        gl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
