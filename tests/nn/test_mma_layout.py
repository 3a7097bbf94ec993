"""The MMA GEMV's weight layout and PTX, checked on the CPU (mma_ptx.py, for gluon_mma_gemv.py; the kernel runs in
test_mma_gemv.py on a GPU).

The PTX is run here by a small interpreter of the instructions it uses, with mma.sync's fragment layout taken
from the PTX ISA (m16n8k16, .row.col): the test fails if a register lands in the wrong fragment slot, a nibble
in the wrong pair, or the magic-number decode is off by anything."""

from __future__ import annotations

import struct

import pytest
import torch


from modelpress.nn import mma_ptx as mg


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _half(bits16: int, bf16: bool) -> float:
    if bf16:
        return _f32(bits16 << 16)
    return struct.unpack("<e", struct.pack("<H", bits16))[0]


def _to_half(value: float, bf16: bool) -> int:
    if bf16:
        from modelpress.nn.nf4_ptx import bf16_bits

        return bf16_bits(value)
    return struct.unpack("<H", struct.pack("<e", value))[0]


def _pair(bits: int, bf16: bool) -> tuple[float, float]:
    return _half(bits & 0xFFFF, bf16), _half(bits >> 16, bf16)


def _imm(token: str) -> int:
    return int(token, 16) if token.startswith("0x") else int(token)


def run_warp(asm: str, inputs: list[list[int]], outputs: int) -> list[list[int]]:
    """Run the PTX on 32 lanes: inputs[lane] are the (32- or 64-bit) values of $outputs.., returns each lane's
    outputs."""
    bf16 = ".bf16." in asm
    lanes = [dict() for _ in range(32)]
    for lane, values in enumerate(inputs):
        for i, v in enumerate(values):
            lanes[lane][f"${outputs + i}"] = v & 0xFFFFFFFFFFFFFFFF

    def val(regs, token):
        token = token.strip()
        if token in regs:
            return regs[token]
        if token.startswith("0f"):
            return int(token[2:], 16)
        return _imm(token)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op.startswith("mma."):
            d, a, b, c = [part.strip(" {}").split(",") for part in rest.split("}, {")]
            d, a, b, c = [[r.strip() for r in regs] for regs in (d, a, b, c)]
            A = [[0.0] * 16 for _ in range(16)]
            B = [[0.0] * 8 for _ in range(16)]
            C = [[0.0] * 8 for _ in range(16)]
            for lane, regs in enumerate(lanes):
                g, t = lane // 4, lane % 4
                for r, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                    A[row][col], A[row][col + 1] = _pair(val(regs, a[r]), bf16)
                for r, k in enumerate((2 * t, 2 * t + 8)):
                    B[k][g], B[k + 1][g] = _pair(val(regs, b[r]), bf16)
                for r, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                    C[row][col] = _f32(val(regs, c[r]))
            D = [[C[i][j] + sum(A[i][k] * B[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
            for lane, regs in enumerate(lanes):
                g, t = lane // 4, lane % 4
                for r, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                    regs[d[r]] = struct.unpack("<I", struct.pack("<f", D[row][col]))[0]
            continue
        if op == "mov.b64":  # {lo, hi}, $i: a 64-bit input split into two 32-bit registers
            pair, src = rest.rsplit(",", 1)
            lo, hi = (r.strip() for r in pair.strip(" {}").split(","))
            for regs in lanes:
                value = val(regs, src)
                regs[lo], regs[hi] = value & 0xFFFFFFFF, value >> 32
            continue
        args = [x.strip() for x in rest.split(",")]
        for regs in lanes:
            if op in ("mov.b32", "mov.f32"):
                regs[args[0]] = val(regs, args[1])
            elif op == "add.f32":
                total = _f32(val(regs, args[1])) + _f32(val(regs, args[2]))
                regs[args[0]] = struct.unpack("<I", struct.pack("<f", total))[0]
            elif op == "shr.b32":
                regs[args[0]] = val(regs, args[1]) >> val(regs, args[2])
            elif op == "lop3.b32":  # each result bit is bit (4a + 2b + c) of the truth table
                a, b, c, table = (val(regs, r) for r in args[1:5])
                regs[args[0]] = sum(((table >> (4 * ((a >> i) & 1) + 2 * ((b >> i) & 1) + ((c >> i) & 1))) & 1) << i
                                    for i in range(32))
            elif op == "prmt.b32":  # byte i of the result: byte (selector nibble i & 7) of {b, a}, or its sign
                data = val(regs, args[1]) | (val(regs, args[2]) << 32)
                selector = val(regs, args[3])
                out = 0
                for i in range(4):
                    nib = (selector >> (4 * i)) & 15
                    byte = (data >> (8 * (nib & 7))) & 0xFF
                    if nib & 8:
                        byte = 0xFF if byte & 0x80 else 0
                    out |= byte << (8 * i)
                regs[args[0]] = out
            elif op == "and.b32":
                regs[args[0]] = val(regs, args[1]) & val(regs, args[2])
            elif op == "shl.b32":
                regs[args[0]] = (val(regs, args[1]) << val(regs, args[2])) & 0xFFFFFFFF
            elif op.startswith("fma.rn.") and op.endswith("x2"):
                xs, ys, zs = (_pair(val(regs, r), bf16) for r in args[1:4])
                out = [_to_half(p * q + s, bf16) for p, q, s in zip(xs, ys, zs)]  # exact here: small integers
                regs[args[0]] = out[0] | (out[1] << 16)
            else:
                raise AssertionError(f"the interpreter does not know {op}")
    return [[lanes[lane][f"${i}"] for i in range(outputs)] for lane in range(32)]


def test_layout_round_trips_codes():
    torch.manual_seed(0)
    n, k = 40, 192  # a partial last tile, three chunks
    qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    words = mg.mma_layout(qdata, n, k)
    assert words.shape == (3, 3, 32, 4) and words.dtype == torch.int32
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(n, k)
    assert torch.equal(mg.mma_codes(words, n, k), codes)
    assert torch.equal(mg.mma_codes(words, 48, k)[n:], torch.zeros(8, k, dtype=torch.uint8))  # padded rows
    assert torch.equal(mg.standard_bytes(mg.mma_codes(words, n, k)), qdata)


def test_layout_refuses_k_off_the_chunk():
    with pytest.raises(ValueError, match="divisible by 64"):
        mg.mma_layout(torch.zeros(16, 40, dtype=torch.uint8), 16, 80)


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("zero", [8, 0])
def test_ptx_computes_each_lanes_partial_sums(bf16, zero):
    """One 16-row tile, one 64-column chunk: every lane's four slots, less (MAGIC + zero) times the sums of x,
    equal the exact sums of its rows over its half chunks, with x read at the kernel's offsets."""
    torch.manual_seed(1)
    n, k = 16, 64
    qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(n, k).to(torch.float64) - zero
    dtype = torch.bfloat16 if bf16 else torch.float16
    x = torch.randn(k).to(dtype)
    x_quads = x.view(torch.int64).tolist()  # the 64-bit values the kernel loads: 4 columns each
    words = mg.mma_layout(qdata, n, k)[0, 0].tolist()  # (32 lanes, 4 words)
    xs = [[x_quads[4 * j + lane % 4] for j in range(4)] for lane in range(32)]  # the kernel's x offsets
    raw = run_warp(mg.mma_asm(bf16), [words[lane] + xs[lane] for lane in range(32)], 4)
    sums = run_warp(mg.xsum_asm(bf16), xs, 4)
    xf = x.to(torch.float64)
    magic = mg.MAGIC[bf16]
    for lane in range(32):
        g = lane // 4
        for slot in range(4):
            row = g + 8 * (slot % 2)
            cols = slice(32 * (slot // 2), 32 * (slot // 2) + 32)
            assert _f32(sums[lane][slot]) == pytest.approx(float(xf[cols].sum()), rel=1e-6, abs=1e-6)
            got = _f32(raw[lane][slot]) - (magic + zero) * _f32(sums[lane][slot])
            expected = float(codes[row, cols] @ xf[cols])
            # the only rounding: the float32 sums (D and the sum of x), each within 2**-24 of (magic + 15) sum |x|
            bound = 2 * 2.0 ** -24 * (magic + 15) * float(xf[cols].abs().sum())
            assert abs(got - expected) <= bound, (lane, slot, got, expected)


@pytest.mark.parametrize("spec, n, k, interleave", [("int4/g128", 40, 256, False), ("int4-asym/g64", 16, 192, False),
                                                    ("nf4/g64", 32, 128, False), ("int4/g128", 48, 256, True),
                                                    ("nf4/g64", 32, 128, True)])
def test_dequantize_from_the_layout_equals_the_packed_weight(spec, n, k, interleave):
    """mma_dequantize_kernel (under Triton's interpreter here, on the GPU in CUDA runs) gives the stored
    weight's own dequantization, exactly, also from rows re-laid interleaved (a gated MLP's [gate | up])."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    script = f"""
import torch
from modelpress.formats import WeightScheme, quantize_weight
from modelpress.nn import triton_backend
from modelpress.nn.mma_ptx import interleave_rows, mma_layout
packed = quantize_weight(torch.randn({n}, {k}), WeightScheme.parse("{spec}"))
rows = interleave_rows({n}) if {interleave} else slice(None)
words = mma_layout(packed.qdata[rows], {n}, {k}, triton_backend.mma_order(packed))
got = triton_backend.mma_dequantize(words, packed, torch.float32, {interleave})
assert torch.equal(got, packed.dequantize(torch.float32)), (got - packed.dequantize(torch.float32)).abs().max()
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("bf16", [True, False])
def test_nf4_ptx_computes_each_lanes_partial_sums(bf16):
    """As above for NF4 codes (NF4_NIBBLE_OF order): each product is the level, rounded to the activations'
    16-bit type, times x; nothing to subtract."""
    from modelpress.nn.nf4_ptx import nf4_levels

    torch.manual_seed(2)
    n, k = 16, 64
    qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    dtype = torch.bfloat16 if bf16 else torch.float16
    levels = torch.tensor(nf4_levels()).to(dtype).to(torch.float64)
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(n, k).long()
    x = torch.randn(k).to(dtype)
    x_quads = x.view(torch.int64).tolist()
    words = mg.mma_layout(qdata, n, k, mg.NF4_NIBBLE_OF)[0, 0].tolist()
    xs = [[x_quads[4 * j + lane % 4] for j in range(4)] for lane in range(32)]
    table = [t & 0xFFFFFFFF for t in mg.nf4_table(bf16) for _ in range(4)]  # four times each, as pack=4 passes them
    raw = run_warp(mg.mma_asm(bf16, nf4=True), [words[lane] + xs[lane] + table for lane in range(32)], 4)
    xf = x.to(torch.float64)
    for lane in range(32):
        for slot in range(4):
            row = lane // 4 + 8 * (slot % 2)
            cols = slice(32 * (slot // 2), 32 * (slot // 2) + 32)
            expected = float(levels[codes[row, cols]] @ xf[cols])
            assert _f32(raw[lane][slot]) == pytest.approx(expected, rel=1e-6, abs=1e-6), (lane, slot)


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "nf4"])
@pytest.mark.parametrize("fragments", [1, 2])
def test_rows_mode_ptx_computes_every_rows_sums(bf16, fmt, fragments):
    """Rows mode (several activation rows, row r in column r of the MMA's B): each lane's slots of each fragment,
    less (MAGIC + zero) times the rows-mode sums of x (int4), are the exact sums over the whole chunk of its weight
    rows g, g + 8 against x rows 2t, 2t + 1 (plus 8 per fragment), x read at the kernel's offsets."""
    from modelpress.nn.nf4_ptx import nf4_levels

    torch.manual_seed(3)
    n, k, m = 16, 64, 8 * fragments
    nf4 = fmt == "nf4"
    zero = 0 if fmt == "int4-asym" else 8
    qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    dtype = torch.bfloat16 if bf16 else torch.float16
    codes = torch.stack((qdata & 15, qdata >> 4), dim=-1).reshape(n, k)
    weight = (torch.tensor(nf4_levels()).to(dtype).to(torch.float64)[codes.long()] if nf4
              else codes.to(torch.float64) - zero)
    x = torch.randn(m, k).to(dtype)
    quads = x.view(torch.int64).tolist()  # (m, k / 4): the 64-bit values the kernel loads
    words = mg.mma_layout(qdata, n, k, mg.NF4_NIBBLE_OF if nf4 else mg.NIBBLE_OF)[0, 0].tolist()
    xs = [[quads[8 * f + lane // 4][4 * j + lane % 4] for f in range(fragments) for j in range(4)]
          for lane in range(32)]
    table = [t & 0xFFFFFFFF for t in mg.nf4_table(bf16) for _ in range(4)] if nf4 else []
    raw = run_warp(mg.mma_asm(bf16, nf4, fragments), [words[lane] + xs[lane] + table for lane in range(32)],
                   4 * fragments)
    sums = run_warp(mg.xsum_asm(bf16, fragments), xs, 4 * fragments)
    assert mg.mma_constraints(nf4, fragments).count("=r") == mg.xsum_constraints(fragments).count("=r") == 4 * fragments
    xf = x.to(torch.float64)
    magic = mg.MAGIC[bf16]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for f in range(fragments):
            for slot in range(4):
                row, xrow = g + 8 * (slot // 2), 8 * f + 2 * t + slot % 2
                got = _f32(raw[lane][4 * f + slot])
                assert _f32(sums[lane][4 * f + slot]) == pytest.approx(float(xf[xrow].sum()), rel=1e-6, abs=1e-6)
                if not nf4:
                    got -= (magic + zero) * _f32(sums[lane][4 * f + slot])
                expected = float(weight[row] @ xf[xrow])
                bound = 4 * 2.0 ** -24 * (magic + 15) * float(xf[xrow].abs().sum())
                assert abs(got - expected) <= bound, (lane, f, slot, got, expected)


def test_the_plan_splits_k_only_where_row_tiles_are_short_and_k_is_long(monkeypatch):
    """triton_backend.mma_plan: whole K where the row tiles give every multiprocessor MMA_MIN_TILES_PER_SM of them;
    fewer tiles: no plan (the CUDA-core GEMV) unless MMA_SPLIT_K, then K split towards that many programs, never
    below MMA_SPLIT_MIN_STEPS loop steps a split."""
    from modelpress.nn import triton_backend as tb

    assert tb.mma_plan(12288, 4096, False, 132) == dict(tb.MMA_CONFIG, split=1)  # 768 tiles >= 3 x 132
    assert tb.mma_plan(22016, 4096, True, 132) == dict(tb.MMA_NF4_CONFIG, split=1)
    monkeypatch.setattr(tb, "MMA_SPLIT_K", False)
    assert tb.mma_plan(4096, 4096, False, 132) is None  # 256 tiles
    monkeypatch.setattr(tb, "MMA_SPLIT_K", True)
    assert tb.mma_plan(4096, 4096, False, 132)["split"] == 2  # 512 programs >= 396
    assert tb.mma_plan(1024, 4096, False, 132)["split"] == 4  # 7 wanted; 64 chunks / (8 a step x 2 steps) = 4
    assert tb.mma_plan(4096, 512, False, 132) is None  # 8 chunks: not two steps of 8 for two splits
    step = tb.MMA_CONFIG["chunks_per_step"] * tb.MMA_CONFIG["warps_k"]
    for n, k in [(256, 4096), (1024, 11008), (4096, 14336), (2048, 1536)]:
        plan = tb.mma_plan(n, k, False, 132)
        if plan is not None:
            assert plan["split"] >= 2 and k // 64 // plan["split"] >= step * tb.MMA_SPLIT_MIN_STEPS


@pytest.mark.parametrize("m", [2, 8, 9, 16])
def test_fragment_order_puts_each_lanes_activations_where_the_rows_mode_reads_them(m):
    """fragment_order(x): word [c, f, j, lane] holds the 8 bytes lane (g, t) of fragment f loads for MMA j of chunk
    c (x row 8 f + g, columns 64 c + 16 j + 4 t .. + 3), zero for rows past M."""
    k = 192
    x = torch.randn(m, k).to(torch.bfloat16)
    laid = mg.fragment_order(x)
    fragments = -(-m // 8)
    assert laid.shape == (k // 64, fragments, 4, 32) and laid.dtype == torch.int64
    quads = x.view(torch.int64)  # (m, k / 4)
    for c in range(k // 64):
        for f in range(fragments):
            for j in range(4):
                for lane in range(32):
                    row, col = 8 * f + lane // 4, 16 * c + 4 * j + lane % 4
                    assert laid[c, f, j, lane] == (quads[row, col] if row < m else 0), (c, f, j, lane)
