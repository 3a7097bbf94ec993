"""Memory calculator: what a model's weights take in each number format, and what its KV cache takes.

Weights. With only a parameter count, every parameter is counted in the format (the usual headline
figures: 7B parameters are 28 GB in fp32, 14 GB in fp16, 7 GB in int8, 3.5 GB at 4 bits), and scale
overhead comes from `WeightScheme.theoretical_bits_per_weight`. With a model's shapes, the linear layers
that `modelpress quantize` packs are counted exactly as PackedWeight stores them (codes with padded rows,
scales, offsets), and the other parameters (embeddings, norms, output head) are counted in float16.

KV cache. bytes = 2 (K and V) · layers · kv_heads · head_dim · context · batch · bytes per element, with
the scale overhead of quantized caches included in the bytes per element (see KV_DTYPES).
Decimal units (1 GB = 10**9 bytes) as in model cards, GiB (2**30) beside them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from modelpress.errors import ModelpressError
from modelpress.formats.packed import empty_packed
from modelpress.formats.scheme import WeightScheme

GB = 10**9
GIB = 2**30
REST_BITS = 16  # parameters a quantize run leaves alone are counted as float16 in the quantized rows

# label -> float bits (int) or scheme spec (str); the order of the printed table
FORMAT_ROWS: tuple[tuple[str, int | str], ...] = (
    ("fp32", 32),
    ("fp16/bf16", 16),
    ("int8/channel", "int8/channel"),
    ("fp8", "fp8-e4m3/channel"),
    ("int4/g128", "int4/g128"),
    ("int4-asym/g128", "int4-asym/g128"),
    ("nf4/g64", "nf4/g64"),
    ("nf4/g64/dq", "nf4/g64/dq"),
    ("int3/g128", "int3/g128"),
    ("int2/g64", "int2/g64"),
    ("ternary", "ternary"),
)

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_parameter_count(text: str) -> int:
    """'7B', '13b', '135M', '1.5B', '7000000000', '7_000_000' or '7e9' -> a positive integer."""
    match = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ModelpressError(f"cannot read parameter count {text!r}; expected e.g. 7B, 135M, 1.5B or 7000000000")
    number = float(match.group(1).replace("_", "").replace(",", ""))
    count = round(number * _SUFFIXES[match.group(2).upper()])
    if count <= 0:
        raise ModelpressError(f"parameter count must be positive, got {text!r}")
    return count


@dataclass(frozen=True)
class LinearShape:
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelShapes:
    """What the calculator needs to know about a model; nothing is loaded to learn it."""

    parameters: int                       # every stored parameter, tied ones once
    linear: tuple[LinearShape, ...] = ()  # the weights a quantize run packs (output head excluded)
    layers: int | None = None             # attention layers, KV heads and head size, for the KV cache
    kv_heads: int | None = None
    head_dim: int | None = None

    @property
    def quantized_parameters(self) -> int:
        return sum(s.numel for s in self.linear)


@dataclass(frozen=True)
class WeightEstimate:
    label: str
    scheme: str | None           # the exact scheme spec (None for float formats)
    quantized_parameters: int    # parameters counted in this format
    weight_bytes: int            # their codes (or float values), before overhead
    overhead_bytes: int          # scales, offsets, double-quantization constants
    float_bytes: int             # the other parameters, kept in float16 (0 with only a parameter count)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.overhead_bytes + self.float_bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, overhead included."""
        return 8 * (self.weight_bytes + self.overhead_bytes) / self.quantized_parameters

    def to_dict(self) -> dict:
        return {"format": self.label, "scheme": self.scheme, "quantized_parameters": self.quantized_parameters,
                "weight_bytes": self.weight_bytes, "overhead_bytes": self.overhead_bytes,
                "float_bytes": self.float_bytes, "total_bytes": self.total_bytes,
                "total_gb": self.total_bytes / GB, "total_gib": self.total_bytes / GIB,
                "bits_per_weight": self.bits_per_weight}


def estimate_weights(label: str, fmt: int | str, parameters: int,
                     linear: Sequence[LinearShape] | None = None) -> WeightEstimate:
    """Bytes of `parameters` weights in one format: float bits (int) or a scheme spec (str).

    Without `linear`, every parameter is counted in the format; with it, those shapes are counted exactly as
    packed and the remaining parameters in float16."""
    if linear is not None and not linear:
        raise ModelpressError("the model has no linear layers to quantize")
    if isinstance(fmt, int):
        return WeightEstimate(label, None, parameters, math.ceil(parameters * fmt / 8), 0, 0)
    scheme = WeightScheme.parse(fmt)
    if linear is None:
        overhead_bits = scheme.theoretical_bits_per_weight() - scheme.bits
        return WeightEstimate(label, scheme.spec, parameters, math.ceil(parameters * scheme.bits / 8),
                              round(parameters * overhead_bits / 8), 0)
    codes = overhead = 0
    for shape, count in Counter(linear).items():
        packed = empty_packed(scheme, (shape.out_features, shape.in_features), device="meta")
        layer_codes = packed.qdata.numel() * packed.qdata.element_size()
        codes += count * layer_codes
        overhead += count * (packed.nbytes - layer_codes)
    quantized = sum(s.numel for s in linear)
    rest = math.ceil((parameters - quantized) * REST_BITS / 8)
    return WeightEstimate(label, scheme.spec, quantized, codes, overhead, rest)


def estimate_all_weights(shapes: ModelShapes | int) -> list[WeightEstimate]:
    """One row per entry of FORMAT_ROWS, for a parameter count or a model's shapes."""
    if isinstance(shapes, int):
        return [estimate_weights(label, fmt, shapes) for label, fmt in FORMAT_ROWS]
    rows = []
    for label, fmt in FORMAT_ROWS:
        if isinstance(fmt, int):  # float rows: the whole model in that float format
            rows.append(estimate_weights(label, fmt, shapes.parameters))
        else:
            rows.append(estimate_weights(label, fmt, shapes.parameters, shapes.linear))
    return rows


@dataclass(frozen=True)
class KVDtype:
    bits: int                  # per stored element
    group: int | None = None   # elements sharing the overhead below; None: one head vector of one token
    group_bits: int = 0        # overhead bits per group (fp16 scale, and fp16 zero point when asymmetric)
    note: str = ""

    def bits_per_element(self, head_dim: int) -> float:
        if not self.group_bits:
            return float(self.bits)
        return self.bits + self.group_bits / (self.group or head_dim)


KV_DTYPES: dict[str, KVDtype] = {
    "float32": KVDtype(32),
    "float16": KVDtype(16),
    "bfloat16": KVDtype(16),
    "int8": KVDtype(8, None, 16, "int8 absmax, one fp16 scale per (token, head)"),
    "fp8": KVDtype(8, None, 16, "fp8-e4m3, one fp16 scale per (token, head)"),
    "int4": KVDtype(4, 32, 32, "int4-asym, fp16 scale + fp16 zero point per 32 values"),
}


@dataclass(frozen=True)
class KVCacheEstimate:
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    batch: int
    dtype: str
    bits_per_element: float

    @property
    def bytes_per_token(self) -> float:
        """For one sequence: K and V of every layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bits_per_element / 8

    @property
    def total_bytes(self) -> int:
        return math.ceil(self.bytes_per_token * self.context * self.batch)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "context": self.context, "batch": self.batch, "dtype": self.dtype,
                "bits_per_element": self.bits_per_element, "bytes_per_token": self.bytes_per_token,
                "total_bytes": self.total_bytes, "total_gb": self.total_bytes / GB,
                "total_gib": self.total_bytes / GIB, "note": KV_DTYPES[self.dtype].note}


def estimate_kv_cache(layers: int, kv_heads: int, head_dim: int, context: int = 4096, batch: int = 1,
                      dtype: str = "float16") -> KVCacheEstimate:
    if dtype not in KV_DTYPES:
        raise ModelpressError(f"unknown KV cache dtype {dtype!r}; known: {', '.join(KV_DTYPES)}")
    for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("context", context), ("batch", batch)):
        if not isinstance(value, int) or value <= 0:
            raise ModelpressError(f"KV cache {name} must be a positive integer, got {value!r}")
    return KVCacheEstimate(layers, kv_heads, head_dim, context, batch, dtype,
                           KV_DTYPES[dtype].bits_per_element(head_dim))


def kv_shape_from_config(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config (the text part of multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and heads:
        head_dim = text.hidden_size // heads
    if not (layers and kv_heads and head_dim):
        raise ModelpressError(f"cannot find layers / KV heads / head size in the {type(config).__name__}; "
                              "give --layers, --kv-heads and --head-dim")
    return int(layers), int(kv_heads), int(head_dim)
