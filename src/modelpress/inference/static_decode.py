"""Batch-1 decoding on a static KV cache, the decode step replayed as a CUDA graph.

A static cache holds `max_len` positions per layer, allocated once; the tokens of each forward call are
written at `cache.index`, a device tensor of positions. The attention mask is a 4-D (1, 1, T, max_len) device
tensor rebuilt from the position, so a decode step (one token in, logits out, position advanced) needs no
host value and no allocation that depends on the step: it can be captured once in a CUDA graph and replayed,
which removes the per-layer Python and kernel-launch overhead that dominates eager batch-1 decoding.

With a quantized KV mode the cache is static_kv.StaticQuantizedCache: the same interface, codes and scales
written at the index and dequantized for attention.

`StaticDecoder.prefill(prompt)` runs the prompt eagerly (its length varies); `step(token)` feeds one token.
With `graph=True` the first step captures the step (after two warm-up runs that write, then rewind, the same
cache slot the real step writes) and later steps replay it; a capture that fails is logged and the steps run
eagerly on the same static cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from modelpress.inference.kv_cache import KVCacheConfig

log = logging.getLogger(__name__)


class _StaticLayer(CacheLayerMixin):
    """Keys/values (B, H, max_len, D) of one attention layer, written at the owning cache's index tensor."""

    is_sliding = False
    is_compileable = True

    def __init__(self, owner: StaticCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states=None):
        b, h, _, d = key_states.shape
        shape = (b, h, self.owner.max_len, d)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.owner.index, key_states)
        self.values.index_copy_(2, self.owner.index, value_states)
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.owner.max_len

    def get_max_length(self, *args, **kwargs) -> int:
        return self.owner.max_len

    get_max_cache_shape = get_max_length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.owner.max_len, 0

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class StaticCache(Cache):
    """A static KV cache of `max_len` tokens per sequence (full attention only). `index` (a device tensor of
    positions, set by the caller) says where the keys/values of the tokens being run go; callers pass
    position ids and a 4-D attention mask over all `max_len` positions."""

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.index: torch.Tensor | None = None
        super().__init__(layers=[_StaticLayer(self) for _ in range(num_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return self.max_len

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


def num_decoder_layers(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


class StaticDecoder:
    """One batch-1 decode of at most `max_len` tokens (prompt included) on a StaticCache."""

    WARMUP_RUNS = 2

    def __init__(self, model: nn.Module, max_len: int, graph: bool, keep_last_only: bool = True,
                 kv_cache: KVCacheConfig | None = None) -> None:
        from modelpress.inference.static_kv import make_static_cache  # it builds on this module

        self.model, self.max_len, self.use_graph = model, max_len, graph
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        # float keys/values, or (kv_cache of a quantized mode) codes + scales dequantized as attention reads them
        self.cache = make_static_cache(num_decoder_layers(model), max_len, kv_cache)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.kv_arange = torch.arange(max_len, device=device)
        self.masked = torch.finfo(dtype).min
        self.mask = torch.zeros(1, 1, 1, max_len, dtype=dtype, device=device)
        self.extra = {"logits_to_keep": 1} if keep_last_only else {}
        self.logits: torch.Tensor | None = None  # (1, V) of the last step, float32; static under a graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Run the prompt; (1, V) float32 logits of its last token."""
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit a static cache of {self.max_len}")
        device = self.ids.device
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        positions = torch.arange(len(prompt), device=device)
        allowed = self.kv_arange[None, :] <= positions[:, None]  # (T, L): causal over the static buffer
        mask = torch.where(allowed, 0.0, self.masked).to(self.mask.dtype)[None, None]
        self.cache.index = positions
        out = self.model(input_ids=ids, position_ids=positions[None], attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, **self.extra).logits
        self.pos.fill_(len(prompt))
        return out[0, -1:].float()

    def step(self, token: int) -> torch.Tensor:
        """Feed `token` at the current position; (1, V) float32 logits (a static buffer under a graph: read
        it before the next step)."""
        self.ids.fill_(token)
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graph and self.graph_error is None:
            self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        else:
            self._step()
        return self.logits  # type: ignore[return-value]

    def _step(self) -> None:
        self.cache.index = self.pos[0]
        self.mask.copy_(torch.where(self.kv_arange <= self.pos[:, :, None, None], 0.0, self.masked))
        out = self.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask,
                         past_key_values=self.cache, use_cache=True, **self.extra).logits
        if self.logits is None:
            self.logits = torch.empty(1, out.shape[-1], dtype=torch.float32, device=out.device)
        self.logits.copy_(out[0, -1:])
        self.pos.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (each run writes the next cache slot, then the position is rewound, so the
        real step later writes the same values there), then capture one step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                for _ in range(self.WARMUP_RUNS):
                    self._step()
                    self.pos.sub_(1)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                self._step()  # recorded, not run: the position is still the real step's
        except Exception as err:  # noqa: BLE001  (any failure to capture means: run eagerly, and say why)
            torch.cuda.synchronize()
            self.graph_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            log.warning("decode step could not be captured in a CUDA graph (%s); decoding eagerly on the static "
                        "cache", self.graph_error)
            return
        self.graph = graph
