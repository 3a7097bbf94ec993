"""The NF4 register lookups of nn/nf4_ptx.py, run instruction by instruction by a small PTX simulator (no GPU
or Triton needed): every code in every position decodes to the level's 16-bit rounding."""

from __future__ import annotations

import random
import re
import struct

import pytest

from modelpress.nn.nf4_ptx import bf16_bits, bytes_to_pairs, f16_bits, nf4_levels, word_to_f32


def _prmt(a: int, b: int, c: int) -> int:
    source = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = source[sel & 7]
        if sel & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1) << i for i in range(32))


def simulate(asm: str, inputs: dict[str, int]) -> dict[str, int | float]:
    """Registers after running `asm` (the subset of PTX the lookups use) on `inputs`."""
    regs: dict = dict(inputs)

    def value(token: str) -> int:
        token = token.strip()
        return int(token, 0) if token[0].isdigit() else regs[token]

    for statement in asm[asm.index("\n") + 1:asm.rindex("}")].split(";"):  # the body inside the outer braces
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, rest = statement.split(None, 1)
        unpack = re.match(r"\{(\w+), (\w+)\}, (\S+)", rest)
        if unpack:  # mov.b32 {h0, h1}, p
            regs[unpack[1]], regs[unpack[2]] = regs[unpack[3]] & 0xFFFF, regs[unpack[3]] >> 16
            continue
        out, *args = [a.strip() for a in rest.split(",")]
        if op == "mov.b32":
            regs[out] = value(args[0])
        elif op == "and.b32":
            regs[out] = value(args[0]) & value(args[1])
        elif op == "or.b32":
            regs[out] = value(args[0]) | value(args[1])
        elif op == "shl.b32":
            regs[out] = (value(args[0]) << value(args[1])) & 0xFFFFFFFF
        elif op == "shr.b32":
            regs[out] = value(args[0]) >> value(args[1])
        elif op == "prmt.b32":
            regs[out] = _prmt(*(value(a) for a in args))
        elif op == "lop3.b32":
            regs[out] = _lop3(*(value(a) for a in args))
        elif op == "cvt.f32.f16":
            regs[out] = struct.unpack("<e", struct.pack("<H", regs[args[0]]))[0]
        else:
            raise AssertionError(f"simulator lacks {op}")
    return regs


def _words() -> list[int]:
    rng = random.Random(0)
    every = [sum(((c + i) % 16) << 4 * i for i in range(8)) for c in range(16)]  # each code at each position
    return every + [rng.getrandbits(32) for _ in range(200)]


def test_lop3_convention():
    assert _lop3(0xF0, 0xCC, 0xAA, 0xD8) == 0xD8  # PTX: LUT index = a·4 + b·2 + c, with a=0xF0, b=0xCC, c=0xAA


def test_word_to_f32_gives_float16_levels():
    levels = nf4_levels()
    asm = word_to_f32(levels)
    for word in _words():
        regs = simulate(asm, {"$8": word})
        expected = [struct.unpack("<e", struct.pack("<H", f16_bits(levels[(word >> 4 * i) & 15])))[0]
                    for i in range(8)]
        assert [regs[f"${i}"] for i in range(8)] == expected, hex(word)


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
def test_bytes_to_pairs_gives_low_and_high_nibble_levels(bf16):
    levels = nf4_levels()
    asm = bytes_to_pairs(levels, bf16)
    to_bits = bf16_bits if bf16 else f16_bits
    for word in _words():
        regs = simulate(asm, {"$4": word})
        codes = [(word >> 8 * i) & 0xFF for i in range(4)]
        for out, nibble in ((0, 0), (2, 4)):  # $0, $1: low nibbles of bytes 0-3; $2, $3: high nibbles
            for pair in range(2):
                got = regs[f"${out + pair}"]
                first, second = codes[2 * pair], codes[2 * pair + 1]
                expected = to_bits(levels[(first >> nibble) & 15]) | to_bits(levels[(second >> nibble) & 15]) << 16
                assert got == expected, (hex(word), out + pair)


def test_bit_patterns_round_to_nearest():
    for value in nf4_levels():
        assert abs(struct.unpack("<e", struct.pack("<H", f16_bits(value)))[0] - value) <= abs(value) * 2 ** -11
        widened = struct.unpack("<f", struct.pack("<I", bf16_bits(value) << 16))[0]
        assert abs(widened - value) <= abs(value) * 2 ** -8
