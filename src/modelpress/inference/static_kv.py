"""The quantized KV cache of kv_cache.py on the static-cache interface of static_decode.py, so that a decode
step with quantized keys/values needs no host value and no step-dependent allocation and can be replayed
from a CUDA graph.

Per layer and tensor (keys, values) the codes, scales and offsets of all `max_len` positions are allocated
once, shaped like kv_quant.QuantizedStates over the whole buffer; the tokens of a forward call are written
at `owner.index` (a device tensor of ascending positions). `update` quantizes the new states with the same
codecs (kv_cache.StatesCodec, math in kv_quant.py), writes them, and returns the dequantized buffer
(B, H, max_len, D) in the model's dtype; positions beyond the current one are masked by the caller's 4-D
attention mask, as with StaticCache. Each token reads the same numbers as QuantizedKVCache gives it:
- per-token modes (int8, fp8; every KIVI value): a token's codes depend on that token alone, so they are
  written on arrival, whatever the float window;
- float window (KIVI, or a per-token mode given a residual length): the newest tokens are also kept in
  float in a ring of R + 2G slots (R the window, G the key token group; at most max_len); attention reads the ring for
  positions >= Q = G * floor((L - R) / G) (L tokens so far, Q the eager cache's quantized length) and the
  codes below;
- KIVI keys (per channel over groups of G tokens): every call re-quantizes, from the ring, the newest
  group that has left the window (group floor((L - R) / G) - 1, the one the eager cache quantizes when L
  reaches it). The ring keeps that group intact for the G calls it stays the newest, so re-quantizing gives
  the same codes each time; before any group has left the window, group 0 is quantized from whatever the
  ring holds and never read (its positions read the ring until it is rewritten). Calls of more than G
  tokens (prefill) run in chunks of G so that no group is skipped.
No crop, reorder or offload: it serves StaticDecoder's single sequence, prompt then one token per step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from modelpress.errors import ModelpressError
from modelpress.inference.kv_cache import KVCacheConfig, StatesCodec
from modelpress.inference.kv_quant import QuantizedStates
from modelpress.inference.static_decode import StaticCache, _StaticLayer
from modelpress.nn.triton_kv import write_kv_int8


# An int8 cache with no float window is quantized and written by triton_kv.write_kv_int8 (one launch a layer, bit for
# bit the codec's numbers) under the decode-time fusions, instead of about two dozen PyTorch kernels a layer. H100,
# 7B shape, int4/g128, 512-token prompts (bench/decode.py --kv-cache int8 --paths auto auto+nokv8): 380.6 against
# 214.0 tok/s at batch 1, 2560.2 against 1843.4 at batch 16 (bench/results/decode_batch*_kv8_h100.json).
WRITE_INT8_KERNEL = True


def empty_store(codec: StatesCodec, like: torch.Tensor, length: int) -> QuantizedStates:
    """Zeroed stored states of `length` tokens shaped like `codec.quantize` of (B, H, length, D) states (a
    multiple of the codec's token group). Zero codes times zero scales dequantize to zero: unwritten
    positions stay finite, so masking them in attention gives exact zeros (a NaN would leak through)."""
    group = codec.token_group
    probe = codec.quantize(torch.zeros_like(like[:, :, :1]).expand(-1, -1, group, -1))

    def grown(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        rows = t.shape[2] * length // group       # qdata: one row per token; per-channel scales: per group
        return torch.zeros((*t.shape[:2], rows, *t.shape[3:]), dtype=t.dtype, device=t.device)

    return QuantizedStates(qdata=grown(probe.qdata), scale=grown(probe.scale), offset=grown(probe.offset),
                           head_dim=probe.head_dim)


def write_store(store: QuantizedStates, new: QuantizedStates, tokens: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy `new` into `store` in place: codes at positions `tokens`, scales/offsets at scale rows `rows`."""
    store.qdata.index_copy_(2, tokens, new.qdata)
    store.scale.index_copy_(2, rows, new.scale)
    if store.offset is not None:
        store.offset.index_copy_(2, rows, new.offset)


class StaticQuantizedLayer(_StaticLayer):
    """One attention layer: stored keys and values over `owner.max_len` positions, plus the float ring when
    the configuration keeps a float window. `keys`/`values` stay None: nothing float of full length exists."""

    def __init__(self, owner: StaticQuantizedCache) -> None:
        super().__init__(owner)
        config = owner.config
        self.key_codec, self.value_codec = config.codecs()
        self.group = max(self.key_codec.token_group, self.value_codec.token_group)  # G
        self.residual = config.residual                                             # R
        self.windowed = self.residual > 0 or self.key_codec.layout == "channel"
        # W: R + 2G slots, or max_len when that is fewer (then slot = position, nothing is overwritten)
        self.ring_len = min(self.residual + 2 * self.group, owner.max_len) if self.windowed else 0
        self.stored: tuple[QuantizedStates, QuantizedStates] | None = None
        self.ring: tuple[torch.Tensor, torch.Tensor] | None = None                  # (B, H, W, D) each

    def lazy_initialization(self, key_states, value_states=None):
        self.dtype, self.device = key_states.dtype, key_states.device
        max_len, group = self.owner.max_len, self.group
        padded = -(-max_len // group) * group  # whole token groups
        self.stored = (empty_store(self.key_codec, key_states, padded),
                       empty_store(self.value_codec, value_states, padded))
        if self.windowed:
            b, h, _, d = key_states.shape
            self.ring = (torch.zeros(b, h, self.ring_len, d, dtype=self.dtype, device=self.device),
                         torch.zeros(b, h, self.ring_len, value_states.shape[-1], dtype=self.dtype,
                                     device=self.device))
            positions = torch.arange(max_len, device=self.device)
            self.positions, self.ring_slots = positions, positions % self.ring_len    # (max_len,)
            self.group_tokens = torch.arange(group, device=self.device)               # (G,)
        self.is_initialized = True

    def copy_prefix(self, other: StaticQuantizedLayer, tokens: int) -> None:
        """The codes and scales of `other`'s first `tokens` positions copied here (per-token layouts: one scale row
        a token; a windowed cache's positions are not its own, see StaticQuantizedCache.keeps_positions)."""
        if self.windowed or other.windowed:
            raise ValueError("a cache with a float window does not keep its positions")
        if not self.is_initialized:
            b, h, _, _ = other.stored[0].qdata.shape
            probe = torch.zeros(b, h, 1, other.stored[0].head_dim, dtype=other.dtype, device=other.device)
            self.lazy_initialization(probe, torch.zeros(b, h, 1, other.stored[1].head_dim, dtype=other.dtype,
                                                        device=other.device))
        for mine, theirs in zip(self.stored, other.stored):
            for t, u in zip(mine.tensors(), theirs.tensors()):
                t[:, :, :tokens] = u[:, :, :tokens]

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the (B, H, T, D) states at `owner.index` (T ascending positions); (B, H, max_len, D) keys and
        values as attention reads them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self.owner.index
        chunk = self.group if self.key_codec.layout == "channel" else key_states.shape[2]
        for start in range(0, key_states.shape[2], chunk):
            end = start + chunk
            self._write(key_states[:, :, start:end], value_states[:, :, start:end], index[start:end])
        if self.owner.read_codes:   # the codes themselves, for the attention function that reads them (fusion.py)
            max_len = self.owner.max_len
            keys, values = (store.qdata[:, :, :max_len] for store in self.stored)
            keys.kv_scales = tuple(store.scale[:, :, :max_len] for store in self.stored)
            return keys, values
        return self._read(index[-1] + 1)

    def _write(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        key_store, value_store = self.stored
        if self.owner.fused_writes and WRITE_INT8_KERNEL and not torch.compiler.is_compiling() and write_kv_int8(
                key_store.qdata, key_store.scale, value_store.qdata, value_store.scale, index, keys, values):
            self.owner.wrote_fused = True
            return
        write_store(value_store, self.value_codec.quantize(values), index, index)
        if self.key_codec.layout == "token":
            write_store(key_store, self.key_codec.quantize(keys), index, index)
        if self.windowed:
            last = slice(-self.ring_len, None)  # a longer call keeps its newest W tokens (no slot written twice)
            slots = index[last] % self.ring_len
            self.ring[0].index_copy_(2, slots, keys[:, :, last])
            self.ring[1].index_copy_(2, slots, values[:, :, last])
        if self.key_codec.layout == "channel":
            self._requantize_key_group(index[-1] + 1)

    def _requantize_key_group(self, length: torch.Tensor) -> None:
        """Quantize, from the ring, the newest key group that has left the float window (0-d device `length`:
        tokens so far); group 0 while none has."""
        group = ((length - self.residual) // self.group - 1).clamp(min=0)   # 0-d
        tokens = group * self.group + self.group_tokens                     # (G,) positions of its tokens
        states = self.ring[0].index_select(2, tokens % self.ring_len)       # (B, H, G, D)
        write_store(self.stored[0], self.key_codec.quantize(states), tokens, group.reshape(1))

    def _read(self, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        max_len = self.owner.max_len
        keys = self.key_codec.dequantize(self.stored[0], self.dtype)[:, :, :max_len]
        values = self.value_codec.dequantize(self.stored[1], self.dtype)[:, :, :max_len]
        if not self.windowed:
            return keys, values
        quantized = ((length - self.residual) // self.group).clamp(min=0) * self.group  # Q, 0-d
        in_window = (self.positions >= quantized)[:, None]                              # (max_len, 1)
        keys = torch.where(in_window, self.ring[0].index_select(2, self.ring_slots), keys)
        values = torch.where(in_window, self.ring[1].index_select(2, self.ring_slots), values)
        return keys, values

    def reset(self) -> None:
        if not self.is_initialized:
            return
        for t in [*self.stored[0].tensors(), *self.stored[1].tensors(), *(self.ring or ())]:
            t.zero_()

    def nbytes(self) -> int:
        """Bytes held: codes, scales and offsets of all max_len positions, plus the float ring."""
        if not self.is_initialized:
            return 0
        ring = sum(t.numel() * t.element_size() for t in self.ring) if self.ring else 0
        return self.stored[0].nbytes + self.stored[1].nbytes + ring


class StaticQuantizedCache(StaticCache):
    """StaticCache's interface (`index`, `max_len`, compileable layers) over quantized layers."""

    def __init__(self, config: KVCacheConfig, num_layers: int, max_len: int, read_codes: bool = False,
                 fused_writes: bool = False) -> None:
        if config.mode == "float":
            raise ModelpressError("KV cache mode 'float' needs no quantized cache; use StaticCache")
        self.config, self.max_len = config, max_len
        # int8 with no float window: `update` returns the codes (uint8, (B, H, max_len, D)), their per-token scales
        # attached to the keys as `kv_scales`, for an attention function that reads them (fusion.py's; only it may
        # get them); else the dequantized states
        self.read_codes = read_codes and config.mode == "int8" and config.residual == 0
        self.index: torch.Tensor | None = None
        # int8 with no float window: quantized and written by one kernel a layer (triton_kv.write_kv_int8), where
        # it serves the call; other modes by their codecs' PyTorch kernels
        self.fused_writes = fused_writes and config.mode == "int8" and config.residual == 0
        self.wrote_fused = False
        Cache.__init__(self, layers=[StaticQuantizedLayer(self) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    kv_bytes = nbytes

    @property
    def keeps_positions(self) -> bool:
        """Not with a float window: its ring slots are reused, and KIVI key groups are re-quantized from it."""
        return not any(layer.windowed for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Bytes per position of the static buffers (all max_len positions are allocated up front)."""
        return self.nbytes() / self.max_len


def make_static_cache(num_layers: int, max_len: int, config: KVCacheConfig | None = None,
                      fused_writes: bool = False, read_codes: bool = False) -> StaticCache:
    """A float StaticCache (its keys and values written by one kernel a layer if fused_writes), or a quantized
    one for a quantized mode (read_codes, fused_writes: see StaticQuantizedCache)."""
    if config is None or config.mode == "float":
        return StaticCache(num_layers, max_len, fused_writes)
    return StaticQuantizedCache(config, num_layers, max_len, read_codes, fused_writes)
