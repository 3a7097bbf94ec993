"""Our packed weights as GGML blocks, bit for bit, and GGML blocks for anything else.

GGML's legacy block types hold 32 consecutive weights of a row under one fp16 scale (and offset):
- Q4_0 (18 bytes): d, then 16 bytes; byte j holds element j in its low nibble and element j+16 in its high
  nibble; value = d·(nibble − 8).             = our int4 symmetric code u (value scale·(u − 8))
- Q4_1 (20 bytes): d, m, 16 bytes as Q4_0;      value = d·nibble + m.  = our int4-asym (scale·u + offset)
- Q5_0 (22 bytes): d, qh (32 high bits), 16 bytes of low nibbles; value = d·(q − 16)   = int5 symmetric
- Q5_1 (24 bytes): d, m, qh, low nibbles;       value = d·q + m                        = int5-asym
- Q8_0 (34 bytes): d, 32 int8;                   value = d·q                            = int8 symmetric
So a PackedWeight maps losslessly when its groups are whole 32-blocks (group size a multiple of 32, or one
scale per row or tensor, with K a multiple of 32), its scales and offsets are exactly representable in fp16,
and its columns are in the original order (no GPTQ act-order permutation). Codes are copied, never rounded.

Everything else is re-quantized from the dequantized float weight with gguf-py's reference quantizers (legacy
types) or our own k-quant encoder, and reported as such by the caller.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from modelpress.export.kquant_layout import pack_kquant
from modelpress.export.kquants import kquant_from_packed, quantize_kquant
from modelpress.formats.packed import PackedWeight

Q = GGMLQuantizationType
BLOCK = 32
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")     # written by our own encoder (kquants.py)
LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # written by gguf-py's reference quantizer

# our format name -> (GGML type, whether the type has an offset m)
LOSSLESS_TYPES: dict[str, GGMLQuantizationType] = {
    "int4": Q.Q4_0, "int4-asym": Q.Q4_1, "int5": Q.Q5_0, "int5-asym": Q.Q5_1, "int8": Q.Q8_0,
}


def lossless_type(packed: PackedWeight) -> tuple[GGMLQuantizationType | None, str]:
    """The GGML type that holds `packed` bit for bit, or None and the reason it cannot."""
    scheme = packed.scheme
    k = packed.shape[1]
    qtype = LOSSLESS_TYPES.get(scheme.format)
    if qtype is None:
        return None, f"{scheme.format} has no GGML block type"
    if packed.input_perm is not None:
        return None, "columns stored in GPTQ activation order (re-run GPTQ with static groups for a lossless export)"
    if scheme.double_quant:
        return None, "double-quantized scales are not fp16 values"
    if k % BLOCK:
        return None, f"rows of {k} inputs are not whole blocks of {BLOCK}"
    if scheme.granularity == "group" and scheme.group_length(k) % BLOCK:
        return None, f"groups of {scheme.group_size} are not whole blocks of {BLOCK}"
    for what, tensor in (("scales", packed.scale), ("offsets", packed.offset)):
        if tensor is not None and not _fp16_exact(tensor):
            return None, f"{what} ({scheme.scale_dtype}) are not all exactly representable in float16"
    return qtype, ""


def _fp16_exact(tensor: torch.Tensor) -> bool:
    value = tensor.float()
    return bool(torch.equal(value.to(torch.float16).float(), value))


def block_params(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per 32-block fp16 scale and offset, (N, K/32) each (offset None for symmetric formats)."""
    n, k = packed.shape
    blocks = k // BLOCK
    if packed.scheme.granularity == "tensor":
        expand = lambda t: t.reshape(1, 1).expand(n, blocks)  # noqa: E731
    else:
        per_group = packed.scheme.group_length(k) // BLOCK
        expand = lambda t: t.repeat_interleave(per_group, dim=1)[:, :blocks]  # noqa: E731
    scale = expand(packed.scale).to(torch.float16).contiguous()
    offset = None if packed.offset is None else expand(packed.offset).to(torch.float16).contiguous()
    return scale, offset


def encode_lossless(packed: PackedWeight, qtype: GGMLQuantizationType) -> np.ndarray:
    """(N, row_bytes) uint8 GGML blocks holding exactly `packed`'s codes, scales and offsets."""
    n, k = packed.shape
    codes = packed.codes().reshape(n, k // BLOCK, BLOCK).numpy()     # (N, B, 32) uint8
    scale, offset = block_params(packed)
    d = scale.numpy().view(np.uint8).reshape(n, -1, 2)                # (N, B, 2) little-endian fp16
    parts = [d]
    if offset is not None:
        parts.append(offset.numpy().view(np.uint8).reshape(n, -1, 2))
    if qtype == Q.Q8_0:
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    elif qtype in (Q.Q4_0, Q.Q4_1):
        parts.append(_nibbles(codes))
    elif qtype in (Q.Q5_0, Q.Q5_1):
        high = ((codes >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
        qh = np.bitwise_or.reduce(high, axis=-1).astype("<u4")
        parts.append(qh[..., None].view(np.uint8))
        parts.append(_nibbles(codes & 0x0F))
    else:
        raise ValueError(f"no lossless encoder for {qtype.name}")
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape[-1] == GGML_QUANT_SIZES[qtype][1], (qtype, blocks.shape)
    return np.ascontiguousarray(blocks.reshape(n, -1))


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., 32) 4-bit codes -> (..., 16) bytes: element j low nibble, element j+16 high nibble."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def decode(blocks: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> torch.Tensor:
    """(N, K) float32 weight that llama.cpp's decoder gives for these blocks (gguf-py's reference decoder)."""
    return torch.from_numpy(np.asarray(gguf_quants.dequantize(blocks, qtype), dtype=np.float32)).reshape(shape)


def encode_float(weight: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """GGML data of a float (N, K) weight in `qtype`: a float array for F32/F16, raw blocks for the rest."""
    array = weight.detach().float().cpu().numpy()
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype.name in K_TYPES:
        return quantize_kquant(weight.detach().float().cpu(), qtype)
    return gguf_quants.quantize(array, qtype)


def encode_kquant_lossless(packed: PackedWeight) -> tuple[GGMLQuantizationType, np.ndarray] | None:
    """A packed weight whose scales factor exactly into a k-quant header (kquants.kquant_from_packed), as blocks."""
    found = kquant_from_packed(packed)
    if found is None:
        return None
    grid, codes = found
    return Q[grid.qtype], pack_kquant(codes, grid)


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    size, nbytes = GGML_QUANT_SIZES[qtype]
    return 8 * nbytes / size
