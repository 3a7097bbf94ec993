"""Bit packing: exact round trips for every width, the documented row length, and the documented bit layout
checked against a reference written with Python integers (a little-endian bit stream per row)."""

import pytest
import torch

from modelpress.formats.packing import ROW_ALIGN_BYTES, pack_codes, packed_row_bytes, unpack_codes

WIDTHS = range(1, 9)
LENGTHS = (1, 5, 7, 13, 100, 129, 576, 1003)  # mostly not multiples of 8


def random_codes(rows: int, k: int, bits: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + k * 10 + bits)
    return torch.randint(0, 2**bits, (rows, k), generator=gen, dtype=torch.int32).to(torch.uint8)


def reference_pack_row(codes: list[int], bits: int, row_bytes: int) -> bytes:
    stream = 0
    for k, code in enumerate(codes):
        stream |= code << (k * bits)
    return stream.to_bytes(row_bytes, "little")


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("k", LENGTHS)
def test_round_trip_is_exact(bits, k):
    codes = random_codes(3, k, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, packed_row_bytes(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("k", LENGTHS)
def test_row_bytes_as_documented(bits, k):
    raw = -(-k * bits // 8)  # ceil(k·bits / 8)
    row_bytes = packed_row_bytes(k, bits)
    assert row_bytes % ROW_ALIGN_BYTES == 0
    assert raw <= row_bytes < raw + ROW_ALIGN_BYTES


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("k", (5, 13, 100))
def test_layout_is_a_little_endian_bit_stream_with_zero_padding(bits, k):
    codes = random_codes(4, k, bits, seed=1)
    packed = pack_codes(codes, bits)
    row_bytes = packed_row_bytes(k, bits)
    for row in range(codes.shape[0]):
        expected = reference_pack_row(codes[row].tolist(), bits, row_bytes)
        assert bytes(packed[row].tolist()) == expected


def test_four_bit_nibble_order():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed[0, :3].tolist() == [0x21, 0x43, 0x05]
    assert packed[0, 3:].tolist() == [0] * (packed.shape[1] - 3)


def test_every_code_value_survives():
    for bits in WIDTHS:
        codes = torch.arange(2**bits, dtype=torch.int32).to(torch.uint8).repeat(2, 3)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.shape[1]), codes)


def test_wrong_row_length_is_refused():
    packed = pack_codes(random_codes(2, 100, 4), 4)
    with pytest.raises(ValueError, match="200 codes of 4 bits"):
        unpack_codes(packed, 4, 200)


def test_pack_refuses_wider_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int32), 4)
