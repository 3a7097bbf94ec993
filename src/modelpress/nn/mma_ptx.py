"""The tensor-core GEMV's weight layout and PTX (gluon_mma_gemv.py has the kernel and the reasons; kept apart so
that the layout and the PTX are tested on machines without Triton)."""

from __future__ import annotations

import torch

from modelpress.nn.nf4_ptx import bf16_bits, f16_bits, nf4_levels

CHUNK = 64  # columns of K per lane word quad (four MMAs of 16)
TILE = 16  # rows per MMA tile
# activation rows decode sends to gluon_mma_gemv's rows mode: one B fragment of 8 columns. The kernel takes two
# fragments, 16 rows (KERNEL_ROWS), but there the stored layout's own tiles are as fast or faster: with x as stored,
# 21.9 against 17.8 µs on 12288x4096 (best of 20 plans, H100, bench/results/mma_rows16_rt_sweep_s41_h100.json); with
# x in fragment order and two loop steps of weights in flight, 15.98 / 27.33 against 17.42 / 27.57 µs on 12288x4096 /
# 22016x4096 and 23.27 against 20.55 on 4096x11008 (H200, bench/results/mma_rows_laid_s42_h200.json and
# mma_rows_laid_narrow_s42_h200.json): about 1.7 µs a layer, not built
MAX_ROWS = 8
KERNEL_ROWS = 16
# the nibble that holds the q-th code of a word (q = 4 * (second MMA) + column): int4's LOP3 decode pairs nibbles
# (i, i + 4), NF4's byte-permute lookup pairs (2i, 2i + 1)
NIBBLE_OF = (0, 4, 1, 5, 2, 6, 3, 7)
NF4_NIBBLE_OF = (0, 1, 2, 3, 4, 5, 6, 7)


def mma_layout(qdata: torch.Tensor, n: int, k: int, order: tuple[int, ...] = NIBBLE_OF) -> torch.Tensor:
    """(ceil(N / 16), K / 64, 32, 4) int32 words of the int4 codes of `qdata` (uint8 (N, K / 2), code 2j in the
    low nibble of byte j), laid out as gluon_mma_gemv's docstring says (`order`: NIBBLE_OF for int4, NF4_NIBBLE_OF
    for nf4); rows past N hold code 0."""
    if k % CHUNK:
        raise ValueError(f"the MMA GEMV needs K divisible by {CHUNK}, got {k}")
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(n, k)  # uint8: one byte a code while permuting
    tiles = -(-n // TILE)
    if tiles * TILE != n:
        codes = torch.cat((codes, codes.new_zeros(tiles * TILE - n, k)))
    # (tile, h, g, chunk, j pair, j in pair, t, column in MMA j's four): row 16 tile + 8 h + g,
    # column 64 chunk + 16 (2 jp + jl) + 4 t + e
    codes = codes.view(tiles, 2, 8, k // CHUNK, 2, 2, 4, 4)
    # -> (tile, chunk, g, t, word = 2 jp + h, q = 4 jl + e)
    codes = codes.permute(0, 3, 2, 6, 4, 1, 5, 7).reshape(tiles, k // CHUNK, 32, 4, 8)
    nibbles = codes[..., [order.index(p) for p in range(8)]]  # nibble p of each word, p = 0..7
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # byte b: nibbles 2b (low) and 2b + 1 (high)
    return packed.contiguous().view(torch.int32).squeeze(-1)  # little-endian: byte b at bits 8b..8b+7


def mma_codes(words: torch.Tensor, n: int, k: int, order: tuple[int, ...] = NIBBLE_OF) -> torch.Tensor:
    """The inverse of mma_layout: (N, K) uint8 codes, one byte each."""
    tiles = words.shape[0]
    raw = words.contiguous().view(torch.uint8).view(*words.shape, 4)  # byte b: nibbles 2b (low), 2b + 1 (high)
    nibbles = torch.stack((raw & 15, raw >> 4), dim=-1).flatten(-2)  # (tile, chunk, 32, 4, nibble p)
    codes = nibbles[..., list(order)]  # code q of each word
    codes = codes.view(tiles, k // CHUNK, 8, 4, 2, 2, 2, 4).permute(0, 5, 2, 1, 4, 6, 3, 7)
    return codes.reshape(tiles * TILE, k)[:n]


def fragment_order(x: torch.Tensor) -> torch.Tensor:
    """x (M, K), 2 <= M <= KERNEL_ROWS, as gluon_mma_gemv's rows mode reads it (launch's `laid`): (K / 64, F, 4, 32)
    int64 words, F = ceil(M / 8) fragments, word [c, f, j, 4 g + t] = x row 8 f + g, columns 64 c + 16 j + 4 t .. + 3
    (rows past M zero), so that one load of a warp reads 256 contiguous bytes instead of 8 bytes from each of 8
    rows."""
    m, k = x.shape
    fragments = -(-m // 8)
    rows = torch.zeros((8 * fragments, k), dtype=x.dtype, device=x.device)
    rows[:m] = x
    quads = rows.view(fragments, 8, k // CHUNK, 4, 4, 4)  # (f, g, c, j, t, element)
    return quads.permute(2, 0, 3, 1, 4, 5).contiguous().view(torch.int64).view(k // CHUNK, fragments, 4, 32)


def interleave_rows(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The stored row each row of a gated MLP's [gate | up] weight (N = 2 I rows, I a multiple of 8) is re-laid
    from, so that each 16-row MMA tile t holds gate rows 8t..8t+7 then up rows 8t..8t+7: a lane then holds a gate
    row's sum and its up row's (gluon_mma_gemv's INTERLEAVE)."""
    if n % TILE:
        raise ValueError(f"interleaved [gate | up] rows need N a multiple of {TILE}, got {n}")
    return torch.arange(n, device=device).view(2, n // TILE, 8).transpose(0, 1).reshape(n)


def standard_bytes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes packed as the stored format has them (packing.py): code 2j in the low nibble of byte j."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


MAGIC = {True: 128.0, False: 1024.0}  # bfloat16 / float16 whose last mantissa bit is worth 1: magic | c = magic + c


def _pair(value: float, bf16: bool) -> str:
    b = (bf16_bits if bf16 else f16_bits)(value)
    return f"0x{(b << 16) | b:08X}"


def _mma(bf16: bool) -> str:
    kind = "bf16" if bf16 else "f16"
    return f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32"


def nf4_table(bf16: bool) -> list[int]:
    """The NF4 levels' 16-bit patterns as nf4_ptx's eight lookup registers (four levels' low bytes each, then
    their high bytes), as signed 32-bit integers: the MMA GEMV passes them to its PTX as operands, so that they
    live in ordinary registers (as immediates inside the PTX, ptxas copied them out of uniform registers before
    every byte permute: 1.3 more instructions a weight)."""
    bits = [(bf16_bits if bf16 else f16_bits)(v) for v in nf4_levels()]
    planes = [sum(((bits[4 * r + i] >> shift) & 0xFF) << (8 * i) for i in range(4))
              for shift in (0, 8) for r in range(4)]
    return [p - (1 << 32) if p >= 1 << 31 else p for p in planes]


def _nf4_pairs(words: int = 4, table: int = 12) -> list[str]:
    """PTX that fills pr[4w + i] with the NF4 levels of word w's nibbles (2i, 2i + 1) as 16-bit pairs, w = 0..3
    ($words..$words+3): nf4_ptx's register lookup (byte permutes of the table's low and high bytes; the table
    registers t0..t7 are operands $table, $table+4, .., $table+28), in a scope of its own."""
    from modelpress.nn.nf4_ptx import _REGS, _four

    lines = ["{", _REGS.strip()] + [f"mov.b32 t{i}, ${table + 4 * i};" for i in range(8)]
    for w in range(4):
        word = f"${words + w}"
        lines += [f"and.b32 s, {word}, 0x77777777;", f"shl.b32 sh, {word}, 4;",
                  _four(word, "0xD9C8", f"pr{4 * w}", f"pr{4 * w + 1}").strip(), "shr.b32 s, s, 16;",
                  _four(word, "0xFBEA", f"pr{4 * w + 2}", f"pr{4 * w + 3}").strip()]
    return lines + ["}"]


def _outputs(fragments: int) -> int:
    """Output registers of one call (pack=4): four, or four for each activation fragment in rows mode."""
    return 4 * max(1, fragments)


def mma_asm(bf16: bool, nf4: bool = False, fragments: int = 0) -> str:
    """PTX of one call (pack=4).

    fragments=0 (one activation row, in every column of B): $0..$3 float32 (as b32) sums of lane (g, t) for slots
    0..3 = (row g, MMAs 0-1), (row g + 8, MMAs 0-1), (row g, MMAs 2-3), (row g + 8, MMAs 2-3) of (MAGIC + code) * x;
    inputs the lane's four words $4..$7, then its activations of MMA j, columns 16j + 4t .. 16j + 4t + 3, as one
    64-bit value ($8 + j). The caller subtracts (MAGIC + code zero) times xsum_asm's sums of x.

    fragments=F in (1, 2) (rows mode: activation row r in column r of B, up to 8 F rows): outputs $4f..$4f+3 of
    fragment f are the whole chunk's sums for slots 0..3 = (row g, x row 2t), (row g, x row 2t + 1),
    (row g + 8, x row 2t), (row g + 8, x row 2t + 1) (x rows 8f + ..); inputs the words $4F..$4F+3, then fragment
    f's activations $4F + 4 + 4f + j (lane (g, t) holds x row 8f + g's columns as above).

    nf4: the codes are NF4's (in NF4_NIBBLE_OF order) and each product is level * x, nothing to subtract; the
    operands go on with nf4_table's eight registers, each given four times (pack=4 repeats every operand)."""
    outputs = _outputs(fragments)
    words, xs = outputs, outputs + 4
    count = max(1, fragments)
    lines = ["{", f".reg .b32 pr<16>, sq, mg, x<{8 * count}>;", f".reg .f32 a<{4 * count}>, b<{4 * count}>, z, s;",
             "mov.f32 z, 0f00000000;", f"mov.b32 mg, {_pair(MAGIC[bf16], bf16)};"]
    lines += [f"mov.b64 {{x{8 * f + 2 * j}, x{8 * f + 2 * j + 1}}}, ${xs + 4 * f + j};"
              for f in range(count) for j in range(4)]
    if nf4:
        lines += _nf4_pairs(words, xs + 4 * count)
    for w in range(4 if not nf4 else 0):  # pr[4w + i]: word w's nibbles (i, i + 4) at bits 0-3 of each half
        for i in range(4):
            src = f"${words + w}"
            if i:
                lines.append(f"shr.b32 sq, ${words + w}, {4 * i};")
                src = "sq"
            lines.append(f"lop3.b32 pr{4 * w + i}, {src}, 0x000F000F, mg, 0xEA;")
    for f in range(count):
        for chain, acc in ((0, "a"), (1, "b")):
            row_g, row_g8 = 4 * (2 * chain), 4 * (2 * chain + 1)  # first pair register of the chain's two words
            if fragments:  # rows mode: one chain of four MMAs over the whole chunk (each slot's sum is wanted whole)
                acc = "a"
            d = "{" + ", ".join(f"{acc}{4 * f + i}" for i in range(4)) + "}"
            for step in range(2):
                j = 2 * chain + step
                p = 2 * step  # pairs 0, 1 feed the chain's first MMA, pairs 2, 3 its second
                a_regs = f"{{pr{row_g + p}, pr{row_g8 + p}, pr{row_g + p + 1}, pr{row_g8 + p + 1}}}"
                c = "{z, z, z, z}" if j == 0 or (step == 0 and not fragments) else d
                lines.append(f"{_mma(bf16)} {d}, {a_regs}, {{x{8 * f + 2 * j}, x{8 * f + 2 * j + 1}}}, {c};")
    if fragments == 0:
        lines += ["mov.b32 $0, a0;", "mov.b32 $1, a2;", "mov.b32 $2, b0;", "mov.b32 $3, b2;", "}"]
    else:
        lines += [f"mov.b32 ${4 * f + i}, a{4 * f + i};" for f in range(count) for i in range(4)] + ["}"]
    return "\n".join(lines)


def mma_constraints(nf4: bool, fragments: int = 0) -> str:
    return ",".join(["=r"] * _outputs(fragments) + ["r"] * 4 + ["l"] * 4 * max(1, fragments)
                    + ["r"] * (32 if nf4 else 0))


def xsum_constraints(fragments: int = 0) -> str:
    return ",".join(["=r"] * _outputs(fragments) + ["l"] * 4 * max(1, fragments))


def xsum_asm(bf16: bool, fragments: int = 0) -> str:
    """PTX of one call (pack=4) over a lane's activations as mma_asm takes them (after its outputs): an MMA of
    ones. fragments=0: $0 = $1 = the sum of x over the columns of MMAs 0-1 (the chunk's first 32), $2 = $3 over
    MMAs 2-3, in every lane. fragments=F: $4f..$4f+3 = the sums over the whole chunk of x rows 2t, 2t + 1, 2t,
    2t + 1 (of fragment f), as mma_asm's rows-mode slots pair them."""
    outputs = _outputs(fragments)
    count = max(1, fragments)
    lines = ["{", f".reg .b32 one, x<{8 * count}>;", f".reg .f32 a<{4 * count}>, b<{4 * count}>, z, s;",
             "mov.f32 z, 0f00000000;", f"mov.b32 one, {_pair(1.0, bf16)};"]
    lines += [f"mov.b64 {{x{8 * f + 2 * j}, x{8 * f + 2 * j + 1}}}, ${outputs + 4 * f + j};"
              for f in range(count) for j in range(4)]
    for f in range(count):
        for chain, acc in ((0, "a"), (1, "b")):
            acc = "a" if fragments else acc  # rows mode: one chain over the whole chunk
            d = "{" + ", ".join(f"{acc}{4 * f + i}" for i in range(4)) + "}"
            for step in range(2):
                j = 2 * chain + step
                c = "{z, z, z, z}" if j == 0 or (step == 0 and not fragments) else d
                lines.append(f"{_mma(bf16)} {d}, {{one, one, one, one}}, {{x{8 * f + 2 * j}, x{8 * f + 2 * j + 1}}}, "
                             f"{c};")
    if fragments == 0:
        lines += ["mov.b32 $0, a0;", "mov.b32 $1, a0;", "mov.b32 $2, b0;", "mov.b32 $3, b0;", "}"]
    else:
        lines += [f"mov.b32 ${4 * f + i}, a{4 * f + i % 2};" for f in range(count) for i in range(4)] + ["}"]
    return "\n".join(lines)
