"""ggml's byte layout of the k-quant blocks (ggml-common.h's block_q2_K ... block_q6_K), written with numpy.

One block holds 256 weights; `q` below is a block's codes (B, 256) uint8, fp16 fields are little-endian.
  Q2_K  84 bytes: scales[16] (sc | m << 4) · qs[64] (2-bit) · d · dmin
  Q3_K 110 bytes: hmask[32] (bit 2 of the code) · qs[64] (bits 0-1) · scales[12] (6-bit sc + 32) · d
  Q4_K 144 bytes: d · dmin · scales[12] (6-bit sc, m) · qs[128] (4-bit)
  Q5_K 176 bytes: d · dmin · scales[12] · qh[32] (bit 4 of the code) · qs[128] (bits 0-3)
  Q6_K 210 bytes: ql[128] (bits 0-3) · qh[64] (bits 4-5) · scales[16] (int8) · d
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from modelpress.export.kquants import KQuantGrid


def pack_kquant(codes: torch.Tensor, grid: KQuantGrid) -> np.ndarray:
    """(N, K) uint8 codes on `grid` -> uint8 (N, K/256 · block_bytes), ggml's blocks row after row."""
    spec = grid.spec
    n, k = grid.shape
    if tuple(codes.shape) != (n, k):
        raise ValueError(f"codes shape {tuple(codes.shape)} does not match the {spec.name} grid's {(n, k)}")
    q = codes.detach().cpu().numpy().astype(np.uint8).reshape(-1, 256)
    if int(q.max(initial=0)) > spec.nmax:
        raise ValueError(f"{spec.name} codes must be < {spec.nmax + 1}; got {int(q.max())}")
    d = _fp16_bytes(grid.d)
    sc = grid.sub_scales.detach().cpu().numpy().reshape(-1, spec.sub_blocks)
    if spec.affine:
        m = grid.sub_mins.detach().cpu().numpy().reshape(-1, spec.sub_blocks)  # type: ignore[union-attr]
        dmin = _fp16_bytes(grid.dmin)   # type: ignore[arg-type]
    if spec.name == "Q2_K":
        parts = [(sc | (m << 4)).astype(np.uint8), _crumbs(q), d, dmin]
    elif spec.name == "Q3_K":
        parts = [_bit_plane(q >> 2), _crumbs(q & 3), _q3_scales((sc + 32).astype(np.uint8)), d]
    elif spec.name == "Q4_K":
        parts = [d, dmin, _q4_scales(sc.astype(np.uint8), m.astype(np.uint8)), _nibbles(q)]
    elif spec.name == "Q5_K":
        parts = [d, dmin, _q4_scales(sc.astype(np.uint8), m.astype(np.uint8)), _bit_plane(q >> 4),
                 _nibbles(q & 15)]
    else:   # Q6_K
        parts = [_q6_low(q & 15), _crumbs(q >> 4), sc.astype(np.int8).view(np.uint8), d]
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == spec.block_bytes, (spec.name, blocks.shape)
    return blocks.reshape(n, -1)


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    """(N, SB) float16 -> (N·SB, 2) little-endian bytes."""
    return values.detach().cpu().numpy().astype("<f2").reshape(-1, 1).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit codes (B, 256) -> (B, 128): each 64-weight chunk, byte l = q[l] | q[32 + l] << 4."""
    chunks = q.reshape(-1, 4, 2, 32)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit codes (B, 256) -> (B, 64): per 128-weight half h, byte 32h + l holds q[128h + 32s + l] at bits 2s."""
    halves = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(halves << shifts, axis=2).reshape(-1, 64)


def _bit_plane(bits: np.ndarray) -> np.ndarray:
    """One bit per code (B, 256) -> (B, 32): byte l holds code 32i + l's bit at bit i."""
    rows = (bits & 1).reshape(-1, 8, 32).astype(np.uint8)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return np.bitwise_or.reduce(rows << shifts, axis=1)


def _q4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (B, 8) -> (B, 12): bytes 0-3 sc[0:4] with sc[4:8]'s top 2 bits above,
    bytes 4-7 the same for m, bytes 8-11 the low nibbles of sc[4:8] and (high nibble) m[4:8]."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _q3_scales(v: np.ndarray) -> np.ndarray:
    """16 six-bit values (B, 16) -> (B, 12): bytes 0-7 low nibbles of v[j] and (high nibble) v[8 + j],
    bytes 8-11 the top 2 bits of v[4s + j] at bits 2s of byte 8 + j."""
    out = np.empty((v.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (v[:, :8] & 15) | ((v[:, 8:] & 15) << 4)
    high = ((v >> 4) & 3).reshape(-1, 4, 4)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    out[:, 8:12] = np.bitwise_or.reduce(high << shifts, axis=1)
    return out


def _q6_low(low: np.ndarray) -> np.ndarray:
    """Low nibbles (B, 256) -> (B, 128): per 128-weight half h, byte 64h + l = q[128h + l] | q[128h + 64 + l] << 4."""
    halves = low.reshape(-1, 2, 2, 64)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128)

