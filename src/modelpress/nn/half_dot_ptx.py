"""PTX for the M = 1 GEMV's inner product in half-precision pairs: eight 4-bit codes times eight activations in
about two instructions per weight, where decoding to float32 and one FFMA per weight took about three.

Per uint32 word of eight codes (code i at bits 4i..4i+3):
- int4: a LOP3 ORs two nibbles into the mantissas of a pair of float16 1024s, (0x6400 | c) = 1024 + c, so
  (lo, hi) halves hold codes (i, i + 4): masks 0x000F000F and 0x00F000F0 give codes (0, 4) and (1, 5) (the
  second scaled by 16), the word shifted by 8 gives (2, 6) and (3, 7). One HADD2 (or HFMA2 by 1/16) per pair
  removes 1024 and the code zero, exactly. The activations are paired the same way: (x0, x4), (x1, x5), ...
- nf4: nf4_ptx's byte-permute lookup gives float16 level pairs (0, 1), (2, 3), (4, 5), (6, 7): activations in
  their natural pairs.
Four HFMA2 then accumulate the word's eight products in a float16 pair, which is widened to float32 and summed
once per word: float32 sums everything else (groups, rows, splits).

Range: the activations are scaled by 2**-8 on the way to float16 (the kernel multiplies its sums back by 2**8),
so a word's float16 partial sum |sum (c - z) x| <= 4 * 8 * |x| * 2**-8 stays finite up to |x| ~ 5e5, past any
bfloat16 activation a model produces in practice; the scaling is exact (a power of two) and costs nothing but
values below 2**-6 (float16's subnormals after scaling), whose absolute error stays under 2**-16. Each
product carries float16's rounding (2**-11 relative), below the bfloat16 output's 2**-9.
"""

from __future__ import annotations

from modelpress.nn.nf4_ptx import _REGS, _four, f16_bits, table_planes

X_SCALE = 2.0 ** -8  # activations enter the float16 products scaled by this; sums are multiplied back
_X_SCALE_F32 = "0f3B800000"  # 2**-8 as a PTX float32 immediate
_X_SCALE_F16X2 = "0x1C001C00"  # 2**-8 in both float16 halves


def _f16x2(value: float) -> str:
    bits = f16_bits(value)
    return f"0x{(bits << 16) | bits:08X}"


def x_pairs(interleaved: bool, bf16: bool, with_sum: bool) -> str:
    """Four 32-bit registers $k..$k+3 holding one word's eight activations in memory order ((x0, x1), (x2, x3),
    (x4, x5), (x6, x7); bfloat16 or float16) -> four float16 pairs $0..$3, scaled by 2**-8: (x0, x4), (x1, x5),
    (x2, x6), (x3, x7) if interleaved (the int4 decode's order), else (x0, x1), (x2, x3), ... With with_sum, also
    the float32 sum of the eight scaled activations in $4 ($5..$7 set to 0, unused)."""
    outputs = 8 if with_sum else 4
    src = [f"${outputs + i}" for i in range(4)]
    lines = ["{", ".reg .b32 a<8>;", ".reg .f32 f<8>;", ".reg .b16 h<2>;"]
    for i, r in enumerate(src):  # f[2i] = x[2i], f[2i+1] = x[2i+1] as float32, scaled
        if bf16:
            lines += [f"shl.b32 a{2 * i}, {r}, 16;", f"and.b32 a{2 * i + 1}, {r}, 0xFFFF0000;",
                      f"mul.f32 f{2 * i}, a{2 * i}, {_X_SCALE_F32};",
                      f"mul.f32 f{2 * i + 1}, a{2 * i + 1}, {_X_SCALE_F32};"]
        else:
            lines += [f"mov.b32 {{h0, h1}}, {r};", f"cvt.f32.f16 f{2 * i}, h0;", f"cvt.f32.f16 f{2 * i + 1}, h1;",
                      f"mul.f32 f{2 * i}, f{2 * i}, {_X_SCALE_F32};",
                      f"mul.f32 f{2 * i + 1}, f{2 * i + 1}, {_X_SCALE_F32};"]
    order = [(0, 4), (1, 5), (2, 6), (3, 7)] if interleaved else [(0, 1), (2, 3), (4, 5), (6, 7)]
    for j, (lo, hi) in enumerate(order):  # cvt.f16x2.f32 d, a, b puts a in the upper half
        lines.append(f"cvt.rn.f16x2.f32 ${j}, f{hi}, f{lo};")
    if with_sum:
        lines += ["add.f32 f0, f0, f1;", "add.f32 f2, f2, f3;", "add.f32 f4, f4, f5;", "add.f32 f6, f6, f7;",
                  "add.f32 f0, f0, f2;", "add.f32 f4, f4, f6;", "add.f32 $4, f0, f4;",
                  "mov.b32 $5, 0;", "mov.b32 $6, 0;", "mov.b32 $7, 0;"]
    lines.append("}")
    return "\n".join(lines)


WORDS = 4  # weight words per dot: a thread's 16-byte load, 32 codes of one group


TABLE_REGS = 1  # a dot's last input: the address of nf4's lookup table (nf4_table_words), unused by int4


def _operands(words: int) -> tuple[list[str], list[list[str]], list[str]]:
    """Operand names of a dot over `words` words with pack=words: outputs $0..$(words-1); then the words; then,
    for each of the four pair slots, that slot's pair of every word; then the TABLE_REGS table registers (each
    input comes `words` times: the first copy is read)."""
    first = words
    word_regs = [f"${first + i}" for i in range(words)]
    pairs = [[f"${first + words * (1 + slot) + i}" for slot in range(4)] for i in range(words)]
    table = [f"${first + words * (5 + t)}" for t in range(TABLE_REGS)]
    return word_regs, pairs, table


def constraints(words: int = WORDS) -> str:
    """The inline-asm constraint string of int4_dot / nf4_dot."""
    return ",".join(["=r"] * words + ["r"] * (words * 5) + ["l"] * words)


def nf4_table_words(levels: list[float]) -> list[int]:
    """nf4_dot's table in memory: the levels' float16 bit patterns in nf4_ptx's eight byte-plane registers, once
    per lane of a warp (32 x 8 words, lane i reads copy i)."""
    return table_planes([f16_bits(v) for v in levels]) * 32


def _finish(words: int) -> list[str]:
    """Add the words' pair sums (a tree of HADD2), widen to float32 in $0; the other outputs are 0."""
    sums = [f"acc{w}" for w in range(words)]
    lines = []
    while len(sums) > 1:
        lines += [f"add.f16x2 {a}, {a}, {b};" for a, b in zip(sums[::2], sums[1::2])]
        sums = sums[::2]
    return (lines + [f"mov.b32 {{h0, h1}}, {sums[0]};", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;",
                     "add.f32 $0, f0, f1;"] + [f"mov.b32 ${i}, 0;" for i in range(1, words)])


def int4_dot(zero: int, words: int = WORDS) -> str:
    """$0 (float32) = sum over the 8 * words codes of the words of (code - zero) * x, x in the interleaved float16
    pairs of x_pairs(interleaved=True); operands as _operands. Products and their sum are float16 pairs:
    |sum| <= 4 * words * 8 * max|x| * X_SCALE."""
    word_regs, pairs, _ = _operands(words)
    lines = ["{", ".reg .b32 q, lo, hi, k0, k1, k16;", f".reg .b32 acc<{words}>;", ".reg .b16 h0, h1;", ".reg .f32 f0, f1;",
             f"mov.b32 k0, {_f16x2(1024.0 + zero)};", f"mov.b32 k1, {_f16x2(-(64.0 + zero))};",
             f"mov.b32 k16, {_f16x2(1.0 / 16)};"]
    for w, word in enumerate(word_regs):
        for half, src in enumerate((word, "q")):
            if half:
                lines.append(f"shr.b32 q, {word}, 8;")
            first, second = pairs[w][2 * half], pairs[w][2 * half + 1]
            lines += [f"lop3.b32 lo, {src}, 0x000F000F, 0x64006400, 0xEA;",  # (w & mask) | 1024s: 1024 + code
                      f"lop3.b32 hi, {src}, 0x00F000F0, 0x64006400, 0xEA;",  # 1024 + 16 code
                      "sub.f16x2 lo, lo, k0;", "fma.rn.f16x2 hi, hi, k16, k1;"]  # code - zero, exactly
            acc = f"acc{w}"
            lines.append(f"mul.f16x2 {acc}, lo, {first};" if half == 0 else f"fma.rn.f16x2 {acc}, lo, {first}, {acc};")
            lines.append(f"fma.rn.f16x2 {acc}, hi, {second}, {acc};")
    return "\n".join(lines + _finish(words) + ["}"])


def nf4_dot(words: int = WORDS) -> str:
    """$0 (float32) = sum over the 8 * words codes of the words of level[code] * x, x in natural float16 pairs
    (x_pairs(interleaved=False)); the levels, as float16 (2**-11 relative), come in the table operands
    (nf4_table_words) and are looked up as in nf4_ptx."""
    word_regs, pairs, table = _operands(words)
    lines = ["{", _REGS + f".reg .b32 acc<{words}>;\n.reg .b16 h0, h1;\n.reg .f32 f0, f1;",
             # the table from memory (an L1 hit), each lane from its own copy: values ptxas sees as per-thread,
             # so it keeps them in ordinary registers (uniform ones must be copied back before every permute)
             ".reg .u32 lane;\n.reg .u64 at;", "mov.u32 lane, %laneid;", f"mad.wide.u32 at, lane, 32, {table[0]};",
             "ld.global.nc.v4.b32 {t0, t1, t2, t3}, [at];", "ld.global.nc.v4.b32 {t4, t5, t6, t7}, [at+16];"]
    for w, word in enumerate(word_regs):
        lines += [f"and.b32 s, {word}, 0x77777777;", f"shl.b32 sh, {word}, 4;",
                  _four(word, "0xD9C8", "p", "q"),  # levels of codes (0, 1) in p, (2, 3) in q
                  f"mul.f16x2 acc{w}, p, {pairs[w][0]};", f"fma.rn.f16x2 acc{w}, q, {pairs[w][1]}, acc{w};",
                  "shr.b32 s, s, 16;", _four(word, "0xFBEA", "p", "q"),  # codes (4, 5), (6, 7)
                  f"fma.rn.f16x2 acc{w}, p, {pairs[w][2]}, acc{w};", f"fma.rn.f16x2 acc{w}, q, {pairs[w][3]}, acc{w};"]
    return "\n".join(lines + _finish(words) + ["}"])
