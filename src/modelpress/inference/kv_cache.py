"""A quantized key/value cache for transformers models, usable from `generate(past_key_values=...)` and from
plain forward calls.

Every attention layer keeps two stores per tensor (keys, values), shaped like transformers' (B, H, T, D):
- quantized: tokens that have aged out of the residual window, held only as codes + scales (kv_quant.py);
- residual: the most recent tokens in float (the model's dtype), at least `residual_length` of them once
  the cache is longer than that.
When the residual holds `residual_length + k·token_group` tokens or more, its oldest k·token_group tokens are
quantized and appended to the quantized store (KIVI quantizes keys per channel, which needs whole groups of
tokens). `update` returns the dequantized store followed by the residual, so attention really reads the
quantized states. With the per-token modes (int8, fp8) the residual is empty by default: every token is
quantized as soon as it arrives, including the ones being attended to in the same forward call.

Modes (a table, `KV_MODES`):
  int8  int8 absmax, one scale per (token, head)          keys and values alike
  fp8   fp8-e4m3 absmax, one scale per (token, head)      keys and values alike
  int4  KIVI: int4-asym keys per channel over groups of tokens, int4-asym values per token; float window
  int2  KIVI at 2 bits
The cache's real footprint is `nbytes()`: the sum of the stored tensors (codes, scales, offsets, residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from modelpress.errors import ModelpressError
from modelpress.formats.base import get_format
from modelpress.inference import kv_quant
from modelpress.inference.kv_quant import QuantizedStates


@dataclass(frozen=True)
class StatesCodec:
    """How one tensor (keys or values) is quantized: a number format and a grouping."""

    format: str
    layout: Literal["token", "channel"]
    group: int | None = None  # token layout: channels per scale (None: the whole head); channel: tokens per scale

    def __post_init__(self) -> None:
        if self.layout == "channel" and not self.group:
            raise ValueError("per-channel states need a token group size")

    @property
    def token_group(self) -> int:
        """Tokens that must be quantized together."""
        return self.group if self.layout == "channel" and self.group else 1

    def quantize(self, x: torch.Tensor) -> QuantizedStates:
        fmt = get_format(self.format)
        if self.layout == "channel":
            return kv_quant.quantize_per_channel(x, fmt, self.token_group)
        return kv_quant.quantize_per_token(x, fmt, self.group)

    def dequantize(self, q: QuantizedStates, dtype: torch.dtype) -> torch.Tensor:
        fmt = get_format(self.format)
        if self.layout == "channel":
            return kv_quant.dequantize_per_channel(q, fmt, dtype)
        return kv_quant.dequantize_per_token(q, fmt, dtype)


@dataclass(frozen=True)
class KVMode:
    key_format: str
    value_format: str
    kivi: bool              # keys per channel over token groups, values per token, float window
    default_residual: int


KV_MODES: dict[str, KVMode] = {
    "int8": KVMode("int8", "int8", kivi=False, default_residual=0),
    "fp8": KVMode("fp8-e4m3", "fp8-e4m3", kivi=False, default_residual=0),
    "int4": KVMode("int4-asym", "int4-asym", kivi=True, default_residual=128),
    "int2": KVMode("int2-asym", "int2-asym", kivi=True, default_residual=128),
}
CACHE_MODES = ("float", *KV_MODES)


@dataclass(frozen=True)
class KVCacheConfig:
    mode: str = "int8"
    residual_length: int | None = None   # recent tokens kept in float (default: 0 for int8/fp8, 128 for KIVI)
    group_size: int = 128                # KIVI: tokens per key scale
    value_group_size: int | None = None  # KIVI: channels per value scale (None: the whole head vector)

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ModelpressError(f"unknown KV cache mode {self.mode!r}; known modes: {', '.join(CACHE_MODES)}")
        if self.residual_length is not None and self.residual_length < 0:
            raise ModelpressError(f"residual length must be >= 0, got {self.residual_length}")
        if self.group_size <= 0:
            raise ModelpressError(f"KV cache group size must be positive, got {self.group_size}")
        if self.value_group_size is not None and self.value_group_size <= 0:
            raise ModelpressError(f"KV cache value group size must be positive, got {self.value_group_size}")

    @property
    def residual(self) -> int:
        if self.residual_length is not None:
            return self.residual_length
        return KV_MODES[self.mode].default_residual if self.mode in KV_MODES else 0

    def codecs(self) -> tuple[StatesCodec, StatesCodec]:
        mode = KV_MODES[self.mode]
        if mode.kivi:
            return (StatesCodec(mode.key_format, "channel", self.group_size),
                    StatesCodec(mode.value_format, "token", self.value_group_size))
        return StatesCodec(mode.key_format, "token"), StatesCodec(mode.value_format, "token")


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache. `keys`/`values` hold the float window (B, H, T_window, D); `stored` the
    quantized (keys, values) of the older tokens, or None while there are none."""

    def __init__(self, config: KVCacheConfig) -> None:
        super().__init__()
        self.config = config
        self.key_codec, self.value_codec = config.codecs()
        self.token_group = max(self.key_codec.token_group, self.value_codec.token_group)
        self.stored: tuple[QuantizedStates, QuantizedStates] | None = None

    # transformers 5.x passes (keys, values); earlier releases passed keys only
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0].clone()
        self.values = (key_states if value_states is None else value_states)[:, :, :0].clone()
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        return 0 if self.stored is None else self.stored[0].length

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_length + self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._flush()
        return self.full_states()

    def _flush(self) -> None:
        """Quantize the oldest whole token groups beyond the float window."""
        excess = self.keys.shape[-2] - self.config.residual
        count = excess // self.token_group * self.token_group
        if count <= 0:
            return
        new = (self.key_codec.quantize(self.keys[:, :, :count]), self.value_codec.quantize(self.values[:, :, :count]))
        self.stored = new if self.stored is None else (kv_quant.concat([self.stored[0], new[0]]),
                                                       kv_quant.concat([self.stored[1], new[1]]))
        # clone so the float tokens just quantized are really released
        self.keys = self.keys[:, :, count:].clone()
        self.values = self.values[:, :, count:].clone()

    def full_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, T, D) keys and values as attention sees them: dequantized store, then the float window."""
        if self.stored is None:
            return self.keys, self.values
        keys = self.key_codec.dequantize(self.stored[0], self.dtype)
        values = self.value_codec.dequantize(self.stored[1], self.dtype)
        return torch.cat([keys, self.keys], dim=-2), torch.cat([values, self.values], dim=-2)

    def crop(self, tokens: int) -> None:
        """Drop tokens from the end. Negative: remove that many (transformers 5); positive: keep that many
        (earlier releases); 0 does nothing. Cutting into a token group of the quantized store moves the
        group's kept tokens back to the float window, as dequantized values."""
        length = self.get_seq_length()
        keep = length + tokens if tokens < 0 else (length if tokens == 0 else min(tokens, length))
        keep = max(keep, 0)
        if keep >= length:
            return
        stored = self.quantized_length
        if keep >= stored:
            self.keys = self.keys[:, :, : keep - stored]
            self.values = self.values[:, :, : keep - stored]
            return
        keys, values = self.full_states()
        cut = keep // self.token_group * self.token_group
        self.keys, self.values = keys[:, :, cut:keep].clone(), values[:, :, cut:keep].clone()
        if cut == 0 or self.stored is None:
            self.stored = None
            return
        self.stored = (kv_quant.slice_tokens(self.stored[0], cut, self.key_codec.token_group),
                       kv_quant.slice_tokens(self.stored[1], cut, self.value_codec.token_group))

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.stored is not None:
            self.stored = (self.stored[0].map(fn), self.stored[1].map(fn))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reset(self) -> None:
        self.stored = None
        self.keys = self.values = None
        self.is_initialized = False

    def offload(self) -> None:
        raise ModelpressError("the quantized KV cache does not support offloading; it is already small")

    def prefetch(self) -> None:
        raise ModelpressError("the quantized KV cache does not support offloading; it is already small")

    def nbytes(self) -> int:
        """Bytes really stored: quantized codes, scales and offsets plus the float window."""
        if not self.is_initialized:
            return 0
        total = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        if self.stored is not None:
            total += self.stored[0].nbytes + self.stored[1].nbytes
        return total


class QuantizedKVCache(Cache):
    """A transformers Cache whose layers are QuantizedKVLayer. Pass `num_layers` to build them up front,
    or leave it out and they are added as the model first reaches each layer."""

    def __init__(self, config: KVCacheConfig, num_layers: int | None = None) -> None:
        if config.mode == "float":
            raise ModelpressError("KV cache mode 'float' needs no quantized cache; use make_kv_cache or DynamicCache")
        self.config = config
        if num_layers is None:
            super().__init__(layer_class_to_replicate=partial(QuantizedKVLayer, config))
        else:
            super().__init__(layers=[QuantizedKVLayer(config) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        length = self.get_seq_length()
        return self.nbytes() / length if length else 0.0


def cache_nbytes(cache: Cache) -> int:
    """Stored bytes of any cache: ours (QuantizedKVCache, static_kv.StaticQuantizedCache) report their own; float
    caches are summed from their key/value tensors."""
    if callable(getattr(cache, "nbytes", None)):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def check_full_attention(model_config) -> None:
    """The quantized cache keeps every token, which is only right for models with full attention only."""
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    layer_types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    if other or (not layer_types and sliding):
        found = ", ".join(other) if other else f"sliding_window={text.sliding_window}"
        raise ModelpressError(f"the quantized KV cache supports full-attention models only; this model has {found}")


def make_kv_cache(model: torch.nn.Module, config: KVCacheConfig) -> Cache:
    """A fresh cache for `model`: transformers' DynamicCache for 'float', else a QuantizedKVCache."""
    model_config = model.config
    if config.mode == "float":
        return DynamicCache(config=model_config)
    check_full_attention(model_config)
    text = model_config.get_text_config(decoder=True)
    return QuantizedKVCache(config, num_layers=text.num_hidden_layers)
