"""Decode-time fusions: fewer, larger kernels per decoder layer, applied for a generation and undone after it.

At batch-1 decode a GPU runs each decoder layer as ~40 small kernels, and their launches, not the arithmetic,
set the pace of everything but the weight matmuls (docs/benchmarks.md: 2.6 ms of a 7B bf16 step of 6.7 ms).
`fuse_for_decode(model)` takes three kinds of them away without changing what the model computes:

- **sibling projections** (q/k/v, gate/up), which read the same input, become one matmul over their rows
  stacked (`SiblingGroup`): each sibling's module is replaced by a `SiblingPart` that returns its columns of the
  group's output, computed once per input. Packed layers stack exactly (formats/packed.concat_rows), float layers
  their weights; either way the siblings' own tensors become views of the stacked ones, so the fusion costs no
  memory beyond one layer's group while it is built, and undoing it gives each layer its own tensors back.
- **RMS norms** of the transformers families listed below run as one kernel (nn/triton_norm.py) instead of
  eight, on CUDA; elsewhere (and inside torch.compile, which fuses them itself) the original module runs.
- **gated MLPs** of the Llama kind (`LLAMA_MLPS`), whose gate and up are one group: silu(gate) * up runs as one
  kernel (nn/triton_act.py) instead of two, between the group's matmul and down_proj.
- **residual adds**: in decoder layers of the Llama kind (`LLAMA_LAYERS`), each residual add runs in the kernel of
  the norm that reads its sum next (nn/triton_norm.add_rms_norm stores the sum and normalizes it): the add after
  attention with the layer's post-attention norm, the add after the MLP with the next layer's input norm (the
  model's final norm after the last layer), which is handed the result and returns it when called on that sum.
- **attention** over the cache: where a model attends through transformers' SDPA function, the attention of one
  to MAX_TOKENS new tokens runs split along the cache in two kernels (nn/triton_attention.py, flash-decoding)
  instead of SDPA's one program per query head, where query heads share key/value heads or several tokens query:
  the attention modules' config names a function registered for it, which calls SDPA's own for every other call
  (prefill, one token of a model with as many key/value heads as query heads over a cache longer than
  MHA_SPLIT_MAX_POSITIONS, masks per head, soft-capping, compile).
- **int4 codes re-laid for the tensor-core GEMV** (nn/gluon_mma_gemv.py) where a generation's forwards
  after the prefill take one token: each layer it serves, and serves faster (triton_backend.mma_supported), has
  its codes permuted in place (the same bytes), put back in the stored order after the generation.
- **rotary embeddings** of queries and keys run as one kernel (nn/triton_rope.py) instead of about ten: the
  modeling module's `apply_rotary_pos_emb`, which its attention calls by name, is replaced for the generation by a
  function that launches the kernel where it serves the call and calls the original otherwise. The replacement is
  process-wide while it lasts (another model of the same family decoding meanwhile takes it too, and computes the
  same), so it is checked against the original on random inputs before it is put in.

Sibling parts recognise their shared input by identity: a module that calls them on different tensors gets each
computed on its own input (correct, only unfused). Modules with hooks (accelerate's offloading among them),
parts of different types, devices or input widths, and packed weights that cannot be stacked are left as they
are, and the report says why.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import concat_rows, row_slices
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.triton_act import silu_mul
from modelpress.nn.triton_attention import decode_attention
from modelpress.nn.triton_norm import add_rms_norm, rms_norm
from modelpress.nn.triton_rope import rotary

log = logging.getLogger(__name__)

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# RMS norm classes whose forward is transformers' llama form (x normalized, rounded to its dtype, times the weight)
LLAMA_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
                         "MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm"})
GEMMA_NORMS = frozenset({"Gemma2RMSNorm", "Gemma3RMSNorm"})  # normalized times (1 + weight) in float32
# MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)), and decoder layers whose forward is
# norm -> self_attn -> residual add -> norm -> mlp -> residual add, with these four children and no others
LLAMA_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
LLAMA_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})
LAYER_CHILDREN = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


@dataclass
class FusionReport:
    groups: int = 0                                   # sibling groups now one matmul
    norms: int = 0                                    # RMS norms now one kernel (where the kernel serves them)
    rotary: int = 0                                   # modeling modules whose apply_rotary_pos_emb is one kernel
    mlps: int = 0                                     # gated MLPs whose activation is one kernel
    adds: int = 0                                     # residual adds folded into the norm after them
    attention: int = 0                                # attention modules whose decode attention is split-cache
    kv_writes: bool = False                           # a static cache wrote keys and values in one kernel a layer
    relaid: int = 0                                   # 4-bit layers whose one-token matmul is the tensor-core GEMV
    gated: int = 0                                    # of those, [gate | up] layers taking the MLP's activation too
    laid: int = 0                                     # norms writing their output in fragment order for such layers
    skipped: list[str] = field(default_factory=list)  # what was left as it is, and why

    def merge(self, other: FusionReport) -> None:
        self.groups += other.groups
        self.norms += other.norms
        self.rotary += other.rotary
        self.mlps += other.mlps
        self.adds += other.adds
        self.attention += other.attention
        self.kv_writes |= other.kv_writes
        self.relaid += other.relaid
        self.gated += other.gated
        self.laid += other.laid
        self.skipped += other.skipped

    def summary(self) -> str:
        """e.g. "64 sibling groups, 65 norms, 32 MLPs, 64 residual adds, 32 attentions, rotary, KV writes" (""
        when nothing was fused)."""
        done = [f"{n} {what}" for n, what in ((self.groups, "sibling groups"), (self.norms, "norms"),
                                              (self.mlps, "MLPs"), (self.adds, "residual adds"),
                                              (self.attention, "attentions"),
                                              (self.gated, "MLP activations in the GEMV"),
                                              (self.relaid, "4-bit layers on the tensor-core GEMV"),
                                              (self.laid, "norms writing x in fragment order")) if n]
        return ", ".join(done + (["rotary"] if self.rotary else []) + (["KV writes"] if self.kv_writes else []))


class SiblingGroup(nn.Module):
    """One matmul (`fused`, rows of the siblings stacked) computed once per input and handed out in columns."""

    def __init__(self, fused: nn.Module, widths: list[int]) -> None:
        super().__init__()
        self.fused = fused
        self.bounds = list(itertools.accumulate(widths, initial=0))
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._unread = 0

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input:
            self._input, self._output, self._unread = x, self.fused(x), len(self.bounds) - 1
        out = self._output[..., self.bounds[index]:self.bounds[index + 1]]  # type: ignore[index]
        self._unread -= 1
        if not self._unread:  # every sibling has its columns: hold nothing between calls
            self._input = self._output = None
        return out


class SiblingPart(nn.Module):
    """Stands in for one sibling projection: its columns of the group's output."""

    def __init__(self, group: SiblingGroup, index: int, original: nn.Module) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.in_features, self.out_features = original.in_features, original.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(self.index, x)


class FusedRMSNorm(nn.Module):
    """A transformers RMS norm through one kernel; the original module wherever the kernel does not serve. A fused
    layer before it may hand it (input, norm of input), computed with the layer's residual add: called on exactly
    that input next, it returns the norm it was handed."""

    def __init__(self, norm: nn.Module, gemma: bool) -> None:
        super().__init__()
        self.norm, self.gemma = norm, gemma
        self.eps = float(norm.eps if gemma else norm.variance_epsilon)
        self._handed: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its norm) computed by a layer
        # its output feeds a layer re-laid for the tensor-core GEMV's rows mode (_relayout): the kernel writes the
        # output in fragment order too (nn/triton_norm.py's laid copy)
        self.lays_x = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handed, self._handed = self._handed, None
        if handed is not None and x is handed[0]:
            return handed[1]
        if not torch.compiler.is_compiling():
            out = rms_norm(x, self.norm.weight, self.eps, self.gemma, self.lays_x)
            if out is not None:
                return out
        return self.norm(x)


def fuse_for_decode(model: nn.Module, siblings: bool = True, norms: bool = True, rope: bool = True,
                    mlps: bool = True, adds: bool = True, attention: bool = True, relayout: bool = True,
                    interleave: bool = True) -> tuple[FusionReport, Callable[[], None]]:
    """Fuse `model` in place; (report, undo). undo() puts every original module and function back, each module
    with its own tensors. MLPs fuse only where their gate and up became one group, residual adds only into norms
    fused before. relayout (for generations whose forwards after the prefill take one token a row, at most
    mma_ptx.MAX_ROWS rows): 4-bit layers' codes re-laid for the tensor-core GEMV (`_relayout`), after the sibling
    groups are stacked; interleave (one row only: the activation in the GEMV's epilogue takes one row) also
    interleaves gated MLPs' [gate | up] rows (INTERLEAVE)."""
    report, undo = FusionReport(), []
    try:
        if norms:
            undo += _fuse_norms(model, report)
        if rope:
            undo += _fuse_rotary(model, report)
        if siblings:
            undo += _fuse_siblings(model, report)
        if mlps:
            undo += _fuse_mlps(model, report)
        if adds:
            undo += _fuse_adds(model, report)
        if attention:
            undo += _fuse_attention(model, report)
        if relayout and RELAYOUT:
            undo += _relayout(model, report, interleave and INTERLEAVE)
    except BaseException:
        _run_all(undo)
        raise
    return report, lambda: _run_all(undo)


def _run_all(undo: list[Callable[[], None]]) -> None:
    for step in reversed(undo):
        step()
    undo.clear()


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _children(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    return list(model.named_modules())


def _fuse_norms(model: nn.Module, report: FusionReport) -> list[Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    checked: dict[type, bool] = {}
    for name, parent in _children(model):
        if isinstance(parent, FusedRMSNorm):  # already fused (a module shared with a model fused before)
            continue
        for child_name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind not in LLAMA_NORMS and kind not in GEMMA_NORMS:
                continue
            if _hooked(child):
                report.skipped.append(f"{_join(name, child_name)}: hooked")
                continue
            fused = FusedRMSNorm(child, gemma=kind in GEMMA_NORMS)
            if type(child) not in checked:
                checked[type(child)] = _agrees(fused, child)
                if not checked[type(child)]:
                    report.skipped.append(f"{kind}: its forward differs from the fused kernel's; left unfused")
            if not checked[type(child)]:
                continue
            setattr(parent, child_name, fused)
            undo.append(lambda p=parent, n=child_name, c=child: setattr(p, n, c))
            report.norms += 1
    return undo


@torch.no_grad()
def _agrees(fused: FusedRMSNorm, norm: nn.Module) -> bool:
    """Whether the fused kernel gives this class's forward on random rows (a transformers version whose norm
    computes otherwise stays unfused); True where the kernel does not serve (the original then runs anyway)."""
    weight = norm.weight
    generator = torch.Generator().manual_seed(0)  # never the caller's random state (sampling may draw from it)
    x = torch.randn(3, weight.shape[-1], generator=generator).to(weight.device, weight.dtype)
    got = rms_norm(x, weight, fused.eps, fused.gemma)
    if got is None:
        return True
    want = norm(x)
    return got.dtype == want.dtype and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-3)


ROTARY = "apply_rotary_pos_emb"


def _fuse_rotary(model: nn.Module, report: FusionReport) -> list[Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    modules = {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}
    for name in sorted(modules):
        module = sys.modules.get(name)
        original = getattr(module, ROTARY, None)
        if not callable(original) or getattr(original, "fused_by_modelpress", False):
            continue  # no such function, or already replaced (a model of the same family fused before)
        if not _rotary_agrees(original, model):
            report.skipped.append(f"{name}.{ROTARY}: it differs from the fused kernel's; left unfused")
            continue
        fused = _fused_rotary(original)
        setattr(module, ROTARY, fused)
        undo.append(lambda m=module, f=fused, o=original: getattr(m, ROTARY) is f and setattr(m, ROTARY, o))
        report.rotary += 1
    return undo


def _fused_rotary(original: Callable) -> Callable:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and (not kwargs or kwargs == {"unsqueeze_dim": 1})  # the (B, heads, T, D) layout
        if plain and not torch.compiler.is_compiling():
            out = rotary(q, k, cos, sin)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.fused_by_modelpress = True  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


@torch.no_grad()
def _rotary_agrees(original: Callable, model: nn.Module) -> bool:
    """Whether the kernel gives `original`'s results on random queries, keys and angles in the model's dtype (True
    where the kernel does not serve: off CUDA the original runs anyway)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return True
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(shape, generator=generator).to(weight.device, weight.dtype)
            for shape in ((1, 4, 3, 32), (1, 2, 3, 32)))
    angles = torch.randn(1, 3, 16, generator=generator).repeat(1, 1, 2)
    cos, sin = (f(angles).to(weight.device, weight.dtype) for f in (torch.cos, torch.sin))
    got = rotary(q, k, cos, sin)
    if got is None:
        return True
    want = original(q, k, cos, sin)
    return all(g.dtype == w.dtype and g.shape == w.shape and torch.allclose(g.float(), w.float(), rtol=1e-2,
                                                                           atol=1e-3) for g, w in zip(got, want))


ATTENTION = "modelpress_decode"  # the attention implementation registered with transformers for fused decoding


def _fuse_attention(model: nn.Module, report: FusionReport) -> list[Callable[[], None]]:
    """Point the config of every attention module that uses transformers' SDPA function at ATTENTION (the same
    function, with the calls decode_attention serves sent there), once the kernels are checked against SDPA."""
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention")
               and getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"]
    if not modules:
        return []
    _register_attention()
    if not _attention_agrees(_activation_dtype(model), next(model.parameters()).device):
        report.skipped.append("attention: the split-cache kernels differ from SDPA here; left to SDPA")
        return []
    configs = list({id(m.config): m.config for m in modules}.values())
    for config in configs:
        config._attn_implementation = ATTENTION
    report.attention += len(modules)
    return [lambda c=config: c._attn_implementation == ATTENTION and setattr(c, "_attn_implementation", "sdpa")
            for config in configs]


@functools.cache
def _register_attention() -> None:
    """ATTENTION in transformers' registries: the attention function, and SDPA's mask function (the masks a model
    builds for itself are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _split_cache_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _split_cache_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs):
    """transformers' SDPA attention function, with the calls decode_attention serves run there: few query tokens,
    no dropout, none of the options SDPA itself treats specially (soft-capping, sinks, position bias, paged
    caches, attention weights), outside torch.compile. Keys and values may be the static int8 cache's codes
    (`key.kv_scales`: static_kv.py, read_codes): the kernels read them wherever they serve, long MHA caches included
    (SDPA there would first write the whole cache's states out in float), anything else their dequantized states."""
    scales = getattr(key, "kv_scales", None)
    if not (dropout or torch.compiler.is_compiling() or kwargs.get("output_attentions")
            or any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "position_bias", "cache"))
            or not (scales is not None or _split_pays(query, key))):  # SDPA would need the states dequantized
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        key_scale, value_scale = scales if scales is not None else (None, None)
        out = decode_attention(query, key, value, attention_mask, scale, key_scale=key_scale, value_scale=value_scale)
        if out is not None:
            return out, None
    if scales is not None:
        key, value = dequantize_codes(key, scales[0], query.dtype), dequantize_codes(value, scales[1], query.dtype)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int8 KV cache's states from its codes (offset-binary uint8) and per-token scales (its own codec's
    dequantize)."""
    from modelpress.inference.kv_cache import KVCacheConfig
    from modelpress.inference.kv_quant import QuantizedStates

    codec, _ = KVCacheConfig("int8").codecs()
    return codec.dequantize(QuantizedStates(qdata=codes, scale=scale, offset=None, head_dim=codes.shape[-1]), dtype)


# The split-cache attention reads an int8 cache's codes and scales instead of a float copy dequantized each step.
# H100, 7B shape with random weights, 512-token prompts, 64 steps (bench/decode.py --paths auto auto+nocodes
# --kv-cache float int8, bench/results/decode_batch16_codes_h100.json): int4/g128 on an int8 cache at batch 16
# 434.6 -> 1830.1 tok/s (0.16x -> 0.69x the float cache's 2660.3), at batch 1 147.3 -> 213.6. Its CUDA tests
# (test_attention_codes.py, test_static_kv.py) pass on the H100.
READ_INT8_CODES = True


def reads_kv_codes(model: nn.Module, kv_cache) -> bool:
    """Whether a static cache of `kv_cache` (a KVCacheConfig) for `model` should hand attention its int8 codes:
    the int8 mode with no float window, every attention module on ATTENTION (the decode-time fusions applied: only
    _split_cache_attention reads codes), and the kernels checked on this device against SDPA."""
    if not READ_INT8_CODES or kv_cache is None or kv_cache.mode != "int8" or kv_cache.residual != 0:
        return False
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    if not modules or any(getattr(getattr(m, "config", None), "_attn_implementation", None) != ATTENTION
                          for m in modules):
        return False
    return _codes_agree(_activation_dtype(model), next(model.parameters()).device)


# One token of a model with a key/value head per query head goes to the split-cache kernels up to this many cache
# positions, to SDPA beyond. Decode through generate on an H100, Llama-2-7B shape, the whole step launched with PDL
# (bench/decode.py +mhasplit): int4 342.5 -> 352.4 tok/s over a 768-position cache, 285.4 -> 271.7 over 4096 (where
# cuDNN streams a full cache near the read rate: bench/decode_attention.py, 28.8 µs against the kernels' 40.0).
# Not gated on the batch: at 4-32 sequences SDPA is 11-29% faster on a full 640-position cache (58.1 against 71.3 µs
# at 16), which made decode with 512-token prompts 4-7% faster through generate; but SDPA reads every slot of the
# static buffer and the kernels only those written (2048 slots, 600 written: 173.4 against 75.9 µs), and the route is
# fixed when the step is captured, before the cache's fill is known (docs/benchmarks.md, fourteenth pass).
MHA_SPLIT_MAX_POSITIONS = 1024


def _split_pays(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the split-cache kernels beat SDPA on this call: where query heads share key/value heads or several
    tokens query (SDPA reads the cache again for each query head), and for one token of a model with a key/value
    head per query head over a short cache (MHA_SPLIT_MAX_POSITIONS); not over a long one."""
    return query.dim() == 4 and key.dim() == 4 and (query.shape[1] > key.shape[1] or query.shape[2] > 1
                                                    or key.shape[2] <= MHA_SPLIT_MAX_POSITIONS)


@functools.cache
@torch.no_grad()
def _attention_agrees(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels give SDPA's attention on random queries, keys and values over a partly masked cache
    (True where they do not serve: SDPA then runs anyway). Once per dtype and device in a process: the answer does
    not change between generations, and each check costs launches and a device sync."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).to(device, dtype)
               for shape in ((1, 4, 1, 64), (1, 2, 40, 64), (1, 2, 40, 64)))
    mask = torch.zeros(1, 1, 1, 40, dtype=dtype, device=device)
    mask[..., 30:] = torch.finfo(dtype).min
    got = decode_attention(q, k, v, mask, 0.125)
    if got is None:
        return True
    stub = nn.Module()
    stub.num_key_value_groups, stub.is_causal = 2, True
    want, _ = sdpa_attention_forward(stub, q, k, v, mask, scaling=0.125)
    return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@functools.cache
@torch.no_grad()
def _codes_agree(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels read int8 codes as SDPA attends their dequantized states (once per dtype and device)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from modelpress.inference.kv_cache import KVCacheConfig

    codec, _ = KVCacheConfig("int8").codecs()
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1, 64, generator=generator).to(device, dtype)
    stored = [codec.quantize(torch.randn(1, 2, 40, 64, generator=generator)) for _ in "kv"]
    (k, ks), (v, vs) = ((s.qdata.to(device), s.scale.to(device)) for s in stored)
    mask = torch.zeros(1, 1, 1, 40, dtype=dtype, device=device)
    mask[..., 30:] = torch.finfo(dtype).min
    got = decode_attention(q, k, v, mask, 0.125, key_scale=ks, value_scale=vs)
    if got is None:
        return False  # nothing to gain: the states would be dequantized for SDPA at every call
    stub = nn.Module()
    stub.num_key_value_groups, stub.is_causal = 2, True
    want, _ = sdpa_attention_forward(stub, q, dequantize_codes(k, ks, dtype), dequantize_codes(v, vs, dtype), mask,
                                     scaling=0.125)
    return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _fuse_mlps(model: nn.Module, report: FusionReport) -> list[Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    checked: dict[type, bool] = {}
    dtype = _activation_dtype(model)
    for name, mlp in _children(model):
        if type(mlp).__name__ not in LLAMA_MLPS or "forward" in vars(mlp):
            continue
        gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
        if not (isinstance(gate, SiblingPart) and isinstance(up, SiblingPart) and gate.group is up.group
                and (gate.index, up.index) == (0, 1) and len(gate.group.bounds) == 3):
            continue  # gate and up are not one group of their own (left unfused, named there)
        if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation") or _hooked(mlp):
            report.skipped.append(f"{name}: its activation is not SiLU, or it has hooks; MLP left unfused")
            continue
        mlp.forward = functools.partial(_gated_mlp, mlp)
        if type(mlp) not in checked:
            checked[type(mlp)] = _mlp_agrees(mlp, dtype)
            if not checked[type(mlp)]:
                report.skipped.append(f"{type(mlp).__name__}: its forward differs from the fused one's; left unfused")
        if not checked[type(mlp)]:
            del mlp.forward
            continue
        undo.append(lambda m=mlp: vars(m).pop("forward", None))
        report.mlps += 1
    return undo


def _gated_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down_proj(silu(gate) * up) with gate and up from one matmul and the activation one kernel where it serves."""
    fused = mlp.gate_proj.group.fused
    if x.numel() == fused.in_features and isinstance(fused, QuantLinear):  # one token: the GEMV's own epilogue
        y = fused.gated_mma(x)
        if y is not None:
            return mlp.down_proj(y)
    h = fused(x)
    y = None if torch.compiler.is_compiling() else silu_mul(h)
    if y is None:
        width = h.shape[-1] // 2
        y = mlp.act_fn(h[..., :width]) * h[..., width:]
    return mlp.down_proj(y)


@torch.no_grad()
def _mlp_agrees(mlp: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the fused forward gives the class's own on random inputs (exactly off CUDA, where the same
    operations run in the same order)."""
    device = next(t.device for t in itertools.chain(mlp.parameters(), mlp.buffers()))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, mlp.gate_proj.in_features, generator=generator).to(device, dtype)
    got = _gated_mlp(mlp, x)
    want = type(mlp).forward(mlp, x)
    return got.dtype == want.dtype and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-3)


def _fuse_adds(model: nn.Module, report: FusionReport) -> list[Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    checked: dict[type, bool] = {}
    following = _following_norms(model)
    for name, layer in _children(model):
        if type(layer).__name__ not in LLAMA_LAYERS or "forward" in vars(layer):
            continue
        norm = getattr(layer, "post_attention_layernorm", None)
        if {n for n, _ in layer.named_children()} != LAYER_CHILDREN or _hooked(layer):
            report.skipped.append(f"{name}: a layer of other parts, or with hooks; its residual adds left as they are")
            continue
        if not _llama_norm(norm):
            continue  # the norm after attention is not fused (named there)
        if type(layer) not in checked:
            checked[type(layer)] = _add_agrees(norm)
            if not checked[type(layer)]:
                report.skipped.append(f"{type(layer).__name__}: the residual add and norm differ from the fused "
                                      "kernel's; left unfused")
        if not checked[type(layer)]:
            continue
        after = following.get(layer)
        layer.forward = functools.partial(_residual_layer, layer, _layer_defaults(type(layer)),
                                          after if _llama_norm(after) else None)
        undo.append(lambda m=layer: vars(m).pop("forward", None))
        undo.append(lambda n=after: setattr(n, "_handed", None) if isinstance(n, FusedRMSNorm) else None)
        report.adds += 1 + (after is not None and _llama_norm(after))
    return undo


def _llama_norm(norm: nn.Module | None) -> bool:
    return isinstance(norm, FusedRMSNorm) and not norm.gemma


def _following_norms(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """For each decoder layer of a stack, the norm its output goes to first: the next layer's input norm, and
    for the last layer the model's final norm (the `norm` beside the `layers` list), where the model has one."""
    following: dict[nn.Module, nn.Module] = {}
    for _, owner in _children(model):
        layers = getattr(owner, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            continue
        after = [getattr(layer, "input_layernorm", None) for layer in list(layers)[1:]]
        after.append(getattr(owner, "norm", None))
        following.update((layer, norm) for layer, norm in zip(layers, after) if norm is not None)
    return following


@functools.cache
def _layer_defaults(kind: type) -> dict:
    """The defaults of the layer forward's keyword parameters, which it passes on to its attention."""
    params = list(inspect.signature(kind.forward).parameters.values())[2:]  # after self and hidden_states
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty}


def _residual_layer(layer: nn.Module, defaults: dict, after: FusedRMSNorm | None, hidden_states: torch.Tensor,
                    *args, **kwargs) -> torch.Tensor:
    """The Llama decoder layer's forward with each residual add in the kernel of the norm that follows it: the
    layer's own post-attention norm, and `after`, the norm that reads the layer's output next (handed its result,
    which it returns when called on that output)."""
    if args:  # called positionally beyond the hidden states: the class's own forward binds them
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    hidden_states, _ = layer.self_attn(hidden_states=hidden_states, **{**defaults, **kwargs})
    residual, hidden_states = _add_norm(residual, hidden_states, layer.post_attention_layernorm)
    hidden_states = layer.mlp(hidden_states)
    if after is None:
        return residual + hidden_states
    total, normed = _add_norm(residual, hidden_states, after)
    after._handed = (total, normed)
    return total


def _add_norm(residual: torch.Tensor, x: torch.Tensor, norm: FusedRMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, norm(residual + x)), in one kernel where it serves."""
    fused = None if torch.compiler.is_compiling() else add_rms_norm(residual, x, norm.norm.weight, norm.eps,
                                                                     norm.lays_x)
    if fused is not None:
        return fused
    total = residual + x
    return total, norm(total)


@torch.no_grad()
def _add_agrees(norm: FusedRMSNorm) -> bool:
    """Whether the kernel gives the add and this norm's forward on random rows (True where it does not serve)."""
    weight = norm.norm.weight
    generator = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, weight.shape[-1], generator=generator).to(weight.device, weight.dtype) for _ in "xr")
    got = add_rms_norm(x, r, weight, norm.eps)
    if got is None:
        return True
    total = x + r
    return torch.equal(got[0], total) and torch.allclose(got[1].float(), norm.norm(total).float(), rtol=2e-2,
                                                          atol=1e-3)


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its float parameters' (packed layers keep theirs in buffers)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _fuse_siblings(model: nn.Module, report: FusionReport) -> list[Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    for name, parent in _children(model):
        for names in SIBLINGS:
            parts = [getattr(parent, n, None) for n in names]
            if not all(isinstance(p, (nn.Linear, QuantLinear)) for p in parts):
                continue
            where = _join(name, "/".join(names))
            reason = _unfusable(parts)
            if reason is None:
                try:
                    group, restore = _stack(parts)
                except ModelpressError as err:
                    reason = str(err)
            if reason is not None:
                report.skipped.append(f"{where}: {reason}")
                continue
            for index, (n, part) in enumerate(zip(names, parts)):
                setattr(parent, n, SiblingPart(group, index, part))
            undo.append(lambda p=parent, ns=names, ps=parts, r=restore: _unstack(p, ns, ps, r))
            report.groups += 1
    return undo


RELAYOUT = True  # the switch of _relayout; bench/decode.py's +nomma turns it off to measure it
# fused MLPs' [gate | up] layers re-laid with their rows interleaved, so that the tensor-core GEMV's epilogue takes
# silu(gate) * up for one token (no activation kernel). Timed on an H100 through generate (Llama-2-7B shape):
# int4/g128 384.8 -> 394.6 tok/s, nf4/g64 315.4 -> 323.0 (bench/decode.py's +noact turns it off)
INTERLEAVE = True
# norms before layers re-laid for the rows mode (2 to mma_ptx.MAX_ROWS rows) write their output in fragment order
# too, which those layers read (nn/triton_norm.py; bench/decode.py's +nolaid turns it off)
LAY_NORMS = True


def _relayout(model: nn.Module, report: FusionReport, interleave: bool = True) -> list[Callable[[], None]]:
    """QuantLinears the tensor-core GEMV serves, and faster (triton_backend.mma_supported), get their codes re-laid
    in place for it (mma_ptx.mma_layout: the same bytes, in another order) and `mma_words`, a view of them, which
    QuantLinear.forward then reads: calls of one row (or up to mma_ptx.MAX_ROWS, where the rows are not
    interleaved) run gluon_mma_gemv, others decode the weight from that layout for cuBLAS. undo() puts the stored
    order back, bit for bit. Until then the layer's qdata buffer holds the codes in that order: its forward refuses
    calls that would read them as stored (autograd, torch.compile, the CPU), but a state_dict or dequantized_weight
    taken meanwhile (from a generation's callback, say) reads them as stored. interleave: gated MLPs' [gate | up]
    rows interleaved for the activation in the GEMV's epilogue (one-row generations only)."""
    from modelpress.nn import triton_backend
    from modelpress.nn.mma_ptx import interleave_rows, mma_codes, mma_layout, standard_bytes

    undo: list[Callable[[], None]] = []
    if _activation_dtype(model) not in (torch.bfloat16, torch.float16):
        return undo  # the kernel multiplies 16-bit activations; float32 ones would decode the weight every call
    gated = {id(mlp.gate_proj.group.fused) for _, mlp in _children(model) if _is_gated(mlp)}
    for _, module in _children(model):
        if not isinstance(module, QuantLinear) or _hooked(module) or "mma_words" in module.__dict__:
            continue
        packed = module.packed
        if not triton_backend.mma_supported(packed):
            continue
        n, k = packed.shape
        qdata = module.qdata
        order = triton_backend.mma_order(packed)
        rows = interleave_rows(n, qdata.device) if interleave and id(module) in gated and module.bias is None \
            else None
        words = mma_layout(qdata if rows is None else qdata[rows], n, k, order)
        qdata.view(torch.int32).view(-1).copy_(words.view(-1))
        module.mma_words = qdata.view(torch.int32).view(words.shape)
        module.mma_interleaved = rows is not None
        del words

        def restore(m=module, q=qdata, n=n, k=k, order=order, rows=rows) -> None:
            codes = standard_bytes(mma_codes(m.mma_words, n, k, order))
            if rows is None:
                q.copy_(codes)
            else:
                q[rows] = codes
            del m.mma_words, m.mma_interleaved
            m._launchers = {key: fn for key, fn in m._launchers.items() if len(key) == 2}

        undo.append(restore)
        report.relaid += 1
        report.gated += rows is not None
    if not interleave and LAY_NORMS:  # rows-mode generations (the activation epilogue takes one row)
        undo += _lay_norms(model, report)
    return undo


# the norm before a decoder layer's attention and MLP (the first of the names the layer has: Gemma 2/3 normalize
# the attention's output with post_attention_layernorm and the MLP's input with pre_feedforward_layernorm), and the
# projections it feeds, as transformers names them (stacked siblings stand for theirs)
NORM_READERS = ((("input_layernorm",), "self_attn", ("q_proj", "qkv_proj")),
                (("pre_feedforward_layernorm", "post_attention_layernorm"), "mlp", ("gate_proj", "gate_up_proj")))


def _lay_norms(model: nn.Module, report: FusionReport) -> list[Callable[[], None]]:
    """Fused norms whose output a layer re-laid for the rows mode reads (not interleaved: more than one row) write
    it in fragment order too (FusedRMSNorm.lays_x), which that layer then reads: 256 contiguous bytes a warp load."""
    undo: list[Callable[[], None]] = []
    for _, layer in _children(model):
        for norm_names, block_name, names in NORM_READERS:
            norm = next((getattr(layer, n) for n in norm_names if hasattr(layer, n)), None)
            block = getattr(layer, block_name, None)
            if not isinstance(norm, FusedRMSNorm) or block is None or norm.lays_x:
                continue
            readers = [getattr(block, name, None) for name in names]
            readers = [r.group.fused if isinstance(r, SiblingPart) else r for r in readers if r is not None]
            if any(isinstance(r, QuantLinear) and "mma_words" in r.__dict__ and not r.mma_interleaved
                   for r in readers):
                norm.lays_x = True
                undo.append(lambda n=norm: setattr(n, "lays_x", False))
                report.laid += 1
    return undo


def _is_gated(mlp: nn.Module) -> bool:
    """Whether `mlp` runs _gated_mlp (fused by _fuse_mlps)."""
    forward = vars(mlp).get("forward")
    return isinstance(forward, functools.partial) and forward.func is _gated_mlp


def _unfusable(parts: list[nn.Module]) -> str | None:
    if len({type(p) for p in parts}) > 1:
        return "the projections are of different kinds"
    if any(type(p) not in (nn.Linear, QuantLinear) for p in parts):
        return "a projection is a subclass it does not know"
    if any(_hooked(p) for p in parts):
        return "a projection has hooks"
    if len({p.in_features for p in parts}) > 1:
        return "the projections read inputs of different widths"
    if len({p.bias is None for p in parts}) > 1:
        return "some projections have a bias and some do not"
    if len({_signature(p) for p in parts}) > 1:
        return "the projections' tensors differ in device or dtype"
    return None


def _signature(part: nn.Module) -> tuple:
    named = itertools.chain(part.named_parameters(recurse=False), part.named_buffers(recurse=False))
    return tuple((name, t.device, t.dtype) for name, t in named)


def _stack(parts: list[nn.Module]) -> tuple[SiblingGroup, Callable[[], None]]:
    """The group of `parts` with their tensors re-pointed into it; restore() gives them their own copies back."""
    widths = [p.out_features for p in parts]
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    if isinstance(parts[0], QuantLinear):
        fused: nn.Module = QuantLinear(concat_rows([p.packed for p in parts]), bias)
        for part, view in zip(parts, row_slices(fused.packed, widths)):
            for name, tensor in view.tensors().items():
                part._buffers[name] = tensor
    else:
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        for part, start, n in zip(parts, itertools.accumulate(widths, initial=0), widths):
            part.weight.data = weight[start:start + n]
    if bias is not None:
        for part, start, n in zip(parts, itertools.accumulate(widths, initial=0), widths):
            part.bias.data = fused.bias.data[start:start + n]

    def restore() -> None:
        for part in parts:
            for tensors in (part._parameters, part._buffers):
                for name, tensor in tensors.items():
                    if tensor is not None:
                        if isinstance(tensor, nn.Parameter):
                            tensor.data = tensor.data.clone()
                        else:
                            tensors[name] = tensor.clone()
            if isinstance(part, QuantLinear):
                part._launchers = {}

    return SiblingGroup(fused, widths), restore


def _unstack(parent: nn.Module, names: tuple[str, ...], parts: list[nn.Module], restore: Callable[[], None]) -> None:
    restore()
    for n, part in zip(names, parts):
        setattr(parent, n, part)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
