"""Level tables checked against their published definitions, typed in here as the reference.
(torch 2.13 has float4_e2m1fn_x2 but cannot convert it to float on CPU, so FP4 is checked against the spec.)"""

import pytest
import torch

from modelpress.formats import get_format

# QLoRA (Dettmers et al. 2023), the NF4 data type as published with bitsandbytes
QLORA_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def test_nf4_levels_are_the_published_qlora_table():
    levels = get_format("nf4").levels
    assert levels.dtype == torch.float32
    torch.testing.assert_close(torch.sort(levels).values, torch.tensor(QLORA_NF4), rtol=0, atol=1e-6)
    # code order is ascending, so code 7 is the exact zero and codes 0 / 15 are -1 / +1
    assert torch.equal(levels, torch.sort(levels).values)
    assert levels[7] == 0 and levels[0] == -1 and levels[15] == 1


def e2m1_value(code: int) -> float:
    """OCP MX spec: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 2)


def test_fp4_codes_are_e2m1_bit_patterns():
    fmt = get_format("fp4")
    codes = torch.arange(16, dtype=torch.int32).to(torch.uint8)
    assert fmt.decode(codes).tolist() == [e2m1_value(c) for c in range(16)]


def test_fp4_encode_matches_round_to_nearest_e2m1():
    fmt = get_format("fp4")
    x = torch.linspace(-7, 7, 2801)
    codes = fmt.encode(x)
    assert int(codes.max()) < 16
    decoded = torch.tensor([e2m1_value(int(c)) for c in codes])
    table = torch.tensor([e2m1_value(c) for c in range(16)])
    nearest = (x[:, None] - table).abs().amin(dim=1)
    assert torch.equal((x - decoded).abs(), nearest)
    # zero has one code, +0: a decoded -0 must not re-encode differently
    assert torch.equal(fmt.encode(torch.tensor([-0.1, -0.0, 0.0, 0.1])), torch.zeros(4, dtype=torch.uint8))


@pytest.mark.parametrize("fmt, bits, count", [("int4", 4, 16), ("int3-asym", 3, 8), ("int2", 2, 4), ("int8", 8, 256)])
def test_integer_levels(fmt, bits, count):
    levels = get_format(fmt).levels
    assert levels.numel() == count
    if fmt.endswith("-asym"):
        assert levels.tolist() == list(range(count))
    else:
        assert levels.tolist() == list(range(-(count // 2), count // 2))


def test_fp8_levels_are_the_dtype_bit_patterns():
    for name, dtype in (("fp8-e4m3", torch.float8_e4m3fn), ("fp8-e5m2", torch.float8_e5m2)):
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        ours = get_format(name).decode(codes)
        theirs = codes.view(dtype).float()
        assert torch.equal(torch.nan_to_num(ours, nan=7.0), torch.nan_to_num(theirs, nan=7.0))
        grid = codes.view(16, 16).t()   # 2-D and not contiguous, as codes unpacked from rows can be
        assert torch.equal(torch.nan_to_num(get_format(name).decode(grid), nan=7.0),
                           torch.nan_to_num(grid.contiguous().view(dtype).float(), nan=7.0))
