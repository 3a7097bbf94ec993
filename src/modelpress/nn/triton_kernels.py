"""Triton kernels for weight-only quantized matmul, reading PackedWeight's layout as it is stored.

y[m, n] = sum_k x[m, k] · W[n, k] with W[n, k] = scale[n, k // g] · decode(code[n, k]) (+ offset[n, k // g]).

Layout consumed (formats/packing.py): qdata uint8 (N, row_bytes), codes little-endian along K; for 4 bits
byte j of a row holds code 2j (low nibble) and code 2j+1 (high nibble). A tile of the weight is loaded as
(BKG/2, BN) bytes, column-major, so every row contributes one contiguous run of bytes.

How the main loop avoids work per weight (decode is memory-bound: at 3 TB/s an H100 receives about 17
4-bit weights per cycle per multiprocessor, so every instruction per weight counts):
- A tile never crosses a group (BKG divides g), so the group scale multiplies the (BM, BN) partial
  product once, not every weight; the affine offset adds offset · sum_k x[m, k] the same way.
- 4-bit codes are split into the even-k (low nibble) and odd-k (high nibble) halves; each half is
  multiplied by the matching even/odd columns of x, so no interleaving shuffle is needed.
- NF4 levels are looked up in registers by byte permutes (nf4_ptx.py), not gathered from memory.
- On the GPU the nibbles become half floats with the exponent trick: (code | 0x6400) read as float16 is
  1024 + code, so a byte permute, a masked OR and one packed subtract give two weights (inline PTX, see
  int4_asm). The portable fallback (also what TRITON_INTERPRET runs) uses the float32 version of the same
  trick: (code | 0x4B000000) read as float32 is 2**23 + code.
- Products run on the tensor cores (tl.dot) with M padded to 16, accumulating in float32.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from modelpress.nn.nf4_ptx import bytes_to_pairs, nf4_levels

# Format kinds understood by the kernels.
KIND_INT4 = 0  # code - zero                       (zero 8 for symmetric int4, 0 for asymmetric)
KIND_NF4 = 1  # table[code]
KIND_INT8 = 2  # code - zero                       (zero 128 for symmetric int8, 0 for asymmetric)
KIND_FP8E4 = 3  # float8 e4m3fn bit pattern
KIND_FP8E5 = 4  # float8 e5m2 bit pattern
KIND_FP8E4_BITS = 5  # float8 e4m3fn bit pattern, decoded in integer arithmetic (GPUs before compute capability 8.9)


def _f16_bits(value: float) -> int:
    return struct.unpack("<H", struct.pack("<e", value))[0]


def _bf16_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0] >> 16  # exact for the small integers used here


def _pair(bits16: int) -> str:
    return f"0x{bits16:04X}{bits16:04X}"


def int4_asm(bf16: bool, zero: int) -> str:
    """PTX turning 4 packed bytes ($4) into 4 low-nibble values ($0, $1) and 4 high-nibble values ($2, $3),
    each `code - zero` as float16x2 (or bfloat16x2). Element i of each output comes from byte i."""
    spread = ("prmt.b32 t0, $4, 0, 0x4140;\n"  # bytes 0, 1 of the input into half-word slots 0, 1
              "prmt.b32 t1, $4, 0, 0x4342;\n")  # bytes 2, 3 likewise
    if not bf16:
        # low nibble: (b & 0xF) | 0x6400 = 1024 + c; high nibble: (b & 0xF0) | 0x6400 = 1024 + 16c
        return ("{\n.reg .b32 t0, t1, a, c, d;\n" + spread
                + f"mov.b32 a, {_pair(_f16_bits(1024.0 + zero))};\n"
                + f"mov.b32 c, {_pair(_f16_bits(1.0 / 16))};\n"
                + f"mov.b32 d, {_pair(_f16_bits(-(64.0 + zero)))};\n"
                + "lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;\n"
                + "lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;\n"
                + "lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA;\n"
                + "lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;\n"
                + "sub.f16x2 $0, $0, a;\nsub.f16x2 $1, $1, a;\n"
                + "fma.rn.f16x2 $2, $2, c, d;\nfma.rn.f16x2 $3, $3, c, d;\n}")
    # bfloat16 has 7 mantissa bits: (c | 0x4300) = 128 + c works for the low nibble only, so the high
    # nibble is shifted down first.
    return ("{\n.reg .b32 t0, t1, t2, t3, one, d;\n" + spread
            + "shr.b32 t2, t0, 4;\nshr.b32 t3, t1, 4;\n"
            + f"mov.b32 one, {_pair(_bf16_bits(1.0))};\n"
            + f"mov.b32 d, {_pair(_bf16_bits(-(128.0 + zero)))};\n"
            + "lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;\n"
            + "lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;\n"
            + "lop3.b32 $2, t2, 0x000F000F, 0x43004300, 0xEA;\n"
            + "lop3.b32 $3, t3, 0x000F000F, 0x43004300, 0xEA;\n"
            + "fma.rn.bf16x2 $0, $0, one, d;\nfma.rn.bf16x2 $1, $1, one, d;\n"
            + "fma.rn.bf16x2 $2, $2, one, d;\nfma.rn.bf16x2 $3, $3, one, d;\n}")


ASM_F16_Z8: tl.constexpr = tl.constexpr(int4_asm(False, 8))
ASM_F16_Z0: tl.constexpr = tl.constexpr(int4_asm(False, 0))
ASM_BF16_Z8: tl.constexpr = tl.constexpr(int4_asm(True, 8))
ASM_BF16_Z0: tl.constexpr = tl.constexpr(int4_asm(True, 0))
ASM_NF4_F16: tl.constexpr = tl.constexpr(bytes_to_pairs(nf4_levels(), bf16=False))
ASM_NF4_BF16: tl.constexpr = tl.constexpr(bytes_to_pairs(nf4_levels(), bf16=True))


@triton.jit
def _magic_f32(code, ZERO: tl.constexpr):
    """int32 code in [0, 2**23) -> float32 code - ZERO, without an int-to-float conversion."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO)


@triton.jit
def _decode_nibbles(q, table_ptr, KIND: tl.constexpr, ZERO: tl.constexpr, ACT: tl.constexpr,
                    USE_ASM: tl.constexpr):
    """uint8 tile -> (low-nibble values, high-nibble values), both in the activation dtype."""
    if KIND == 1 and USE_ASM:  # levels looked up in registers (nf4_ptx.py)
        if ACT == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(ASM_NF4_BF16, "=r,=r,=r,=r,r", [q], dtype=(tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(ASM_NF4_F16, "=r,=r,=r,=r,r", [q], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
    elif KIND == 1:
        qi = q.to(tl.int32)
        lo = tl.load(table_ptr + (qi & 15))
        hi = tl.load(table_ptr + (qi >> 4))
    elif USE_ASM:
        if ACT == tl.bfloat16:
            if ZERO == 8:
                lo, hi = tl.inline_asm_elementwise(ASM_BF16_Z8, "=r,=r,=r,=r,r", [q],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(ASM_BF16_Z0, "=r,=r,=r,=r,r", [q],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            if ZERO == 8:
                lo, hi = tl.inline_asm_elementwise(ASM_F16_Z8, "=r,=r,=r,=r,r", [q],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(ASM_F16_Z0, "=r,=r,=r,=r,r", [q],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        qi = q.to(tl.int32)
        lo = _magic_f32(qi & 15, ZERO).to(ACT)
        hi = _magic_f32(qi >> 4, ZERO).to(ACT)
    return lo, hi


@triton.jit
def _e4m3_bits_to_f32(q):
    """float8 e4m3fn bit patterns (uint8) -> float32 in integer arithmetic, for GPUs without e4m3 conversions
    (compute capability below 8.9; KIND_FP8E4_BITS): the seven magnitude bits moved under float32's exponent and
    mantissa, the exponent rebased from e4m3's bias 7 to float32's 127; subnormals (exponent field 0) as
    mantissa · 2^-9. The NaN patterns (never stored) are not kept."""
    b = q.to(tl.uint32)
    magnitude = b & 0x7F
    normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(magnitude >= 8, normal, (magnitude & 7).to(tl.float32) * 0.001953125)
    return tl.where((b & 0x80) != 0, -value, value)


@triton.jit
def _decode_bytes(q, KIND: tl.constexpr, ZERO: tl.constexpr, ACT: tl.constexpr):
    """uint8 tile of 8-bit codes -> values in the activation dtype."""
    if KIND == 3:
        w = q.to(tl.float8e4nv, bitcast=True).to(tl.float32).to(ACT)
    elif KIND == 5:
        w = _e4m3_bits_to_f32(q).to(ACT)
    elif KIND == 4:
        w = q.to(tl.float8e5, bitcast=True).to(tl.float32).to(ACT)
    else:
        w = _magic_f32(q.to(tl.int32), ZERO).to(ACT)
    return w


@triton.jit
def _load_x(x_ptr, perm_ptr, offs_m, m_mask, cols, K, stride_xm, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """x[offs_m, cols] (stored-order columns mapped through input_perm); zero outside M and K."""
    if EVEN_K:
        col_mask = cols >= 0
    else:
        col_mask = cols < K
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=col_mask, other=0)
    else:
        src = cols
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :], mask=m_mask[:, None] & col_mask[None, :],
                   other=0.0)


@triton.jit
def _tile_product(x_ptr, q_ptr, perm_ptr, table_ptr, kk, offs_m, m_mask, offs_n, n_mask, K, stride_xm, stride_qn,
                  KIND: tl.constexpr, ZERO: tl.constexpr, AFFINE: tl.constexpr, HAS_PERM: tl.constexpr,
                  USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, ACT: tl.constexpr, BKG: tl.constexpr):
    """(BM, BN) float32 partial product of columns [kk, kk + BKG), and the row sums of x over them.
    kk is a multiple of BKG; with EVEN_K every tile lies inside K and no column masks are needed."""
    kk = tl.multiple_of(kk, BKG)  # a multiple of BKG: lets loads of aligned rows vectorize
    cols = kk + tl.arange(0, BKG)
    xt = _load_x(x_ptr, perm_ptr, offs_m, m_mask, cols, K, stride_xm, HAS_PERM, EVEN_K)  # (BM, BKG)
    if KIND <= 1:
        byte = kk // 2 + tl.arange(0, BKG // 2)  # (BKG/2,) byte offsets within a row
        if EVEN_K:
            q_mask = n_mask[None, :]
        else:
            q_mask = (2 * byte < K)[:, None] & n_mask[None, :]
        q = tl.load(q_ptr + offs_n[None, :] * stride_qn + byte[:, None], mask=q_mask, other=0)  # (BKG/2, BN)
        lo, hi = _decode_nibbles(q, table_ptr, KIND, ZERO, ACT, USE_ASM)
        x_even, x_odd = tl.split(tl.reshape(xt, (xt.shape[0], BKG // 2, 2)))
        part = tl.dot(x_odd, hi, acc=tl.dot(x_even, lo))
    else:
        if EVEN_K:
            q_mask = n_mask[None, :]
        else:
            q_mask = (cols < K)[:, None] & n_mask[None, :]
        q = tl.load(q_ptr + offs_n[None, :] * stride_qn + cols[:, None], mask=q_mask, other=0)  # (BKG, BN)
        w = _decode_bytes(q, KIND, ZERO, ACT)
        part = tl.dot(xt, w)
    if AFFINE:
        x_sum = tl.sum(xt.to(tl.float32), axis=1)
    else:
        x_sum = tl.zeros((xt.shape[0],), tl.float32)
    return part, x_sum


@triton.jit
def _group_params(ptr, offs_n, n_mask, kk, K, group_size, stride_sn, stride_sg, BKG: tl.constexpr,
                  SUB: tl.constexpr):
    """(SUB, BN) float32 scales (or offsets) of the SUB sub-tiles starting at column kk; 0 past K."""
    first_cols = kk + tl.arange(0, SUB) * BKG
    ptrs = ptr + (first_cols // group_size)[:, None] * stride_sg + offs_n[None, :] * stride_sn
    return tl.load(ptrs, mask=(first_cols < K)[:, None] & n_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _row(tile, j: tl.constexpr, SUB: tl.constexpr):
    """Row j of a (SUB, BN) register tile, as a (BN,) vector."""
    if SUB == 1:
        return tl.sum(tile, axis=0)
    return tl.sum(tl.where(tl.arange(0, SUB)[:, None] == j, tile, 0.0), axis=0)


@triton.jit
def _store_tile(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_m, pid_n, pid_k, M, N,
                stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Write a (BM, BN) float32 tile of y (+ bias). With split-K, each program stores its partial sums in the
    workspace and counts itself in the tile's lock; the last to arrive adds the partials in a fixed order (so
    results do not depend on arrival order), adds the bias, writes y and resets the lock for the next call."""
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K:
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=y_mask)
        tl.debug_barrier()  # every thread's partial sums are written before the count goes up
        lock = lock_ptr + pid_m * tl.num_programs(1) + pid_n
        splits = tl.num_programs(2)
        if tl.atomic_add(lock, 1, sem="acq_rel") == splits - 1:
            acc = tl.zeros((BM, BN), tl.float32)
            for split in range(splits):
                acc += tl.load(ws_ptr + split * M * N + tile, mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=y_mask)
            tl.atomic_xchg(lock, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def quant_matmul_kernel(
    x_ptr, q_ptr, scale_ptr, offset_ptr, perm_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_ym,
    KIND: tl.constexpr, ZERO: tl.constexpr, AFFINE: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BKG: tl.constexpr, SUB: tl.constexpr, PDL: tl.constexpr = False,
):
    """Fused dequantize-and-multiply. Grid: (M blocks, N blocks, K splits).

    Each program covers columns [pid_k * k_per_split, +k_per_split) of K (a multiple of BKG * SUB).
    Scales and offsets are loaded one loop step ahead (the tensor-core operands are pipelined by Triton;
    these small gathers are not, and waiting on them every step would cost a memory latency per step).
    With SPLIT_K, each program writes its float32 partial sums to ws (splits, M, N); the last program of an
    output tile to arrive (counted in lock, which it resets to 0) adds them up and writes y. EVEN_K: K is
    a multiple of BKG * SUB, so no column masks are needed. PDL: launched as a programmatic dependent launch
    (triton_backend.pdl_launch)."""
    if PDL:  # triton_backend.pdl_launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    ACT: tl.constexpr = x_ptr.dtype.element_ty
    STEP: tl.constexpr = BKG * SUB
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BM, BN), tl.float32)
    k_begin = pid_k * k_per_split
    k_end = k_begin + k_per_split
    k_end = min(k_end, K)
    s_next = _group_params(scale_ptr, offs_n, n_mask, k_begin, K, group_size, stride_sn, stride_sg, BKG, SUB)
    if AFFINE:
        o_next = _group_params(offset_ptr, offs_n, n_mask, k_begin, K, group_size, stride_sn, stride_sg, BKG, SUB)
    else:
        o_next = s_next
    for k0 in range(k_begin, k_end, STEP):
        s_now = s_next
        o_now = o_next
        s_next = _group_params(scale_ptr, offs_n, n_mask, k0 + STEP, K, group_size, stride_sn, stride_sg, BKG, SUB)
        if AFFINE:
            o_next = _group_params(offset_ptr, offs_n, n_mask, k0 + STEP, K, group_size, stride_sn, stride_sg,
                                   BKG, SUB)
        for j in tl.static_range(SUB):
            part, x_sum = _tile_product(x_ptr, q_ptr, perm_ptr, table_ptr, k0 + j * BKG, offs_m, m_mask, offs_n,
                                        n_mask, K, stride_xm, stride_qn, KIND, ZERO, AFFINE, HAS_PERM, USE_ASM,
                                        EVEN_K, ACT, BKG)
            acc += part * _row(s_now, j, SUB)[None, :]
            if AFFINE:
                acc += x_sum[:, None] * _row(o_now, j, SUB)[None, :]
    _store_tile(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, pid_m, pid_n, pid_k, M, N,
                stride_ym, SPLIT_K, HAS_BIAS, BM, BN)


@triton.jit
def dequantize_kernel(
    q_ptr, scale_ptr, offset_ptr, table_ptr, w_ptr,
    N, K, group_size, stride_qn, stride_sn, stride_sg,
    KIND: tl.constexpr, ZERO: tl.constexpr, AFFINE: tl.constexpr, EVEN_K: tl.constexpr, BN: tl.constexpr,
    BKG: tl.constexpr,
):
    """W (N, K) in w's dtype, stored column order, one (BN, BKG) tile per program; BKG divides g.
    EVEN_K: K is a multiple of BKG (no column masks, so loads and stores vectorize)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    kk = tl.multiple_of(tl.program_id(1) * BKG, BKG)
    n_mask = offs_n < N
    ACT: tl.constexpr = w_ptr.dtype.element_ty
    s_ptrs = offs_n * stride_sn + (kk // group_size) * stride_sg
    s = tl.load(scale_ptr + s_ptrs, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if AFFINE:
        o = tl.load(offset_ptr + s_ptrs, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    else:
        o = 0.0
    cols = kk + tl.arange(0, BKG)
    if EVEN_K:
        mask = n_mask[:, None] & (cols >= 0)[None, :]
    else:
        mask = n_mask[:, None] & (cols < K)[None, :]
    if KIND <= 1:
        byte = kk // 2 + tl.arange(0, BKG // 2)
        if EVEN_K:
            q_mask = n_mask[:, None] & (byte >= 0)[None, :]
        else:
            q_mask = n_mask[:, None] & (2 * byte < K)[None, :]
        q = tl.load(q_ptr + offs_n[:, None] * stride_qn + byte[None, :], mask=q_mask, other=0)
        lo, hi = _decode_nibbles(q, table_ptr, KIND, ZERO, tl.float32, False)
        w = tl.reshape(tl.join(lo * s + o, hi * s + o), (BN, BKG))  # interleave: column 2j, then 2j + 1
    else:
        q = tl.load(q_ptr + offs_n[:, None] * stride_qn + cols[None, :], mask=mask, other=0)
        w = _decode_bytes(q, KIND, ZERO, tl.float32) * s + o
    tl.store(w_ptr + offs_n[:, None] * K + cols[None, :], w.to(ACT), mask=mask)


@triton.jit
def mma_dequantize_kernel(w_ptr, scale_ptr, offset_ptr, table_ptr, out_ptr, N, K, group_size, stride_sn, stride_sg,
                          KIND: tl.constexpr, ZERO: tl.constexpr, AFFINE: tl.constexpr,
                          INTERLEAVE: tl.constexpr = False):
    """W (N, K) in out's dtype from 4-bit codes in mma_ptx.mma_layout (int4: KIND 0, nf4: KIND 1, levels at
    table_ptr), one 16-row tile x 64-column chunk per program: element (r, c) of the block is nibble p of word
    (lane 4 (r % 8) + (c % 16) // 4, slot 2 (c // 32) + r // 8), with q = 4 ((c // 16) % 2) + c % 4 its place in
    the word, p = NIBBLE_OF[q] = (q % 4) // 2 + 4 (q % 2) + 2 (q // 4) for int4, NF4_NIBBLE_OF[q] = q for nf4.
    INTERLEAVE: the tile's rows were re-laid from the stored rows mma_ptx.interleave_rows names (row r < 8 of tile
    t from row 8t + r, row r >= 8 from N / 2 + 8t + r - 8): W is written in the stored order."""
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    r = tl.arange(0, 16)[:, None]
    c = tl.arange(0, 64)[None, :]
    lane = 4 * (r % 8) + (c % 16) // 4
    slot = 2 * (c // 32) + r // 8
    word = tl.load(w_ptr + ((tile * tl.num_programs(1) + chunk) * 32 + lane) * 4 + slot)
    q = 4 * ((c // 16) % 2) + c % 4
    if KIND == 1:
        nibble = q
    else:
        nibble = (q % 4) // 2 + 4 * (q % 2) + 2 * (q // 4)
    code = (word >> (4 * nibble)) & 15
    if INTERLEAVE:
        rows = tl.where(r < 8, tile * 8 + r, N // 2 + tile * 8 + r - 8)
        row_mask = tile * 8 + r % 8 < N // 2
    else:
        rows = tile * 16 + r
        row_mask = rows < N
    cols = chunk * 64 + c
    s_ptrs = rows * stride_sn + (cols // group_size) * stride_sg
    s = tl.load(scale_ptr + s_ptrs, mask=row_mask, other=0.0).to(tl.float32)
    if KIND == 1:
        w = tl.load(table_ptr + code) * s
    else:
        w = (code.to(tl.float32) - ZERO) * s
    if AFFINE:
        w += tl.load(offset_ptr + s_ptrs, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * K + cols, w.to(out_ptr.dtype.element_ty), mask=row_mask & (cols < K))
