"""Decoding on the CPU with the whole decode step in native code (nn/cpu_step.c): one foreign call per token runs
every block of a Llama-style decoder on the model's own weights (packed weights through the native kernels of
nn/cpu_gemv.c, float32 ones through a float32 GEMV), where the eager path runs ~30 PyTorch operators per block.

`native_obstacle(model)` says why a model cannot take this path (or None); `NativeDecoder` has the interface of
StaticDecoder: prefill(prompt), step(token) -> (1, V) and forward(tokens) -> (T, V) float32 logits, rewind(n)
(so speculative decoding drives it too). A prompt of up to NATIVE_PREFILL_TOKENS is one native call too; a
longer one runs through the model itself (transformers, with a cache of the decoder's mode, its batched
kernels), and its keys and values are copied into the decoder's own cache; each new token then takes one
`mp_forward` call, the output head included where it is an nn.Linear or a QuantLinear the native kernels serve
(else the model's own head runs on the final hidden states); the embedding stays the model's own module (float,
quantized or tied), one call per token. A forward call (one token or several) splits each projection's rows over
torch.get_num_threads() threads (nn/cpu_step.c's pool; the same numbers at any thread count).

The KV cache is float32, or (kv_cache="int8") the eager path's `int8` mode (kv_cache.py): int8 codes and a
float16-exact scale per token and key/value head, each token quantized as it is written and attended to as
codes times scale, at a quarter of the float32 cache's bytes.

Served: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM and
Gemma3ForCausalLM (text) in float32 on the CPU, with full or sliding-window attention per layer (each layer's
window as transformers masks it; Gemma 3's sliding layers with their own rope table), a rope whose frequencies do
not depend on the sequence length (default, linear, llama3, yarn: the model's rotary module computes the table),
SiLU MLPs (Gemma: GELU's tanh approximation, norms of 1 + w around attention and MLP, soft-capped attention
scores and logits), every projection an nn.Linear or a QuantLinear the native kernels serve (4- and 8-bit
formats; int3 and others are not). The int8 cache is for full-attention models only, as on the eager path. The
numbers are those of the eager path with the CPU kernels (bfloat16 products for int4 and int16 x for 8-bit integer
codes where the CPU has them, exact float32 for the other formats) up to the order of float32 additions.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from modelpress.errors import ModelpressError
from modelpress.inference.kv_cache import KVCacheConfig, make_kv_cache
from modelpress.nn import cpu_native
from modelpress.nn.cpu_backend import CPU_BACKEND
from modelpress.nn.quant_linear import QuantLinear

# transformers classes whose decoder layer cpu_step.c computes
FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2", "Gemma3")
GEMMA = ("Gemma2", "Gemma3")   # norms multiply by 1 + w, post-norms of the attention and MLP outputs, GELU (tanh)
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}   # the MLP's activation -> cpu_step.c's MP_ACT_*
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # frequencies fixed for every sequence length
PROJECTIONS = (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
               ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
               ("down", "mlp.down_proj"))
# prompts of up to this many tokens are prefilled by the native step: as fast as transformers' forward there
# (default model, one thread: 29 vs 42 ms at 8 tokens, 122 vs 110 at 32; 478 vs 419 at 128), and no prepared
# layouts of PyTorch's kernels are built for them
NATIVE_PREFILL_TOKENS = 32
# KV caches the step keeps: float32 states, or kv_cache.py's `int8` mode (codes and a float16-exact scale per token
# and head, every token quantized as it arrives: the codes of the eager path's QuantizedKVCache)
NATIVE_KV_MODES = ("float", "int8")
STATUS = {-1: "no scratch memory", -2: "a packed weight's groups are not served", -3: "position past the cache",
          -4: "projection shapes that do not fit a decoder block", -5: "no logits buffer for the head",
          -6: "a block without its KV cache"}


class Linear(ctypes.Structure):
    """cpu_step.c's mp_linear"""

    _fields_ = [("packed", ctypes.POINTER(cpu_native.Weight)), ("weight", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("perm", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class Block(ctypes.Structure):
    """cpu_step.c's mp_block"""

    _fields_ = [(name, Linear) for name, _ in PROJECTIONS] + [
        (name, ctypes.c_void_p) for name in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "k_cache", "v_cache",
                                             "k_codes", "v_codes", "k_scales", "v_scales")] + [
        ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("post_attn_norm", "post_mlp_norm", "cos", "sin")] + [
        ("window", ctypes.c_int64)]


class Decoder(ctypes.Structure):
    """cpu_step.c's mp_decoder"""

    _fields_ = [("blocks", ctypes.POINTER(Block)), ("final_norm", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("work", ctypes.c_void_p), ("n_blocks", ctypes.c_int64),
                ("hidden", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("capacity", ctypes.c_int64),
                ("eps", ctypes.c_float), ("scaling", ctypes.c_float), ("products", ctypes.c_int32),
                ("threads", ctypes.c_int32), ("head", Linear), ("logits", ctypes.c_void_p),
                ("logits_from", ctypes.c_int64), ("act", ctypes.c_int32), ("attn_softcap", ctypes.c_float),
                ("logit_softcap", ctypes.c_float)]


def _family(model: nn.Module) -> str | None:
    name = type(model).__name__
    for family in FAMILIES:
        if name == f"{family}ForCausalLM":
            return family
    return None


def _float32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu")


def _plan(module: QuantLinear) -> cpu_native.NativePlan | None:
    """The layer's native plan, as the CPU backend caches it (built once per packed weight)."""
    return CPU_BACKEND.native_plan(module._packed_view())


def _projection_obstacle(name: str, module: nn.Module) -> str | None:
    if isinstance(module, QuantLinear):
        if _plan(module) is None:
            return f"{name} is {module.scheme.spec}, which the native kernels do not serve"
        return None if _float32(module.bias) else f"{name}'s bias is not float32"
    if type(module) is nn.Linear:
        return None if _float32(module.weight) and _float32(module.bias) else f"{name} is not float32 on the CPU"
    return f"{name} is a {type(module).__name__}, not an nn.Linear or a QuantLinear"


def _norm_eps(norm: nn.Module, family: str) -> float | None:
    if type(norm).__name__ != f"{family}RMSNorm" or not _float32(norm.weight):
        return None
    return float(norm.eps if family in GEMMA else norm.variance_epsilon)


def _norms(layer: nn.Module, family: str) -> dict[str, nn.Module | None]:
    """The block's norms by the step's names (mp_block): Llama-style layers norm the attention's and the MLP's inputs;
    Gemma's also their outputs (its post_attention_layernorm is the attention output's, pre_feedforward_layernorm
    the MLP input's)."""
    attention = layer.self_attn
    heads = {name: getattr(attention, name, None) for name in ("q_norm", "k_norm")}
    if family in GEMMA:
        return {"attn_norm": layer.input_layernorm, "post_attn_norm": layer.post_attention_layernorm,
                "mlp_norm": layer.pre_feedforward_layernorm, "post_mlp_norm": layer.post_feedforward_layernorm,
                **heads}
    return {"attn_norm": layer.input_layernorm, "mlp_norm": layer.post_attention_layernorm, "post_attn_norm": None,
            "post_mlp_norm": None, **heads}


def _norm_weight(norm: nn.Module, family: str) -> torch.Tensor:
    """What the step multiplies the normed vector by: the weight, or 1 + weight for Gemma's norms."""
    return norm.weight.detach() + 1 if family in GEMMA else norm.weight


def _activation(config, family: str) -> str | None:
    return getattr(config, "hidden_activation" if family in GEMMA else "hidden_act", None)


def _window(layer: nn.Module, config) -> int:
    """The positions a block attends to (0: all): transformers' layers name their own sliding window (None for a
    full-attention layer); Mistral's take the config's for every layer."""
    attention = layer.self_attn
    window = attention.sliding_window if hasattr(attention, "sliding_window") else getattr(config, "sliding_window",
                                                                                           None)
    return int(window or 0)


def _layer_rope(layer: nn.Module, family: str) -> str | None:
    """The rope table a block rotates with: Gemma 3's layer type (its sliding layers have their own base), else the
    model's one table (None)."""
    return layer.self_attn.layer_type if family == "Gemma3" else None


def _rope_types(rotary: nn.Module) -> set[str]:
    kinds = getattr(rotary, "rope_type", "default")
    return set(kinds.values()) if isinstance(kinds, dict) else {kinds}


def native_obstacle(model: nn.Module) -> str | None:
    """Why `model` cannot decode on the native step, or None if it can (the library is built on the first call)."""
    family = _family(model)
    if family is None:
        return f"{type(model).__name__} is not one of the decoders it computes ({', '.join(FAMILIES)})"
    if model.training:
        return "the model is in training mode (the step has no dropout): call model.eval()"
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= {"full_attention", "sliding_attention"}:
        return f"the model has attention layers of kinds {sorted(layer_types)}"
    activation, wanted = _activation(config, family), "gelu_pytorch_tanh" if family in GEMMA else "silu"
    if activation != wanted:
        name = "hidden_activation" if family in GEMMA else "hidden_act"
        return f"{name} is {activation!r}, not {wanted!r}"
    inner = model.model
    for rope in _rope_types(inner.rotary_emb):
        if rope not in STATIC_ROPE:
            return f"rope type {rope!r} changes its frequencies with the sequence length"
    if family in GEMMA and not type(inner.embed_tokens).__name__.endswith("ScaledWordEmbedding"):
        return f"its embedding is a {type(inner.embed_tokens).__name__}, not Gemma's scaled one"
    epsilons = {_norm_eps(inner.norm, family)}
    shapes = {(float(layer.self_attn.scaling), int(layer.self_attn.head_dim)) for layer in inner.layers}
    if len(shapes) != 1:
        return "its layers' attention scalings or head sizes differ"
    for i, layer in enumerate(inner.layers):
        if type(layer).__name__ != f"{family}DecoderLayer":
            return f"layer {i} is a {type(layer).__name__}"
        attention = layer.self_attn
        if type(attention).__name__ != f"{family}Attention" or type(layer.mlp).__name__ != f"{family}MLP":
            return f"layer {i}'s attention or MLP was replaced"
        for _, path in PROJECTIONS:
            reason = _projection_obstacle(f"layer {i} {path}", layer.get_submodule(path))
            if reason is not None:
                return reason
        epsilons.update(_norm_eps(norm, family) for norm in _norms(layer, family).values() if norm is not None)
    if None in epsilons or len(epsilons) != 1:
        return "its RMSNorms are not all float32 with one epsilon"
    if not cpu_native.available():
        return "the native CPU library is not available (see the log)"
    return None


class NativeDecoder:
    """Batch-1 decoding of `model` (native_obstacle(model) must be None) for up to `capacity` positions."""

    path = "native"
    capture_seconds = 0.0

    device = torch.device("cpu")

    def __init__(self, model: nn.Module, capacity: int, products: str = "bfloat16", threads: int | None = None,
                 kv_cache: str = "float", shared: NativeDecoder | None = None) -> None:
        """shared: another decoder whose KV cache this one reads and writes (a self-speculative draft on its
        target's: the caller keeps the positions consistent); kv_cache is then that decoder's."""
        reason = native_obstacle(model)
        if reason is not None:
            raise ModelpressError(f"the native decode step cannot run this model: {reason}")
        if kv_cache not in NATIVE_KV_MODES:
            raise ModelpressError(f"the native decode step keeps a {' or '.join(NATIVE_KV_MODES)} KV cache, "
                                  f"not {kv_cache!r}")
        family = _family(model)
        windows = [_window(layer, model.config) for layer in model.model.layers]
        if kv_cache != "float" and any(windows):
            raise ModelpressError(f"the native decode step keeps an {kv_cache} KV cache for full-attention models "
                                  f"only; this one has sliding-window layers")
        if shared is not None and (shared.capacity, shared.kv_cache, len(shared.caches)) != \
                (int(capacity), kv_cache, len(model.model.layers)):
            raise ModelpressError(f"a shared native cache of {len(shared.caches)} blocks x {shared.capacity} "
                                  f"positions ({shared.kv_cache}) for a decoder of {len(model.model.layers)} x "
                                  f"{capacity} ({kv_cache})")
        self.cache_owner = None  # the decoder whose cache this one reads, where its builder shares one
        self.model, self.capacity, self.position, self.kv_cache = model, int(capacity), 0, kv_cache
        self.lib = cpu_native.library()
        inner = model.model
        self._keep: list = []   # every tensor and plan whose address the C structs hold
        blocks = (Block * len(inner.layers))()
        head_dim = int(inner.layers[0].self_attn.head_dim)   # every layer's (native_obstacle checks)
        self.caches: list[tuple] = []   # each block's (keys, values): tensors, or (codes, scales) pairs for int8
        self._cache_tensors: list[torch.Tensor] = []   # every tensor of self.caches
        tables = {kind: tuple(self._tensor(t) for t in self._rope_table(kind))
                  for kind in dict.fromkeys(_layer_rope(layer, family) for layer in inner.layers)}
        for i, (block, layer, window) in enumerate(zip(blocks, inner.layers, windows)):
            for name, path in PROJECTIONS:
                setattr(block, name, self._linear(layer.get_submodule(path)))
            block.heads, block.kv_heads = block.q.n // head_dim, block.k.n // head_dim
            for name, norm in _norms(layer, family).items():
                setattr(block, name, None if norm is None else self._tensor(_norm_weight(norm, family)))
            block.cos, block.sin = tables[_layer_rope(layer, family)]
            block.window = window
            self.caches.append(self._cache(block, head_dim, None if shared is None else shared.caches[i]))
        self.blocks = blocks
        hidden = inner.norm.weight.numel()
        cos, sin = next(iter(tables.values()))
        config = model.config
        self.logit_softcap = float(getattr(config, "final_logit_softcapping", None) or 0)
        decoder = Decoder(blocks=blocks, final_norm=self._tensor(_norm_weight(inner.norm, family)), cos=cos, sin=sin,
                          work=None, n_blocks=len(blocks), hidden=hidden, head_dim=head_dim, capacity=self.capacity,
                          eps=_norm_eps(inner.norm, family), scaling=float(inner.layers[0].self_attn.scaling),
                          products=cpu_native.PRODUCTS[products], act=ACTIVATIONS[_activation(config, family)],
                          attn_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0),
                          logit_softcap=self.logit_softcap)
        self.head_native = _projection_obstacle("the head", model.lm_head) is None
        if self.head_native:   # else the model's own head module runs on the final hidden states
            decoder.head = self._linear(model.lm_head)
        status = self.lib.mp_check(ctypes.byref(decoder))
        if status != 0:
            raise ModelpressError(f"the native decode step refused the model: {STATUS.get(status, status)}")
        self.decoder = decoder
        self.threads = threads   # None: torch.get_num_threads() at each call
        self.work_tokens = 0   # tokens a forward call's scratch (decoder.work) is sized for
        self._reserve(1)

    # ---- building the structs ----

    def _tensor(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _cache(self, block: Block, head_dim: int, shared: tuple | None = None) -> tuple:
        """The block's (keys, values) cache, or the `shared` one of another decoder's block, its addresses set in
        `block`."""
        shape = (block.kv_heads, self.capacity, head_dim)
        if shared is not None:
            tensors = shared if self.kv_cache == "float" else (*shared[0], *shared[1])
            if tensors[0].shape != shape:
                raise ModelpressError(f"a shared native cache block of shape {tuple(tensors[0].shape)} for a block "
                                      f"of {shape}")
        if self.kv_cache == "float":
            keys, values = shared or (torch.zeros(shape), torch.zeros(shape))
            block.k_cache, block.v_cache = self._tensor(keys), self._tensor(values)
            self._cache_tensors += [keys, values]
            return keys, values
        keys, values = shared or ((torch.zeros(shape, dtype=torch.int8), torch.ones(shape[:2])),
                                  (torch.zeros(shape, dtype=torch.int8), torch.ones(shape[:2])))
        block.k_codes, block.k_scales = (self._tensor(t) for t in keys)
        block.v_codes, block.v_scales = (self._tensor(t) for t in values)
        self._cache_tensors += [*keys, *values]
        return keys, values

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache holds (all `capacity` positions)."""
        return sum(t.numel() * t.element_size() for t in self._cache_tensors)

    def _linear(self, module: nn.Module) -> Linear:
        n, k = module.out_features, module.in_features
        linear = Linear(n=n, k=k, bias=self._tensor(module.bias))
        if isinstance(module, QuantLinear):
            plan = _plan(module)
            self._keep.append(plan)
            linear.packed = ctypes.pointer(plan.weight)
            if plan.input_perm is not None:
                linear.perm = self._tensor(plan.input_perm.to(torch.int64))
        else:
            linear.weight = self._tensor(module.weight)
        return linear

    def _rope_table(self, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (capacity, head_dim) from the model's own rotary module, for positions 0..capacity-1 (of
        `layer_type`'s rope, for a module that has one per layer type)."""
        positions = torch.arange(self.capacity).unsqueeze(0)
        args = () if layer_type is None else (layer_type,)
        cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions, *args)
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    # ---- decoding ----

    keeps_prefix = True  # StaticDecoder's: every position's keys and values stay until that position is run again

    def prefill(self, prompt: list[int], start: int = 0) -> torch.Tensor:
        """The prompt from position `start`: (1, V) logits of its last position. start > 0: the cache holds the keys
        and values of prompt[:start] (a DecodeSession's earlier generation). Up to NATIVE_PREFILL_TOKENS tokens run in
        one native call; more through the model itself (transformers' batched forward, faster there, on a cache of
        this decoder's mode holding the first `start` positions: an int8 one attends to the quantized states, as the
        step does), their keys and values then copied into this cache."""
        from modelpress.inference.decoding import forward_logits

        n = len(prompt)
        if n > self.capacity:
            raise ModelpressError(f"the prompt has {n} tokens; the cache holds {self.capacity}")
        if start and not 0 < start < n:
            raise ValueError(f"a prefill from position {start} needs a prompt of more than {start} tokens")
        self.position = start
        if n - start <= NATIVE_PREFILL_TOKENS:
            return self.forward(prompt[start:], last_only=True)
        # float: a cache of whole layers, also where the model slides a window (the masks apply it): this cache then
        # holds every position, so a later prompt may reuse any prefix of it (decoder_pool.py)
        cache = (DynamicCache() if self.kv_cache == "float"
                 else make_kv_cache(self.model, KVCacheConfig(self.kv_cache, residual_length=0)))
        if start:
            self._preload(cache, start)
        logits = forward_logits(self.model, prompt[start:], cache, last_only=True)[-1:]
        for (keys, values), layer in zip(self.caches, cache.layers):
            if self.kv_cache == "float":
                keys[:, start:n] = layer.keys[0, :, start:].float()
                values[:, start:n] = layer.values[0, :, start:].float()
                continue
            for (codes, scales), stored in zip((keys, values), layer.stored):   # offset-binary uint8 -> int8
                codes[:, start:n] = (stored.qdata[0, :, start:n].to(torch.int16) - 128).to(torch.int8)
                scales[:, start:n] = stored.scale[0, :, start:n, 0].float()
        self.position = n
        return logits

    def _preload(self, cache, tokens: int) -> None:
        """Put the keys and values of this cache's first `tokens` positions into `cache`, transformers' cache of
        this decoder's mode (int8: the same codes and float16-exact scales, as QuantizedStates)."""
        from modelpress.inference.kv_quant import QuantizedStates

        dtype = self.model.get_input_embeddings().weight.dtype
        for i, (keys, values) in enumerate(self.caches):
            if self.kv_cache == "float":   # a DynamicCache of no config makes its layers as they are updated
                cache.update(keys[None, :, :tokens].to(dtype), values[None, :, :tokens].to(dtype), i)
                continue
            layer = cache.layers[i]
            probe = torch.empty(1, keys[0].shape[0], 0, keys[0].shape[2], dtype=dtype)
            layer.lazy_initialization(probe, probe)
            layer.stored = tuple(QuantizedStates(qdata=(codes[None, :, :tokens].to(torch.int16) + 128).to(torch.uint8),
                                                 scale=scales[None, :, :tokens, None].half(), offset=None,
                                                 head_dim=codes.shape[2]) for codes, scales in (keys, values))

    def step(self, token: int) -> torch.Tensor:
        """The next token at the next position: (1, V) float32 logits."""
        return self.forward([token])

    def forward(self, tokens: list[int] | torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`tokens` (a list, or a (T,) int64 tensor) at the next positions in one native call: (T, V) float32
        logits, or (1, V) for the last."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        if self.position + len(tokens) > self.capacity:
            raise ModelpressError(f"{len(tokens)} tokens at position {self.position} overrun the native decode "
                                  f"cache of {self.capacity}")
        t = len(tokens)
        self._reserve(t)
        hidden = self.model.model.embed_tokens(torch.tensor([tokens])).reshape(t, -1).float().contiguous()
        self.decoder.threads = self.threads or torch.get_num_threads()
        rows = 1 if last_only else t
        logits = torch.empty(rows, self.decoder.head.n) if self.head_native else None
        self.decoder.logits = None if logits is None else logits.data_ptr()
        self.decoder.logits_from = t - rows
        status = self.lib.mp_forward(ctypes.byref(self.decoder), hidden.data_ptr(), t, self.position)
        if status != 0:
            raise RuntimeError(f"native decode step failed: {STATUS.get(status, status)}")
        self.position += t
        if logits is not None:
            return logits
        logits = self.model.lm_head(hidden[t - rows:]).float()
        if self.logit_softcap:   # the step caps the logits of the heads it runs itself
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _reserve(self, tokens: int) -> None:
        """Scratch (decoder.work) for forward calls of up to `tokens` tokens."""
        if tokens > self.work_tokens:
            self.work = torch.empty(int(self.lib.mp_forward_work(ctypes.byref(self.decoder), tokens)))
            self.decoder.work, self.work_tokens = self.work.data_ptr(), tokens

    def rewind(self, tokens: int) -> None:
        """Forget the last `tokens` positions (speculative decoding's rejected drafts): later steps overwrite them."""
        if not 0 <= tokens <= self.position:
            raise ValueError(f"cannot rewind {tokens} tokens from position {self.position}")
        self.position -= tokens

    # StaticDecoder's interface for a draft on a shared cache (speculative._shared_cache_rounds); there is no device
    # here: a count is read at once, and the position is always exact

    def rewind_device(self, tokens: torch.Tensor) -> None:
        self.rewind(int(tokens))

    def settle(self, tokens: int) -> None:
        """Nothing left to do: rewind_device moved the position already."""

    def follow(self, other: NativeDecoder) -> None:
        self.position = other.position

    @property
    def max_len(self) -> int:
        """The positions the cache holds (StaticDecoder's name for it)."""
        return self.capacity

    def restart(self) -> None:
        """Back to an empty sequence for another generation, keeping the cache and the native structs (the
        positions the last one wrote are overwritten before they are read, as after a rewind)."""
        self.position = 0

    def take_prefix(self, other: NativeDecoder, tokens: int) -> None:
        """Copy the keys and values of `other`'s first `tokens` positions into this cache (a DecodeSession's decoder
        rebuilt longer keeps what its predecessor held)."""
        if other.kv_cache != self.kv_cache or len(other._cache_tensors) != len(self._cache_tensors):
            raise ValueError("the prefix of a native decoder of another model or cache mode")
        if not 0 <= tokens <= min(self.capacity, other.capacity):
            raise ValueError(f"{tokens} positions of a cache of {other.capacity} for one of {self.capacity}")
        for mine, theirs in zip(self._cache_tensors, other._cache_tensors):   # (heads, capacity[, head_dim])
            mine[:, :tokens] = theirs[:, :tokens]

    def move_to(self, position: int) -> None:
        if not 0 <= position < self.capacity:
            raise ValueError(f"position {position} is outside the native cache of {self.capacity}")
        self.position = position
