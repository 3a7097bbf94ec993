"""Dense bit packing of integer codes, row by row.

Layout (what kernels, save files and exporters rely on): codes of shape (rows, K) with `bits` bits each
become uint8 of shape (rows, row_bytes). Within a row, code k occupies bits [k·bits, (k+1)·bits) of a
little-endian bit stream: for 4 bits, byte j holds code 2j in its low nibble and code 2j+1 in its high
nibble; for 2 bits, byte j holds codes 4j..4j+3 from the least significant pair up; 3-bit codes run across
byte boundaries (8 codes in 3 bytes). Each row is padded with zero bits to a multiple of 4 bytes, so a
row can be read as int32 words and rows start 4-byte aligned.
"""

from __future__ import annotations

import torch

ROW_ALIGN_BYTES = 4


def packed_row_bytes(num_codes: int, bits: int) -> int:
    raw = (num_codes * bits + 7) // 8
    return (raw + ROW_ALIGN_BYTES - 1) // ROW_ALIGN_BYTES * ROW_ALIGN_BYTES


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, K) uint8 codes < 2**bits  ->  (rows, packed_row_bytes(K, bits)) uint8."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack_codes wants a 2-D uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    rows, k = codes.shape
    row_bytes = packed_row_bytes(k, bits)
    if bits == 8:
        out = torch.zeros(rows, row_bytes, dtype=torch.uint8, device=codes.device)
        out[:, :k] = codes
        return out
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per_byte = 8 // bits
        padded = torch.zeros(rows, row_bytes * per_byte, dtype=torch.uint8, device=codes.device)
        padded[:, :k] = codes
        padded = padded.view(rows, row_bytes, per_byte)
        out = torch.zeros(rows, row_bytes, dtype=torch.uint8, device=codes.device)
        for slot in range(per_byte):
            out |= padded[:, :, slot] << (slot * bits)
        return out
    # any other width: expand to a bit stream and regroup into bytes
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, k * bits)
    padded = torch.zeros(rows, row_bytes * 8, dtype=torch.uint8, device=codes.device)
    padded[:, : k * bits] = stream
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(rows, row_bytes, 8) * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of pack_codes: (rows, row_bytes) uint8 -> (rows, num_codes) uint8."""
    rows, row_bytes = packed.shape
    if row_bytes != packed_row_bytes(num_codes, bits):
        raise ValueError(
            f"packed rows have {row_bytes} bytes; {num_codes} codes of {bits} bits need "
            f"{packed_row_bytes(num_codes, bits)}"
        )
    if bits == 8:
        return packed[:, :num_codes].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(rows, row_bytes * per_byte)[:, :num_codes].contiguous()
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, row_bytes * 8)[:, : num_codes * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.view(rows, num_codes, bits) * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)
