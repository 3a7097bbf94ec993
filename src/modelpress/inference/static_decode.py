"""Decoding on a static KV cache, the decode step replayed as a CUDA graph.

A static cache holds `max_len` slots per layer, allocated once; the tokens of each forward call are written at
`cache.index`, a device tensor of slots. The attention mask is a 4-D (B, 1, T, max_len) device tensor rebuilt
from the position, so a decode step (one token a row in, logits out, position advanced) needs no host value and
no allocation that depends on the step: it can be captured once in a CUDA graph and replayed, which removes the
per-layer Python and kernel-launch overhead that dominates eager small-batch decoding.

A batch of B prompts (`batch=B`, `prefill_rows`) is left-padded to the longest: every row writes the same slots
at each forward, so one slot index serves them all, and row b, padded by p_b slots, gives the token in slot s
the position s - p_b and shows it keys in slots p_b..s only. A padding slot's query sees itself alone (a row of
nothing but masked keys could make NaNs), and no real token sees a padding slot.

Sliding-window layers (Mistral, Qwen2/3 with windows, Gemma 2/3; `AttentionWindows`) keep every position in the
same buffers, and a second mask shows each of their queries only the last `window` positions: one mask for models
whose every layer slides, a dict by layer type for those that take one.

With a quantized KV mode the cache is static_kv.StaticQuantizedCache: the same interface, codes and scales
written at the index and dequantized for attention.

`StaticDecoder.prefill(prompt)` runs the prompt eagerly (its length varies); `step(token)` feeds one token;
`forward(tokens)` feeds T tokens and returns the logits of all T (speculative decoding's verify pass);
`prefill_rows` and `step_rows` are the same for a batch of rows;
`rewind(n)` moves the position back n tokens (rejected drafts). With `graph=True` the first forward of each
length T captures it (after a warm-up run that writes, then rewinds, the same cache slots the real forward
writes) and later forwards of that length replay it; a capture that fails is logged and the forwards run
eagerly on the same static cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from modelpress.nn.triton_kv import write_kv

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
        owner = self.owner
        if owner.fused_writes and not torch.compiler.is_compiling() and write_kv(
                self.keys, self.values, owner.index, key_states, value_states):
            owner.wrote_fused = True
        else:
            self.keys.index_copy_(2, owner.index, key_states)
            self.values.index_copy_(2, owner.index, value_states)
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.owner.max_len

    def copy_prefix(self, other: _StaticLayer, tokens: int) -> None:
        """The first `tokens` slots of `other` (a layer of another cache of this kind) copied here."""
        if not self.is_initialized:
            self.lazy_initialization(other.keys)
        self.keys[:, :, :tokens] = other.keys[:, :, :tokens]
        self.values[:, :, :tokens] = other.values[:, :, :tokens]

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
    """A static KV cache of `max_len` tokens per sequence (every position kept; StaticDecoder's masks apply any
    sliding window). `index` (a device tensor of
    positions, set by the caller) says where the keys/values of the tokens being run go; callers pass
    position ids and a 4-D attention mask over all `max_len` positions. fused_writes: write each layer's keys and
    values in one kernel (nn/triton_kv.py) where it serves, instead of two index_copy_ calls (the same bytes)."""

    def __init__(self, num_layers: int, max_len: int, fused_writes: bool = False) -> None:
        self.max_len = max_len
        self.index: torch.Tensor | None = None
        self.fused_writes = fused_writes
        self.wrote_fused = False  # whether the kernel wrote (it may not serve every call)
        super().__init__(layers=[_StaticLayer(self) for _ in range(num_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return self.max_len

    @property
    def keeps_positions(self) -> bool:
        """Each slot holds the keys and values of the token last written there until it is written again."""
        return True

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


def num_decoder_layers(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


# transformers families whose sliding-window layers the static decoder masks: those that take a dict of masks by
# layer type, and those that apply one sliding mask to every layer (a 4-D mask passes through as given)
MASK_MAPPING_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "qwen2_moe"})
ONE_WINDOW_TYPES = frozenset({"mistral", "mixtral"})


@dataclass(frozen=True)
class AttentionWindows:
    """How a model's layers attend, as the static decoder must mask them: `window` (tokens a sliding layer sees,
    itself included) or None for full attention everywhere; `mapping`: the model takes a dict of masks keyed by
    layer type, else one mask for every layer; `obstacle`: why the static decoder cannot mask it, or None."""

    window: int | None = None
    mapping: bool = False
    obstacle: str | None = None

    @classmethod
    def of(cls, model_config) -> AttentionWindows:
        text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") \
            else model_config
        kind = getattr(text, "model_type", "")
        layer_types = list(getattr(text, "layer_types", None) or [])
        window = getattr(text, "sliding_window", None)
        other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if other:
            return cls(obstacle=f"this model has {', '.join(other)} layers (the static cache masks full and "
                                f"sliding-window attention only)")
        if "sliding_attention" in layer_types and window is not None:
            if kind not in MASK_MAPPING_TYPES:
                return cls(obstacle=f"this {kind or 'model'} has sliding-window layers, which the static cache "
                                    f"masks for {', '.join(sorted(MASK_MAPPING_TYPES))} only")
            return cls(int(window), mapping=True)
        if not layer_types and window is not None and getattr(text, "use_sliding_window", True):
            if kind not in ONE_WINDOW_TYPES:
                return cls(obstacle=f"this {kind or 'model'} has sliding_window={window}, which the static cache "
                                    f"masks for {', '.join(sorted(ONE_WINDOW_TYPES | MASK_MAPPING_TYPES))} only")
            return cls(int(window))
        return cls()


@dataclass
class _Block:
    """The static device buffers of a T-token forward (one set per T, so the graph captured for T replays on
    the same addresses)."""

    ids: torch.Tensor        # (B, T) token ids, filled in place before each run
    offsets: torch.Tensor    # (T,) 0..T-1
    slots: torch.Tensor      # (T,) pos..pos+T-1, computed on the device from the decoder's position
    positions: torch.Tensor  # (B, T) each row's positions: the slots less the row's padding
    mask: torch.Tensor       # (B, 1, T, max_len): 0 where a query may attend, the dtype's minimum elsewhere
    window_mask: torch.Tensor | None = None  # the same for sliding-window layers, if the model has them
    logits: torch.Tensor | None = None  # (B, T, V) float32, allocated by the first (eager) run
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecoder:
    """One decode of `batch` rows of at most `max_len` slots each (prompt and padding included) on a
    StaticCache."""

    # eager runs before a capture: one initializes what a first call does lazily (cuBLAS workspaces, Triton
    # launchers); a compiled forward gets a second, so that a recompilation it triggers happens outside the capture
    WARMUP_RUNS = 1
    COMPILED_WARMUP_RUNS = 2
    COMPILE_LENGTH_STEP = 256  # with compile=True, max_len is rounded up to a multiple of this

    def __init__(self, model: nn.Module, max_len: int, graph: bool, keep_last_only: bool = True,
                 kv_cache: KVCacheConfig | None = None, compile: bool = False, fused_writes: bool = False,
                 batch: int = 1, cache: StaticCache | None = None) -> None:
        from modelpress.inference.static_kv import make_static_cache  # it builds on this module

        if batch < 1:
            raise ValueError(f"a batch needs at least one row, got {batch}")
        # compiled forwards are specialized to the cache length: round it up, so that calls of nearby lengths
        # reuse one compilation (and stay under dynamo's recompilation limit)
        max_len = -(-max_len // self.COMPILE_LENGTH_STEP) * self.COMPILE_LENGTH_STEP if compile else max_len
        self.model, self.max_len, self.use_graph = model, max_len, graph
        # the T-token forwards (not the prefill, whose length varies) through torch.compile if asked: one
        # compilation per T and cache length
        self.forward_model = torch.compile(model, dynamic=False) if compile else model
        self.compile_error: str | None = None
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        # float keys/values, or (kv_cache of a quantized mode) codes + scales dequantized as attention reads them;
        # or another decoder's cache, shared (a self-speculative draft reads its target's: the caller keeps the two
        # positions consistent, and kv_cache and fused_writes are the owner's)
        if cache is not None and (cache.max_len != max_len or len(cache.layers) != num_decoder_layers(model)):
            raise ValueError(f"a shared static cache of {len(cache.layers)} layers x {cache.max_len} slots for a "
                             f"decoder of {num_decoder_layers(model)} x {max_len}")
        self.cache_owner = None  # the decoder whose cache this one reads, where its builder shares one
        from modelpress.inference.fusion import reads_kv_codes

        if cache is None:
            cache = make_static_cache(num_decoder_layers(model), max_len, kv_cache, fused_writes=fused_writes,
                                      read_codes=reads_kv_codes(model, kv_cache))
        elif getattr(cache, "read_codes", False) and not reads_kv_codes(model, cache.config):
            raise ValueError("a shared int8 cache that hands attention its codes, for a model whose attention does "
                             "not read them (speculative.shared_cache_obstacle says so first)")
        self.cache = cache
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # the next slot, on the device
        self.position = 0  # the same slot on the host (no device sync to read it)
        self.batch = batch
        self.pads = torch.zeros(batch, dtype=torch.long, device=self.device)  # each row's left padding
        self.kv_arange = torch.arange(max_len, device=self.device)
        self.masked = torch.finfo(dtype).min
        self.mask_dtype = dtype
        self.windows = AttentionWindows.of(model.config)
        self.extra = {"logits_to_keep": 1} if keep_last_only else {}  # prefill only: forwards return every row
        self.blocks: dict[int, _Block] = {}
        self.graph_error: str | None = None
        self.captures = self.replays = 0
        self.capture_seconds = 0.0  # warm-up and capture time, device work included

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured single-token step, if any."""
        block = self.blocks.get(1)
        return block.graph if block is not None else None

    @property
    def path(self) -> str:
        """static, or graph while graphs are wanted and none has failed to capture."""
        return "graph" if self.use_graph and self.graph_error is None else "static"

    @property
    def keeps_prefix(self) -> bool:
        """Whether the keys and values a generation wrote stay readable for the next one: each slot holds its
        own token's until a forward writes it again (not so where a quantized cache keeps a float window and
        re-quantizes it from a ring)."""
        return self.cache.keeps_positions

    def prefill(self, prompt: list[int], start: int = 0) -> torch.Tensor:
        """Run the prompt from position `start` (a decoder of one row); (1, V) float32 logits of its last token.
        start > 0: the slots before it hold the keys and values of prompt[:start] (the prefix a DecodeSession's
        earlier generation left, `keeps_prefix`), and only the rest is run."""
        return self.prefill_rows([prompt], start)

    def prefill_rows(self, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        """Run one prompt a row, left-padded to the longest (the padding's token is the row's first, never
        seen); (B, V) float32 logits of each row's last token. `start`: as prefill's (one row only)."""
        if len(prompts) != self.batch:
            raise ValueError(f"{len(prompts)} prompts for a decoder of {self.batch} rows")
        width = max(len(p) for p in prompts)
        if width >= self.max_len:
            raise ValueError(f"prompt of {width} tokens does not fit a static cache of {self.max_len}")
        if min(len(p) for p in prompts) == 0:
            raise ValueError("a prompt of the batch is empty")
        if start and not (self.batch == 1 and 0 < start < width):
            raise ValueError(f"a prefill from position {start} takes one row of more than {start} tokens")
        ids = torch.tensor([[p[0]] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long,
                           device=self.device)[:, start:]
        self.pads.copy_(torch.tensor([width - len(p) for p in prompts]))
        slots = torch.arange(start, width, device=self.device)

        def empty():
            return torch.empty(self.batch, 1, width - start, self.max_len, dtype=self.mask_dtype,
                               device=self.device)

        mask = self._masks(empty(), empty() if self.windows.window else None, slots)
        self.cache.index = slots
        out = self.model(input_ids=ids, position_ids=(slots[None] - self.pads[:, None]).clamp_(min=0),
                         attention_mask=mask, past_key_values=self.cache, use_cache=True, **self.extra).logits
        self.pos.fill_(width)
        self.position = width
        return out[:, -1].float()

    def step(self, token: int) -> torch.Tensor:
        """Feed `token` at the current position; (1, V) float32 logits (a static buffer: read it before the
        next step)."""
        return self.forward([token])

    def step_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token a row, (B,) int64 on the device, at the current position; (B, V) float32 logits (a view
        of a static buffer: read it before the next step)."""
        return self.forward_rows(tokens.view(self.batch, 1))[:, 0]

    def forward(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed T tokens at positions pos..pos+T-1 (a decoder of one row) and advance the position by T; (T, V)
        float32 logits of every position (a static buffer, one per T: read it before the next forward of the same
        length). With graphs, the first forward of each length captures it and every forward replays. `tokens`
        may be a (T,) int64 tensor on the device (a token drawn there): then nothing waits for the device."""
        if self.batch != 1:
            raise ValueError(f"forward feeds one row; this decoder has {self.batch} (use forward_rows)")
        ids = tokens.view(1, -1) if isinstance(tokens, torch.Tensor) else torch.tensor([tokens], dtype=torch.long)
        return self.forward_rows(ids)[0]

    def forward_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """forward for every row: (B, T) token ids (on the device, or on the host) -> (B, T, V) float32 logits."""
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"token ids of shape {tuple(ids.shape)} for a decoder of {self.batch} rows")
        t = ids.shape[1]
        if t == 0:
            raise ValueError("a forward needs at least one token, got none")
        if self.position + t > self.max_len:
            raise ValueError(f"{t} tokens at position {self.position} overrun the static cache of {self.max_len}")
        block = self._block(t)
        block.ids.copy_(ids)
        if block.graph is None and self.use_graph and self.graph_error is None:
            block.graph = self._capture(block)
        if block.graph is not None:
            block.graph.replay()
            self.replays += 1
        else:
            self._run(block)
        self.position += t
        return block.logits  # type: ignore[return-value]

    def rewind(self, tokens: int) -> None:
        """Move the position back by `tokens` (rejected speculative tokens). Their keys/values stay in the
        buffer but are never read: each query's mask admits only slots at or before its own position, and a
        forward writes its own slots (pos..pos+T-1) before attending, so a stale slot is masked out until the
        forward that reaches it overwrites it."""
        if not 0 <= tokens <= self.position:
            raise ValueError(f"cannot rewind {tokens} tokens from position {self.position}")
        self.position -= tokens
        self.pos.fill_(self.position)  # a kernel argument, no sync

    def rewind_device(self, tokens: torch.Tensor) -> None:
        """Move the device position back by `tokens`, a (1,) int64 count on the device (a verdict the host has not
        read): nothing waits. The host position stays where it was, an upper bound that bounds-checks the forwards
        queued meanwhile, until settle() lowers it by the same count once the host knows it."""
        self.pos.sub_(tokens)

    def settle(self, tokens: int) -> None:
        """Lower the host position by `tokens`, the count a rewind_device moved the device position back by."""
        if not 0 <= tokens <= self.position:
            raise ValueError(f"cannot settle {tokens} tokens from position {self.position}")
        self.position -= tokens

    def follow(self, other: StaticDecoder) -> None:
        """Take `other`'s position, device and host, without waiting (a decoder sharing other's cache)."""
        self.pos.copy_(other.pos)
        self.position = other.position

    def restart(self) -> None:
        """Back to an empty sequence, keeping the cache's buffers and the captured graphs (a DecodeSession's next
        generation): the slots the last one wrote are masked until a forward of the next overwrites them, as after a
        rewind. The capture counters restart too: they count one generation's."""
        self.position = 0
        self.pos.zero_()
        self.pads.zero_()
        self.captures = self.replays = 0
        self.capture_seconds = 0.0

    def take_prefix(self, other: StaticDecoder, tokens: int) -> None:
        """Copy the keys and values of `other`'s first `tokens` slots into this cache (a DecodeSession's decoder
        rebuilt longer keeps what its predecessor held); both caches of one model and mode, keeping positions."""
        if not (self.cache.keeps_positions and other.cache.keeps_positions and type(self.cache) is type(other.cache)
                and len(self.cache.layers) == len(other.cache.layers) and self.batch == other.batch == 1):
            raise ValueError("the prefix of a static decoder of another model, cache mode or batch")
        if not 0 <= tokens <= min(self.max_len, other.max_len):
            raise ValueError(f"{tokens} slots of a cache of {other.max_len} for one of {self.max_len}")
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if theirs.is_initialized:
                mine.copy_prefix(theirs, tokens)

    def move_to(self, position: int) -> None:
        """Set the position (a decoder sharing another's cache follows that decoder's position: the slots before it
        hold the owner's keys and values)."""
        if not 0 <= position < self.max_len:
            raise ValueError(f"position {position} is outside the static cache of {self.max_len}")
        self.position = position
        self.pos.fill_(position)

    def _block(self, t: int) -> _Block:
        if t not in self.blocks:
            b = self.batch
            self.blocks[t] = _Block(
                ids=torch.zeros(b, t, dtype=torch.long, device=self.device),
                offsets=torch.arange(t, device=self.device),
                slots=torch.zeros(t, dtype=torch.long, device=self.device),
                positions=torch.zeros(b, t, dtype=torch.long, device=self.device),
                mask=torch.zeros(b, 1, t, self.max_len, dtype=self.mask_dtype, device=self.device),
                window_mask=torch.zeros(b, 1, t, self.max_len, dtype=self.mask_dtype, device=self.device)
                if self.windows.window else None)
        return self.blocks[t]

    def _mask_values(self, mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Fill the additive mask (B, 1, T, L) in place from `allowed` (B, T, L): 0, or the dtype's minimum."""
        return mask.zero_().masked_fill_(~allowed[:, None], self.masked)

    def _masks(self, mask: torch.Tensor, window_mask: torch.Tensor | None, slots: torch.Tensor):
        """The attention mask argument for queries in `slots` (T,), filled in place: each query sees itself and
        its row's past over the static buffer (none of the row's padding; a padding query itself alone); a sliding
        layer only the last `window` of those (transformers' rule: key > query - window). One mask, or a dict by
        layer type for models that take one."""
        keys, queries = self.kv_arange[None, None, :], slots[None, :, None]
        allowed = ((keys <= queries) & (keys >= self.pads[:, None, None])) | (keys == queries)  # (B, T, L)
        self._mask_values(mask, allowed)
        if window_mask is None:
            return mask
        window = self.windows.window
        self._mask_values(window_mask, allowed & (keys > queries - window))
        if self.windows.mapping:
            return {"full_attention": mask, "sliding_attention": window_mask}
        return window_mask  # every layer slides

    def _run(self, block: _Block) -> None:
        """One forward of the block's tokens at the device position: no host value and no shape that depends on
        the position, so it can be captured once and replayed at any position."""
        block.slots.copy_(self.pos + block.offsets)
        block.positions.copy_(block.slots[None] - self.pads[:, None])
        self.cache.index = block.slots
        mask = self._masks(block.mask, block.window_mask, block.slots)
        out = self._call_model(input_ids=block.ids, position_ids=block.positions, attention_mask=mask,
                               past_key_values=self.cache, use_cache=True).logits  # (B, T, V)
        if block.logits is None:
            block.logits = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        block.logits.copy_(out)
        self.pos.add_(block.ids.shape[1])

    def _call_model(self, **inputs):
        """The model on `inputs`, compiled if asked; a compilation that fails (no C++ compiler for inductor on the
        CPU, an operator it cannot lower) is logged once and the model runs uncompiled from then on. A failed
        compiled call is simply repeated uncompiled: a forward only writes the cache slots it owns."""
        if self.forward_model is not self.model:
            try:
                return self.forward_model(**inputs)
            except Exception as err:  # noqa: BLE001  (compilation is an optimization: never a reason to fail)
                self.compile_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                log.warning("torch.compile of the decode forward failed (%s); running it uncompiled",
                            self.compile_error)
                self.forward_model = self.model
        return self.model(**inputs)

    def _capture(self, block: _Block) -> torch.cuda.CUDAGraph | None:
        """Warm up on a side stream (each run writes the block's cache slots, then the position is rewound, so
        the real forward later writes the same values there), then capture one run; None (reason logged, and
        no further captures) if that fails."""
        t = block.ids.shape[1]
        torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                compiled = self.forward_model is not self.model
                for _ in range(self.COMPILED_WARMUP_RUNS if compiled else self.WARMUP_RUNS):
                    self._run(block)
                    self.pos.sub_(t)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            with torch.cuda.graph(graph):
                self._run(block)  # recorded, not run: the position is still the real forward's
        except Exception as err:  # noqa: BLE001  (any failure to capture means: run eagerly, and say why)
            torch.cuda.synchronize(self.device)
            self.pos.fill_(self.position)  # whatever the failed warm-up left there
            self.graph_error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            log.warning("a %d-token forward could not be captured in a CUDA graph (%s); running eagerly on the "
                        "static cache", t, self.graph_error)
            return None
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - began
        self.captures += 1
        return graph
