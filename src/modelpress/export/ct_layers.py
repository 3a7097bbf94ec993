"""How one modelpress weight becomes compressed-tensors tensors: pure functions, no files.

compressed-tensors (the format vLLM and transformers read) stores per linear layer, under the layer's name:
- pack-quantized   weight_packed int32 (N, ceil(K·b/32)): signed codes q in [-2^(b-1), 2^(b-1)) stored as
                   q + 2^(b-1), b bits each, a little-endian bit stream per row. That is exactly our qdata
                   layout (formats/packing.py: same stream, rows padded to 4 bytes), so our bytes are reused.
                   weight_scale (N, G) / (N, 1) / (1,), weight_shape int (2,), and for asymmetric schemes
                   weight_zero_point: integer z in the code range, packed the same way along the rows (dim 0).
- int-quantized    weight int8 (N, K) + weight_scale (N, 1): W8A8 with dynamic per-token int8 activations.
- float-quantized  weight float8_e4m3fn (N, K) + weight_scale.
Dequantized: W = scale · (q − z), per group of `group_size` consecutive inputs; K must be a multiple of it.

Where our weight has no exact counterpart (float offsets instead of integer zero points, act-order
permutations with groups, NF4/FP4 codebooks, FP8 E5M2, SmoothQuant factors kept in the layer), it is
re-rounded to the nearest scheme the format has, and the result says why and carries the float weight a
runtime computes with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from modelpress.formats.packed import PackedWeight, expand_groups, quantize_weight
from modelpress.formats.packing import pack_codes
from modelpress.formats.scheme import WeightScheme

INT_FORMATS = {f"int{b}": b for b in (2, 3, 4, 8)}
ASYM_FORMATS = {f"int{b}-asym": b for b in (2, 3, 4, 8)}
DYNAMIC_TOKEN_INT8 = (("dynamic", True), ("num_bits", 8), ("strategy", "token"), ("symmetric", True),
                      ("type", "int"))
DYNAMIC_TOKEN_FP8 = (("dynamic", True), ("num_bits", 8), ("strategy", "token"), ("symmetric", True),
                     ("type", "float"))


@dataclass(frozen=True)
class CTScheme:
    """One compressed-tensors config group (layers sharing it are listed together in config.json)."""

    format: str                                   # pack-quantized, int-quantized, float-quantized
    weights: tuple                                # sorted (key, value) items of QuantizationArgs
    input_activations: tuple | None = None

    def config(self, targets: list[str]) -> dict:
        return {"targets": targets, "weights": dict(self.weights), "format": self.format,
                "input_activations": None if self.input_activations is None else dict(self.input_activations),
                "output_activations": None}

    @property
    def label(self) -> str:
        w = dict(self.weights)
        grouping = f"g{w['group_size']}" if w["strategy"] == "group" else w["strategy"]
        kind = f"{w['type']}{w['num_bits']}" + ("" if w["symmetric"] else "-asym")
        acts = ""
        if self.input_activations:
            a = dict(self.input_activations)
            acts = f" + {'fp8' if a['type'] == 'float' else 'int8'} per-token activations"
        return f"{self.format} {kind} {grouping}{acts}"


@dataclass
class CTLayer:
    """One linear layer as compressed-tensors stores it."""

    scheme: CTScheme | None          # None: a float layer (plain `weight`)
    tensors: dict[str, torch.Tensor]  # local names: weight_packed, weight_scale, ... or weight
    lossless: bool
    reason: str = ""
    runtime_weight: torch.Tensor | None = None  # (N, K) float32, for re-rounded layers
    regrouped: bool = False          # ragged rows written with smaller groups (scales repeated), exactly

    @property
    def target(self) -> str:
        return self.scheme.label if self.scheme else str(self.tensors["weight"].dtype).removeprefix("torch.")

    @property
    def stored_bytes(self) -> int:
        """Weight, scale and zero-point bytes (weight_shape is bookkeeping)."""
        return sum(t.numel() * t.element_size() for n, t in self.tensors.items() if n != "weight_shape")


def weight_args(bits: int, kind: str, strategy: str, group_size: int | None, symmetric: bool = True) -> tuple:
    return tuple(sorted({"num_bits": bits, "type": kind, "strategy": strategy, "group_size": group_size,
                         "symmetric": symmetric, "dynamic": False}.items()))


# ---- grouping ----------------------------------------------------------------------------------------

def ct_grouping(scheme: WeightScheme, k: int, size: int | None = None) -> tuple[str, int | None, int]:
    """(strategy, group_size, repeat): compressed-tensors wants K to be a multiple of the group size. A row with
    a ragged last group (K=576, g128: 4 groups of 128 and one of 64) is written with groups of gcd(K, g) and
    every scale repeated `repeat` times: the same weights, exactly, with more scale bytes. `size` forces a
    group size (a divisor of K and of our group length; see uniform_group_size)."""
    if scheme.granularity == "tensor":
        return "tensor", None, 1
    g = scheme.group_length(k)
    if size is None:
        if g == k:
            return "channel", None, 1
        size = math.gcd(k, g)
    if k % size or g % size:
        raise ValueError(f"group size {size} does not divide K={k} and the group length {g}")
    return "group", size, g // size


def natural_group_size(scheme: WeightScheme, k: int) -> int | None:
    """The group size ct_grouping picks by itself (the row length for per-channel), None per tensor."""
    return None if scheme.granularity == "tensor" else math.gcd(k, scheme.group_length(k))


def uniform_group_size(sizes: list[int]) -> int | None:
    """One group size for layers whose own sizes differ (K=576 at g128 is g64, K=1536 is g128): their gcd.
    transformers 5.23 decompresses asymmetric checkpoints (dequantize=True) with one config group's arguments
    for every layer, so asymmetric layers must share a config group to load; repeating each scale and zero
    point keeps every weight exact."""
    return math.gcd(*sizes) if len(set(sizes)) > 1 else None


def ct_scales(per_group: torch.Tensor, strategy: str, repeat: int, k: int, size: int | None) -> torch.Tensor:
    """Our (N, G) / (1, 1) scales (or zero points) in compressed-tensors' shape for `strategy`."""
    if strategy == "tensor":
        return per_group.reshape(1)
    if strategy == "channel":
        return per_group.reshape(-1, 1)
    return per_group.repeat_interleave(repeat, dim=1)[:, : k // size].contiguous()  # type: ignore[operator]


# ---- integer weights: pack-quantized -----------------------------------------------------------------

def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) uint8 codes (q + 2^(b-1)) -> (N, ceil(K·b/32)) int32, compressed-tensors' packing."""
    return pack_codes(codes, bits).view(torch.int32)


def _packed_words(p: PackedWeight) -> torch.Tensor:
    return p.qdata.contiguous().view(torch.int32)


def _stored_scale(p: PackedWeight) -> torch.Tensor:
    """Scales as they multiply: the stored ones, or float32 where double quantization coded them."""
    return p.scale if p.scale_scale is None else p.group_scales()


def symmetric_int(p: PackedWeight, reason: str = "") -> CTLayer:
    """A symmetric int-b PackedWeight (no permutation): our codes and scales, as they are."""
    n, k = p.shape
    bits = p.scheme.bits
    strategy, size, repeat = ct_grouping(p.scheme, k)
    tensors = {"weight_packed": _packed_words(p),
               "weight_scale": ct_scales(_stored_scale(p), strategy, repeat, k, size),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    scheme = CTScheme("pack-quantized", weight_args(bits, "int", strategy, size))
    return _layer(scheme, tensors, p, reason, lambda: p.dequantize(), regrouped=repeat > 1)


def integer_zero_points(p: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Our affine weight w = scale·u + offset (u in [0, 2^b)) as compressed-tensors' w = scale·(q − z) with
    q = u − 2^(b−1) and an integer z in [−2^(b−1), 2^(b−1)). z = −offset/scale − 2^(b−1) where that is an
    integer in range (then nothing changes); otherwise z is rounded and clamped, the scale kept, and the codes
    re-rounded to the nearest level of the new grid. Returns (q int8 (N, K), scale (N, G), z (N, G), exact)."""
    n, k = p.shape
    half = 2 ** (p.scheme.bits - 1)
    g = p.scheme.group_length(k)
    scale = p.group_scales()                                  # (N, G) float32
    ideal = -p.offset.float() / scale - half                  # type: ignore[union-attr]
    z = torch.round(ideal).clamp(-half, half - 1)
    exact = bool((ideal == z).all())
    if exact:
        q = p.codes().to(torch.int16) - half
    else:
        w = p.dequantize()                                     # (N, K) in our column order (no perm here)
        q = torch.round(w / expand_groups(scale, n, k, g)) + expand_groups(z, n, k, g)
        q = q.clamp(-half, half - 1)
    return q.to(torch.int8), scale, z.to(torch.int8), exact


def asymmetric_int(p: PackedWeight, reason: str = "", group_size: int | None = None) -> CTLayer:
    n, k = p.shape
    bits = p.scheme.bits
    half = 2 ** (bits - 1)
    q, scale, z, exact = integer_zero_points(p)
    strategy, size, repeat = ct_grouping(p.scheme, k, group_size)
    stored = scale if p.scale_scale is not None else scale.to(p.scale.dtype)
    zero = ct_scales(z, strategy, repeat, k, size)
    if strategy != "tensor":  # per group or channel, zero points pack along the rows: (ceil(N·b/32), G)
        zero = pack_int32((zero.t().to(torch.int16) + half).to(torch.uint8), bits).t().contiguous()
    tensors = {"weight_packed": pack_int32((q.to(torch.int16) + half).to(torch.uint8), bits),
               "weight_scale": ct_scales(stored, strategy, repeat, k, size),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64),
               "weight_zero_point": zero}
    if not exact:
        reason = _join(reason, f"float offsets rounded to integer zero points in [{-half}, {half - 1}] and the "
                               "codes re-rounded on that grid (quantize with integer zero points, "
                               f"{p.scheme.spec}/zp or --integer-zero-points, to export losslessly)")
    scheme = CTScheme("pack-quantized", weight_args(bits, "int", strategy, size, symmetric=False))
    g = p.scheme.group_length(k)

    def runtime() -> torch.Tensor:   # as compressed-tensors decompresses: in the scale dtype
        levels = (q.float() - expand_groups(z.float(), n, k, g)).to(stored.dtype)
        return (levels * expand_groups(stored, n, k, g)).float()

    return _layer(scheme, tensors, p, reason, runtime, lossless=exact and not reason, regrouped=repeat > 1)


def ternary_as_int2(p: PackedWeight, reason: str = "") -> CTLayer:
    """Ternary codes {0, 1, 2} (−1, 0, +1) are the int2 values −1, 0, 1: stored as symmetric int2, exactly."""
    codes = (p.scheme.qformat.decode(p.codes()) + 2).to(torch.uint8)   # int2 stores value v as code v + 2
    int2 = replace(p, scheme=replace(p.scheme, format="int2"), qdata=pack_codes(codes, 2))
    return symmetric_int(int2, reason)


# ---- int8 weights with int8 activations: int-quantized ------------------------------------------------

def w8a8_int(p: PackedWeight, reason: str = "") -> CTLayer:
    """An int8/channel weight with dynamic per-token int8 activations (DynamicInt8Linear, W8A8Linear)."""
    n, k = p.shape
    q = (p.qdata[:, :k] ^ 0x80).view(torch.int8).contiguous()
    tensors = {"weight": q, "weight_scale": _stored_scale(p).reshape(n, 1)}
    scheme = CTScheme("int-quantized", weight_args(8, "int", "channel", None), DYNAMIC_TOKEN_INT8)
    return _layer(scheme, tensors, p, reason, lambda: p.dequantize())


def folded_w8a8(p: PackedWeight, smooth: torch.Tensor) -> CTLayer:
    """A W8A8Linear that divides its input by `smooth` itself: compressed-tensors has no such factor, so it is
    folded back (W = W_stored diag(1/smooth)) and re-quantized to int8 per channel."""
    weight = p.dequantize() / smooth.float()[None, :]
    requantized = quantize_weight(weight, p.scheme)
    return w8a8_int(requantized, "in-layer SmoothQuant factors folded into the weight and re-quantized to int8")


# ---- fp8 weights: float-quantized ----------------------------------------------------------------------

def fp8_e4m3(p: PackedWeight, reason: str = "", activations: tuple | None = None) -> CTLayer:
    """activations=DYNAMIC_TOKEN_FP8: a DynamicFp8Linear (W8A8 fp8, compressed-tensors' FP8_DYNAMIC)."""
    n, k = p.shape
    strategy, size, repeat = ct_grouping(p.scheme, k)
    tensors = {"weight": p.codes().view(torch.float8_e4m3fn).contiguous(),
               "weight_scale": ct_scales(_stored_scale(p), strategy, repeat, k, size)}
    scheme = CTScheme("float-quantized", weight_args(8, "float", strategy, size), activations)
    return _layer(scheme, tensors, p, reason, lambda: p.dequantize(), regrouped=repeat > 1)


# ---- choosing ------------------------------------------------------------------------------------------

def convert_packed(p: PackedWeight, asym_group_size: int | None = None) -> CTLayer:
    """The compressed-tensors layer for a PackedWeight: exact where a scheme matches, else re-rounded.
    `asym_group_size` forces the group size of asymmetric layers (uniform_group_size)."""
    reason = ""
    if p.input_perm is not None:
        p, reason = _without_permutation(p)
    fmt = p.scheme.format
    if fmt in INT_FORMATS:
        return symmetric_int(p, reason)
    if fmt in ASYM_FORMATS:
        return asymmetric_int(p, reason, asym_group_size)
    if fmt == "ternary":
        return ternary_as_int2(p, reason)
    if fmt == "fp8-e4m3":
        return fp8_e4m3(p, reason)
    if fmt == "fp8-e5m2":
        target = replace(p.scheme, format="fp8-e4m3", double_quant=False)
        return fp8_e4m3(quantize_weight(p.dequantize(), target), _join(reason, "fp8-e5m2 re-rounded to fp8-e4m3"))
    target = replace(p.scheme, format="int8" if p.scheme.bits == 8 else "int4", double_quant=False)
    note = f"{fmt} has no compressed-tensors type; re-rounded to {target.spec}"
    return symmetric_int(quantize_weight(p.dequantize(), target), _join(reason, note))


def _without_permutation(p: PackedWeight) -> tuple[PackedWeight, str]:
    """compressed-tensors 0.20 has no g_idx. Per channel or tensor a permutation only reorders codes (exact);
    with groups, groups run over permuted columns and the weight is re-rounded to consecutive groups."""
    if p.scheme.granularity != "group" or p.scheme.group_length(p.shape[1]) == p.shape[1]:
        order = torch.argsort(p.input_perm.long())  # type: ignore[union-attr]
        return replace(p, qdata=pack_codes(p.codes()[:, order].contiguous(), p.scheme.bits), input_perm=None), ""
    return (quantize_weight(p.dequantize(), p.scheme),
            "act-order groups (input_perm) re-rounded to static consecutive groups (compressed-tensors has no g_idx)")


def float_layer(weight: torch.Tensor) -> CTLayer:
    return CTLayer(None, {"weight": weight.detach().contiguous()}, lossless=True)


def _layer(scheme: CTScheme, tensors: dict, p: PackedWeight, reason: str, runtime, lossless: bool | None = None,
           regrouped: bool = False) -> CTLayer:
    exact = not reason if lossless is None else lossless
    return CTLayer(scheme, tensors, exact, reason, None if exact else runtime(), regrouped)


def _join(first: str, second: str) -> str:
    return f"{first}; {second}" if first else second
