"""The M = 1 GEMV for 4-bit codes with the weights streamed by Hopper's tensor memory accelerator (TMA).

gluon_gemv.py's GEMV loads the weight words into registers (or through cp.async), a step or a few ahead, in many
short programs. Nsight Compute on an H100 (docs/benchmarks.md, fifth pass) has it keep DRAM 28-49% busy, where
cuBLAS's bf16 GEMV, with one program per multiprocessor or fewer and many bytes in flight each, keeps it 65-78%
busy. Here a persistent grid (at most `ctas_per_sm` programs per multiprocessor) walks its row blocks one after
another; one thread of each program keeps `STAGES` tiles of (BN rows x one group of words) in flight in shared
memory through TMA copies that signal an mbarrier, so the stream never drains between row blocks, and the
decode and products are gluon_gemv's (float16 pairs for int4, the register lookup for nf4), SUB = 1.

Restrictions (the caller falls back to gluon_gemv otherwise): 4-bit codes, rows of a multiple of 16 bytes
(K % 32 == 0), no input permutation, no split of K.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from modelpress.nn.gluon_gemv import _codes, _gdc_launch_dependents, _gdc_wait, _half_dot, _load_x, _load_x_pairs, \
    _slot, PAIRS_CONSTRAINTS


@gluon.jit
def gemv4_tma_kernel(
    w_desc, x_ptr, scale_ptr, offset_ptr, bias_ptr, y_ptr, N, K, group_size, exponent_bits, stride_sn, stride_sg,
    KIND: gl.constexpr, ZERO: gl.constexpr, AFFINE: gl.constexpr, HAS_BIAS: gl.constexpr, EVEN_K: gl.constexpr,
    PDL: gl.constexpr, BN: gl.constexpr, BKG: gl.constexpr, RPT: gl.constexpr, WARPS: gl.constexpr,
    STAGES: gl.constexpr, HALF: gl.constexpr = False, DOT_ASM: gl.constexpr = "", PAIRS_ASM: gl.constexpr = "",
):
    """y (1, N) = x (1, K) @ W^T, W's int32 words (N, K / 8) read through w_desc in (BN, BKG / 8) tiles."""
    WPG: gl.constexpr = BKG // 8
    TW: gl.constexpr = WPG // 4  # threads across a tile's words, 4 words (16 bytes) each
    TR: gl.constexpr = 32 // TW
    CODES: gl.constexpr = 4 if HALF else 8
    P4: gl.constexpr = gl.BlockedLayout([RPT, 1, 4, CODES], [TR, 1, TW, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])
    W3: gl.constexpr = gl.SliceLayout(3, P4)  # (BN, 1, WPG) words
    W2: gl.constexpr = gl.SliceLayout(1, W3)  # (BN, WPG), as the tile lies in shared memory
    X3: gl.constexpr = gl.SliceLayout(0, P4)  # (1, WPG, CODES) activations
    S2: gl.constexpr = gl.SliceLayout(2, W3)  # (BN, 1) scales
    ROW: gl.constexpr = gl.SliceLayout(1, S2)  # (BN,)

    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    blocks = gl.cdiv(N, BN)
    k_steps = gl.cdiv(K, BKG)
    mine = gl.cdiv(blocks - pid, programs)  # row blocks pid, pid + programs, ...
    total = mine * k_steps

    ring = gl.allocate_shared_memory(gl.int32, [STAGES, BN, WPG], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
    for stage in gl.static_range(STAGES):  # the first STAGES tiles
        live = stage < total
        block = pid + (stage // k_steps) * programs
        mbarrier.expect(ready.index(stage), w_desc.block_type.nbytes, pred=live)
        tma.async_copy_global_to_shared(w_desc, [block * BN, (stage % k_steps) * WPG], ready.index(stage),
                                        ring.index(stage), pred=live)

    x_word = gl.arange(0, WPG, layout=gl.SliceLayout(0, gl.SliceLayout(2, X3)))
    x_code = gl.arange(0, CODES, layout=gl.SliceLayout(0, gl.SliceLayout(1, X3)))
    x_cols = (x_word * CODES)[None, :, None] + x_code[None, None, :]  # (1, WPG, CODES)
    if not HALF:
        code_idx = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, P4))))
        code_idx = code_idx[None, None, None, :]
    lanes = gl.arange(0, BN, layout=ROW)
    zero_col = gl.arange(0, 1, layout=gl.SliceLayout(0, S2))  # (1,) the tile's one group

    if PDL:
        _gdc_launch_dependents()
        _gdc_wait()

    # the scales and activations of a step are loaded a step ahead, in registers
    s_next, o_next, x_next = _step_operands(scale_ptr, offset_ptr, x_ptr, pid, 0, lanes, zero_col, x_cols, N, K,
                                            group_size, stride_sn, stride_sg, k_steps, programs, AFFINE, HALF,
                                            EVEN_K, BN, BKG)
    acc = gl.zeros((BN, 1, WPG), gl.float32, layout=W3)
    for t in range(total):
        slot = t % STAGES
        block = pid + (t // k_steps) * programs
        s = s_next.to(gl.float32)
        o = o_next.to(gl.float32)
        xt = x_next
        s_next, o_next, x_next = _step_operands(scale_ptr, offset_ptr, x_ptr, pid, gl.minimum(t + 1, total - 1),
                                                lanes, zero_col, x_cols, N, K, group_size, stride_sn, stride_sg,
                                                k_steps, programs, AFFINE, HALF, EVEN_K, BN, BKG)
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        w = gl.expand_dims(ring.index(slot).load(W2), 1).to(gl.uint32, bitcast=True)
        gl.thread_barrier()  # every thread holds its words: the slot may be refilled
        nxt = t + STAGES
        live = nxt < total
        mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes, pred=live)
        tma.async_copy_global_to_shared(w_desc, [(pid + (nxt // k_steps) * programs) * BN, (nxt % k_steps) * WPG],
                                        ready.index(slot), ring.index(slot), pred=live)
        if HALF:
            pairs, aux = gl.inline_asm_elementwise(PAIRS_ASM, PAIRS_CONSTRAINTS, [xt], dtype=(gl.int32, gl.float32),
                                                   is_pure=True, pack=16)
            unscale = _slot(aux, 1, gl.SliceLayout(0, W3))
            part = _half_dot(w, pairs, DOT_ASM, gl.SliceLayout(0, W3)) * unscale[None, :, :]
            if AFFINE:
                x_sum = _slot(aux, 0, gl.SliceLayout(0, W3)) * unscale
        else:
            values = _codes(w[:, :, :, None], code_idx, exponent_bits, KIND, ZERO, True)
            part = gl.sum(values * xt[None, :, :, :], axis=3)
            if AFFINE:
                x_sum = gl.convert_layout(gl.sum(xt, axis=2), gl.SliceLayout(0, W3), assert_trivial=True)
        acc += part * s[:, :, None]
        if AFFINE:
            acc += x_sum[None, :, :] * o[:, :, None]
        if t % k_steps == k_steps - 1:  # the block's last step: its rows are done
            out = gl.sum(gl.sum(acc, axis=2), axis=1)
            offs = block * BN + lanes
            if HAS_BIAS:
                out += gl.load(bias_ptr + offs, mask=offs < N, other=0.0).to(gl.float32)
            gl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=offs < N)
            acc = gl.zeros((BN, 1, WPG), gl.float32, layout=W3)

    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(stage))


@gluon.jit
def _step_operands(scale_ptr, offset_ptr, x_ptr, pid, t, lanes, zero_col, x_cols, N, K, group_size, stride_sn,
                   stride_sg, k_steps, programs, AFFINE: gl.constexpr, HALF: gl.constexpr, EVEN_K: gl.constexpr,
                   BN: gl.constexpr, BKG: gl.constexpr):
    """(scales (BN, 1), offsets (BN, 1) or the scales again, activations) of flat step t of program pid."""
    block = pid + (t // k_steps) * programs
    k0 = (t % k_steps) * BKG
    rows = gl.minimum(block * BN + lanes, N - 1)
    group = (k0 // group_size + zero_col)[None, :]
    s = gl.load(scale_ptr + rows[:, None] * stride_sn + group * stride_sg)
    if AFFINE:
        o = gl.load(offset_ptr + rows[:, None] * stride_sn + group * stride_sg)
    else:
        o = s
    if HALF:
        xt = _load_x_pairs(x_ptr, k0, x_cols, K, EVEN_K)
    else:
        xt = _load_x(x_ptr, x_ptr, k0 + x_cols, K, False, EVEN_K)
    return s, o, xt


def tma_gemv(x2, packed, bias=None, *, bn: int = 128, stages: int = 6, ctas_per_sm: int = 2, warps: int = 4,
             pdl: bool = True, half: bool = True, out=None):
    """y (1, N) for x2 (1, K) through gemv4_tma_kernel; the descriptor is made per call (an experiment: a
    layer would keep it)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from modelpress.nn import triton_backend as tb

    n, k = packed.shape
    scheme = packed.scheme
    kind, zero = tb._FORMAT_KINDS[scheme.format]
    if kind > 1 or k % 32 or packed.input_perm is not None or x2.shape[0] != 1:
        raise ValueError("the TMA GEMV takes 4-bit codes, K % 32 == 0, no input permutation, one row")
    bkg = min(128, tb._group_tile(scheme, packed.shape, tuple(packed.scale.shape)) or 0)
    wpg = bkg // 8
    rpt = bn // (32 // (wpg // 4) * warps)
    words = packed.qdata.view(torch.int32)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=min(128, wpg * 4), element_bitwidth=32, rank=2)
    desc = TensorDescriptor.from_tensor(words, [bn, wpg], layout)
    affine = scheme.qformat.affine
    half = half and kind == 0
    dot, pairs = tb._half_asm(zero, affine, x2.dtype == torch.bfloat16) if half else ("", "")
    y = torch.empty((1, n), device=x2.device, dtype=x2.dtype) if out is None else out
    stride_sn, stride_sg = tb._scale_strides(packed.scale)
    offset = packed.offset if packed.offset is not None else packed.scale
    blocks = -(-n // bn)
    grid = (min(blocks, ctas_per_sm * tb._sm_count(x2.device.index or 0)),)
    gemv4_tma_kernel[grid](
        desc, x2, packed.scale, offset, bias if bias is not None else packed.scale, y, n, k,
        scheme.group_length(k), tb._EXPONENT_BITS, stride_sn, stride_sg,
        KIND=kind, ZERO=zero, AFFINE=affine, HAS_BIAS=bias is not None, EVEN_K=k % bkg == 0, PDL=pdl, BN=bn,
        BKG=bkg, RPT=rpt, WARPS=warps, STAGES=stages, HALF=half, DOT_ASM=dot, PAIRS_ASM=pairs, num_warps=warps,
        launch_pdl=pdl)
    return y
