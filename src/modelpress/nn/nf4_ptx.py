"""PTX that decodes NF4 codes by looking the 16 levels up in registers, for the Triton kernels.

A lookup from memory costs a load instruction per weight (3x the whole int4 decode); here each level's
16-bit pattern (float16, or bfloat16 for bfloat16 activations) lives in eight 32-bit constants: four
registers of low bytes and four of high bytes, four levels per register. For four codes at a time:
- PRMT (byte permute) picks byte (code & 7) of a register pair, once for levels 0-7 and once for 8-15,
  for the low-byte and the high-byte planes (4 PRMTs);
- a byte mask of code bit 3, made by PRMT's sign-replicate mode from the code word shifted by 4, lets one
  LOP3 per plane keep the right half;
- two PRMTs interleave the planes into two 16-bit pairs.
About 3 instructions per weight with no memory access. `word_to_f32` widens the float16 results for the
float32 GEMV; `bytes_to_pairs` feeds the tensor-core kernel's (low nibble, high nibble) halves directly.
"""

from __future__ import annotations

import struct


def f16_bits(value: float) -> int:
    return struct.unpack("<H", struct.pack("<e", value))[0]


def bf16_bits(value: float) -> int:
    """Round to nearest even bfloat16."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _table_movs(bits16: list[int]) -> str:
    planes = []
    for shift in (0, 8):  # low bytes, then high bytes: four levels per register
        planes += [sum(((bits16[4 * r + i] >> shift) & 0xFF) << (8 * i) for i in range(4)) for r in range(4)]
    return "".join(f"mov.b32 t{i}, 0x{v:08X};\n" for i, v in enumerate(planes))


def _four(word: str, mask_selector: str, first: str, second: str) -> str:
    """Codes in the 4 nibbles of s's low 16 bits (bit 3 cleared) -> 16-bit levels paired into `first`
    (codes 0, 1) and `second` (codes 2, 3). `word` holds the codes with bit 3 intact, `sh` is word << 4."""
    return (f"prmt.b32 m, sh, {word}, {mask_selector};\n"  # byte i = 0xFF where code i has bit 3 set
            "prmt.b32 la, t0, t1, s;\nprmt.b32 lb, t2, t3, s;\nlop3.b32 lo, la, lb, m, 0xD8;\n"
            "prmt.b32 la, t4, t5, s;\nprmt.b32 lb, t6, t7, s;\nlop3.b32 hi, la, lb, m, 0xD8;\n"
            f"prmt.b32 {first}, lo, hi, 0x5140;\nprmt.b32 {second}, lo, hi, 0x7362;\n")


_REGS = ".reg .b32 s, sh, m, la, lb, lo, hi, p, q, w, t0, t1, t2, t3, t4, t5, t6, t7;\n"


def word_to_f32(levels: list[float]) -> str:
    """One uint32 of eight codes ($8, code i at bits 4i..4i+3) -> eight float32 levels ($0..$7), each the
    float16 rounding of the level (2**-11 relative)."""
    widen = "".join(f"mov.b32 {{h{2 * j}, h{2 * j + 1}}}, {r};\n" for j, r in enumerate(("p", "q")))

    def cvt(out: int) -> str:
        return "".join(f"cvt.f32.f16 ${out + i}, h{i};\n" for i in range(4))

    return ("{\n" + _REGS + ".reg .b16 h0, h1, h2, h3;\n" + _table_movs([f16_bits(v) for v in levels])
            + "and.b32 s, $8, 0x77777777;\nshl.b32 sh, $8, 4;\n"
            + _four("$8", "0xD9C8", "p", "q") + widen + cvt(0)
            + "shr.b32 s, s, 16;\n" + _four("$8", "0xFBEA", "p", "q") + widen + cvt(4) + "}")


def bytes_to_pairs(levels: list[float], bf16: bool) -> str:
    """Four packed bytes ($4) -> the levels of their four low nibbles as two 16-bit pairs ($0: bytes 0, 1;
    $1: bytes 2, 3) and of their four high nibbles likewise ($2, $3), as float16 or bfloat16."""
    bits = [bf16_bits(v) if bf16 else f16_bits(v) for v in levels]
    return ("{\n" + _REGS + _table_movs(bits)
            # gather the codes into one word: low nibbles' codes at bits 0-15, high nibbles' at 16-31
            + "and.b32 la, $4, 0x0F0F0F0F;\nshr.b32 lb, $4, 4;\nand.b32 lb, lb, 0x0F0F0F0F;\n"
            + "shr.b32 lo, la, 4;\nor.b32 la, la, lo;\nshr.b32 hi, lb, 4;\nor.b32 lb, lb, hi;\n"
            + "prmt.b32 w, la, lb, 0x6420;\n"
            + "and.b32 s, w, 0x77777777;\nshl.b32 sh, w, 4;\n"
            + _four("w", "0xD9C8", "$0", "$1") + "shr.b32 s, s, 16;\n" + _four("w", "0xFBEA", "$2", "$3") + "}")


def nf4_levels() -> list[float]:
    from modelpress.formats.base import get_format

    return [float(v) for v in get_format("nf4").levels]
