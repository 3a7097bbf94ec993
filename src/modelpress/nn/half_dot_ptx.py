"""PTX for the M = 1 GEMV's int4 inner product in float16 pairs: about 1.8 instructions per weight, where
decoding each code to float32 and one FFMA per weight took about three.

Weights. Per uint32 word of eight codes (code i at bits 4i..4i+3), a LOP3 ORs two nibbles into the mantissas
of a pair of float16 1024s, (0x6400 | c) = 1024 + c: masks 0x000F000F and 0x00F000F0 give codes (0, 4) and
(1, 5) (the second times 16), the word shifted by 8 gives (2, 6) and (3, 7). One HADD2 (or HFMA2 by 1/16) per
pair removes 1024 and the code zero, exactly. Four HFMA2 multiply the pairs by the activations paired the same
way, (x0, x4), (x1, x5), ..., into the word's float16 pair sum; a thread's four words (its 16-byte load, one
group) are added by a tree of HADD2 and widened to float32 once.

Activations. A thread's 32 activations (its four words' worth, bfloat16 or float16) are scaled by one power of
two chosen from their largest magnitude, so that it lands in [2**7, 2**8): the 16 products of a float16 lane
then sum to at most 16 * 15 * 2**8 < 65504 whatever the input's range (float16's own range is 2**-24..65504,
bfloat16's reaches 3e38), and values down to 2**-22 of the largest stay normal. The scaling is exact; the
kernel multiplies each sum back by the inverse power of two. Each product carries float16's rounding
(2**-11 relative), below the bfloat16 output's 2**-9.
"""

from __future__ import annotations

from modelpress.nn.nf4_ptx import f16_bits

WORDS = 4  # weight words per dot, and activation words per x_pairs call: a thread's 16-byte load


def _f16x2(value: float) -> str:
    bits = f16_bits(value)
    return f"0x{(bits << 16) | bits:08X}"


def x_pairs(bf16: bool, with_sum: bool, words: int = WORDS) -> str:
    """A thread's activations for `words` weight words, 4 * words 32-bit registers in memory order (word w's
    (x0, x1), (x2, x3), (x4, x5), (x6, x7); bfloat16 or float16 pairs), pack=4*words ->
    - outputs $0..: the float16 pairs (x0, x4), (x1, x5), (x2, x6), (x3, x7) of each word, scaled by 2**-s;
    - then 4 * words float32: for word w, slot 4w is the sum of its eight scaled activations (with_sum; else 0),
      slot 4w + 1 is 2**s, the factor that undoes the scaling; the others are 0."""
    n = 4 * words
    outs = [f"${i}" for i in range(n)]
    aux = [f"${n + i}" for i in range(n)]
    src = [f"${2 * n + i}" for i in range(n)]
    kind = "bf16x2" if bf16 else "f16x2"
    lines = ["{", f".reg .b32 m<{n}>;", ".reg .b32 e, sc, us, t, lo, hi;", ".reg .f32 fs, f<8>, flo, fhi;",
             ".reg .b16 h<2>;"]
    # largest magnitude: a tree of max.xorsign.abs (|max|, sign xored), then the larger half, as float32 bits
    level = list(src)
    while len(level) > 1:
        nxt = [f"m{i}" for i in range(len(level) // 2)]
        lines += [f"max.xorsign.abs.{kind} {d}, {a}, {b};" for d, a, b in zip(nxt, level[::2], level[1::2])]
        level = nxt
    lines.append(f"and.b32 t, {level[0]}, 0x7FFF7FFF;")
    if bf16:
        lines += ["shl.b32 lo, t, 16;", "and.b32 hi, t, 0xFFFF0000;", "max.u32 e, lo, hi;"]
    else:
        lines += ["mov.b32 {h0, h1}, t;", "cvt.f32.f16 flo, h0;", "cvt.f32.f16 fhi, h1;", "max.f32 flo, flo, fhi;",
                  "mov.b32 e, flo;"]
    # biased float32 exponent E of the largest (at least 8): scale 2**(134 - E) maps it into [2**7, 2**8)
    lines += ["shr.u32 e, e, 23;", "max.u32 e, e, 8;", "mov.u32 t, 261;", "sub.u32 sc, t, e;", "shl.b32 sc, sc, 23;",
              "sub.u32 us, e, 7;", "shl.b32 us, us, 23;", "mov.b32 fs, sc;"]
    for w in range(words):
        for i in range(4):  # f[2i], f[2i+1]: the word's activations 2i, 2i+1 as float32, scaled
            r = src[4 * w + i]
            if bf16:
                lines += [f"shl.b32 lo, {r}, 16;", f"and.b32 hi, {r}, 0xFFFF0000;",
                          f"mov.b32 f{2 * i}, lo;", f"mov.b32 f{2 * i + 1}, hi;"]
            else:
                lines += [f"mov.b32 {{h0, h1}}, {r};", f"cvt.f32.f16 f{2 * i}, h0;", f"cvt.f32.f16 f{2 * i + 1}, h1;"]
            lines += [f"mul.f32 f{2 * i}, f{2 * i}, fs;", f"mul.f32 f{2 * i + 1}, f{2 * i + 1}, fs;"]
        for lo_i, hi_i in ((0, 4), (1, 5), (2, 6), (3, 7)):  # cvt.f16x2.f32 d, a, b puts a in the upper half
            lines.append(f"cvt.rn.f16x2.f32 {outs[4 * w + lo_i]}, f{hi_i}, f{lo_i};")
        if with_sum:
            lines += ["add.f32 f0, f0, f1;", "add.f32 f2, f2, f3;", "add.f32 f4, f4, f5;", "add.f32 f6, f6, f7;",
                      "add.f32 f0, f0, f2;", "add.f32 f4, f4, f6;", f"add.f32 {aux[4 * w]}, f0, f4;"]
        else:
            lines.append(f"mov.b32 {aux[4 * w]}, 0;")
        lines += [f"mov.b32 {aux[4 * w + 1]}, us;", f"mov.b32 {aux[4 * w + 2]}, 0;", f"mov.b32 {aux[4 * w + 3]}, 0;"]
    lines.append("}")
    return "\n".join(lines)


def x_pairs_constraints(words: int = WORDS) -> str:
    n = 4 * words
    return ",".join(["=r"] * (2 * n) + ["r"] * n)


def int4_dot(zero: int, words: int = WORDS) -> str:
    """$0 (float32) = sum over the 8 * words codes of the words of (code - zero) * x, with pack=words: outputs
    $0..$(words-1) ($0 the sum, the others 0), then the words, then for each of the four pair slots that slot's
    pair (x_pairs) of every word. One float16 chain per word, so a thread has `words` independent chains in
    flight (a single chain left the 11008x4096 plan, few warps per SM, waiting on its latency)."""
    first = words
    word_regs = [f"${first + i}" for i in range(words)]
    pairs = [[f"${first + words * (1 + slot) + i}" for slot in range(4)] for i in range(words)]
    lines = ["{", ".reg .b32 q, lo, hi, k0, k1, k16;", f".reg .b32 acc<{words}>;", ".reg .b16 h0, h1;",
             ".reg .f32 f0, f1;", f"mov.b32 k0, {_f16x2(1024.0 + zero)};", f"mov.b32 k1, {_f16x2(-(64.0 + zero))};",
             f"mov.b32 k16, {_f16x2(1.0 / 16)};"]
    for w, word in enumerate(word_regs):
        acc = f"acc{w}"
        for half, src in enumerate((word, "q")):
            if half:
                lines.append(f"shr.b32 q, {word}, 8;")
            first_pair, second_pair = pairs[w][2 * half], pairs[w][2 * half + 1]
            lines += [f"lop3.b32 lo, {src}, 0x000F000F, 0x64006400, 0xEA;",  # (w & mask) | 1024s: 1024 + code
                      f"lop3.b32 hi, {src}, 0x00F000F0, 0x64006400, 0xEA;",  # 1024 + 16 code
                      "sub.f16x2 lo, lo, k0;", "fma.rn.f16x2 hi, hi, k16, k1;",  # code - zero, exactly
                      f"mul.f16x2 {acc}, lo, {first_pair};" if half == 0 else
                      f"fma.rn.f16x2 {acc}, lo, {first_pair}, {acc};",
                      f"fma.rn.f16x2 {acc}, hi, {second_pair}, {acc};"]
    sums = [f"acc{w}" for w in range(words)]
    while len(sums) > 1:
        lines += [f"add.f16x2 {a}, {a}, {b};" for a, b in zip(sums[::2], sums[1::2])]
        sums = sums[::2]
    lines += [f"mov.b32 {{h0, h1}}, {sums[0]};", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", "add.f32 $0, f0, f1;"]
    lines += [f"mov.b32 ${i}, 0;" for i in range(1, words)] + ["}"]
    return "\n".join(lines)


def dot_constraints(words: int = WORDS) -> str:
    return ",".join(["=r"] * words + ["r"] * (5 * words))
