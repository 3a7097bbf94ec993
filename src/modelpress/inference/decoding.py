"""Plain autoregressive decoding at batch 1 with a KV cache, streaming tokens to a callback, and the types
shared with speculative decoding (settings in, tokens + counters out).

Decode paths (`GenerationSettings.decode`):
- eager: transformers' DynamicCache, one Python-driven forward per token (any model, any given cache);
- static: a static KV cache written at a device position (static_decode.py), steps run eagerly;
- graph: the static cache with the decode step captured once in a CUDA graph and replayed (CUDA only);
- native: the CPU's whole decode step in one native call per token (native_decode.py; Llama, Mistral, Qwen2,
  Qwen3 and Gemma 2/3 decoders in float32 whose projections the native kernels serve, float or int8 KV cache, CPU kernels on);
- auto (default): graph on CUDA; native on the CPU where it serves the model and the settings, else eager.
`GenerationSettings.compile` also runs the static and graph paths' forwards through torch.compile (inductor: the
norms, rotary embeddings and other small kernels of a decoder layer fused), compiled on the first call of each
token count; the graph path captures the compiled forward. Uncompiled, on CUDA, every path runs with the
decode-time fusions of fusion.py (`GenerationSettings.fuse`): each layer's q/k/v and gate/up projections as one
matmul; its RMS norms (with the residual adds before them), rotary embeddings, SiLU-times-up and, on a static
cache, key/value writes as one kernel each, for the generation only.
`GenerationSettings.kv_cache` picks the KV cache's mode (kv_cache.CACHE_MODES): float, or a quantized mode
that generate builds for the path it takes: static_kv.StaticQuantizedCache on the static and graph paths,
kv_cache.QuantizedKVCache on the eager one, the native step's own int8 codes (int8 only) on the native one
(same quantized numbers for every token on each).
A static path falls back to eager, with a logged reason, for a caller-supplied cache, a model with attention
layers other than full and sliding-window ones (or sliding windows in a family the static decoder does not know
to slide, or with a quantized KV mode), flash-attention kernels (no 4-D masks), or a prompt the static prefill
cannot run; a failed capture keeps the static cache and runs the steps eagerly. Speculative decoding
(speculative.py) takes the same paths, with a verify pass of k+1 tokens and rewinds on the static cache.

tokens/s counts every new token over the whole call, prompt prefill (and graph capture) included.
Each call prepares the model for itself (fusions, decoders, graphs) and undoes it after; session.DecodeSession
prepares it once for many calls and keeps the decoders and their graphs between them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from modelpress.errors import ModelpressError
from modelpress.inference.decoder_pool import DecoderPool, pooled
from modelpress.inference.fusion import FusionReport, fuse_for_decode
from modelpress.inference.kv_cache import CACHE_MODES, KVCacheConfig, check_full_attention, make_kv_cache
from modelpress.inference.sampling import SamplingConfig, pick
from modelpress.nn.cpu_native import PRODUCTS

TokenCallback = Callable[[list[int]], None]
# models an open DecodeSession (session.py) holds: on CUDA a generation outside it would fuse them a second time
IN_SESSION: weakref.WeakSet[nn.Module] = weakref.WeakSet()
DECODE_PATHS = ("auto", "eager", "static", "graph", "native")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] = ()  # generation stops after emitting one of these (it is kept)
    decode: str = "auto"  # one of DECODE_PATHS (see the module docstring)
    compile: bool = False  # static/graph paths: torch.compile the forward (first call compiles; eager: ignored)
    fuse: bool = True  # CUDA, uncompiled: decode-time fusions for the generation (inference/fusion.py), undone after
    # float32 activations of packed layers on the CPU take the int4/int8 kernels, bfloat16 inside
    # (nn/cpu_backend.py fast_cpu); False: the exact dequantize-then-matmul reference path
    cpu_kernels: bool = True
    # the native step's products for packed weights (cpu_native.PRODUCTS): bfloat16 (int4 x rounded to bfloat16 as
    # above, or to int16 per block of 32 on AVX2-only CPUs; 8-bit integer codes x in int16 per block of 32 where the
    # CPU has AVX512_VNNI; other formats exact float32), float32 (exact for every format), or int8 (x quantized to
    # int8 in blocks of 32 for int4 and 8-bit integer formats, as llama.cpp's CPU matmuls do; where the CPU has
    # AVX512_VNNI)
    cpu_products: str = "bfloat16"
    # the KV cache generate builds: a mode of CACHE_MODES (default residual and groups), or a KVCacheConfig;
    # ignored when a cache is passed to generate
    kv_cache: str | KVCacheConfig = "float"

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ModelpressError(f"max new tokens must be a positive integer, got {self.max_new_tokens}")
        if self.decode not in DECODE_PATHS:
            raise ModelpressError(f"unknown decode path {self.decode!r}; choose one of {', '.join(DECODE_PATHS)}")
        if self.cpu_products not in PRODUCTS:
            raise ModelpressError(f"unknown CPU products {self.cpu_products!r}; choose one of {', '.join(PRODUCTS)}")
        if not isinstance(self.kv_cache, KVCacheConfig) and self.kv_cache not in CACHE_MODES:
            raise ModelpressError(f"unknown KV cache mode {self.kv_cache!r}; choose one of {', '.join(CACHE_MODES)}")

    @property
    def kv_config(self) -> KVCacheConfig:
        return self.kv_cache if isinstance(self.kv_cache, KVCacheConfig) else KVCacheConfig(self.kv_cache)


@dataclass
class GenerationResult:
    tokens: list[int]          # new tokens only
    prompt_tokens: int
    seconds: float
    target_forwards: int       # forward passes of the (target) model, prefill included
    draft_forwards: int = 0    # forward passes of the draft (the static path's prefill and catch-up steps included)
    drafted: int = 0           # draft tokens proposed
    accepted: int = 0          # draft tokens accepted
    rounds: int = 0            # draft-then-verify rounds
    decode_path: str = "eager"  # the path that ran: eager, static, graph (static with a failed capture) or native
    capture_seconds: float = 0.0  # CUDA-graph warm-up and capture, included in `seconds`
    fusions: str = ""  # the decode-time fusions the generation ran with (FusionReport.summary), "" for none
    shared_kv_cache: bool = False  # speculative: the draft read the target's static KV cache (no cache of its own)
    reused_prompt_tokens: int = 0  # leading prompt tokens not run: a session's cache held them (decoder_pool.py)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def to_dict(self) -> dict:
        return {"new_tokens": len(self.tokens), "prompt_tokens": self.prompt_tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "target_forwards": self.target_forwards,
                "draft_forwards": self.draft_forwards, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "rounds": self.rounds, "decode_path": self.decode_path,
                "capture_seconds": self.capture_seconds, "fusions": self.fusions,
                "shared_kv_cache": self.shared_kv_cache, "reused_prompt_tokens": self.reused_prompt_tokens,
                "tokens": self.tokens}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def supports_logits_to_keep(model: nn.Module) -> bool:
    return _forward_takes_logits_to_keep(type(model))


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def forward_logits(model: nn.Module, tokens: list[int], cache: Cache, last_only: bool = False) -> torch.Tensor:
    """Run `tokens` through `model` on top of `cache` (which grows); (T, V) float32 logits, or (1, V)."""
    ids = torch.tensor([tokens], dtype=torch.long, device=model_device(model))
    extra = {"logits_to_keep": 1} if last_only and supports_logits_to_keep(model) else {}
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra).logits[0]
    return (logits[-1:] if last_only else logits).float()


def prompt_list(input_ids: torch.Tensor | list[int]) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ModelpressError(f"generation runs at batch 1; got input ids of shape {tuple(input_ids.shape)}")
            input_ids = input_ids[0]
        input_ids = input_ids.tolist()
    if not input_ids:
        raise ModelpressError("the prompt is empty; generation needs at least one token")
    return [int(t) for t in input_ids]


def finish(tokens: list[int], settings: GenerationSettings) -> tuple[list[int], bool]:
    """Cut `tokens` after the first end-of-sequence token or at the length limit; True when generation is done."""
    for i, token in enumerate(tokens):
        if token in settings.eos_token_ids:
            return tokens[: i + 1], True
    return tokens, False


def decode_path(model: nn.Module, settings: GenerationSettings, cache: Cache | None) -> str:
    """The path `generate` takes: settings.decode resolved for this model, device and cache (reasons logged)."""
    wanted = settings.decode
    device = model_device(model)
    if wanted == "auto" and device.type == "cuda":
        wanted = "graph"
    elif wanted in ("auto", "native"):
        reason = native_path_obstacle(model, settings, cache)
        if reason is None:
            return "native"
        (log.warning if wanted == "native" else log.info)("not decoding on the native CPU step: %s", reason)
        wanted = "eager"
    if wanted == "eager":
        return wanted
    reason = static_cache_obstacle(model, cache, settings.kv_config.mode)
    if reason is not None:
        log.warning("decoding eagerly, without a static cache: %s", reason)
        return "eager"
    if wanted == "graph" and device.type != "cuda":
        log.warning("CUDA graphs need a CUDA device, the model is on %s; decoding on a static cache without one",
                    device)
        return "static"
    return wanted


def native_path_obstacle(model: nn.Module, settings: GenerationSettings, cache: Cache | None) -> str | None:
    """Why the native CPU step cannot serve this call, or None."""
    from modelpress.inference.native_decode import NATIVE_KV_MODES, native_obstacle

    if model_device(model).type != "cpu":
        return f"the model is on {model_device(model)}, not the CPU"
    if cache is not None:
        return "a KV cache was given (it is used as it is)"
    kv = settings.kv_config
    if kv.mode not in NATIVE_KV_MODES or kv.residual:
        window = f" with a float window of {kv.residual} tokens" if kv.residual else ""
        return (f"the {kv.mode} KV cache{window} is not on the native step (it keeps "
                f"{' or '.join(NATIVE_KV_MODES)} caches without a window)")
    if kv.mode != "float":
        try:
            check_full_attention(model.config)
        except ModelpressError as err:
            return str(err)
    if settings.compile:
        return "compile=True asks for the static path"
    if not settings.cpu_kernels:
        return "cpu_kernels=False asks for the reference path"
    return native_obstacle(model)


def static_cache_obstacle(model: nn.Module, cache: Cache | None, kv_mode: str = "float") -> str | None:
    """Why the static cache cannot serve this call, or None. Sliding-window layers are masked by the static
    decoder (static_decode.AttentionWindows) on a float cache; a quantized static cache takes full attention only."""
    from modelpress.inference.static_decode import AttentionWindows

    if cache is not None:
        return "a KV cache was given (it is used as it is)"
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no transformers config"
    windows = AttentionWindows.of(config)
    if windows.obstacle is not None:
        return windows.obstacle
    if windows.window is not None and kv_mode != "float":
        return (f"the quantized static cache keeps full attention only; this model has sliding windows of "
                f"{windows.window} tokens")
    attention = str(getattr(config, "_attn_implementation", None) or "")
    if attention.startswith("flash"):
        return f"attention implementation {attention!r} takes no 4-D attention mask"
    return None


class EagerSteps:
    """The eager path with the interface of StaticDecoder: prefill(prompt) and step(token) -> (1, V) logits.
    Without a given cache it builds one for `kv_cache` (float: DynamicCache; else a QuantizedKVCache)."""

    def __init__(self, model: nn.Module, cache: Cache | None, kv_cache: KVCacheConfig | None = None) -> None:
        self.model = model
        if cache is None:
            cache = DynamicCache(config=model.config) if kv_cache is None else make_kv_cache(model, kv_cache)
        self.cache = cache

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        return forward_logits(self.model, prompt, self.cache, last_only=True)[-1:]

    def step(self, token: int) -> torch.Tensor:
        return forward_logits(self.model, [token], self.cache, last_only=True)[-1:]


def held_prefix(pool: DecoderPool | None, prompt: list[int], role: str = "model") -> int:
    """The prompt's leading tokens whose keys and values the pool's decoder of `role` holds from a session's
    earlier generation (decoder_pool.py): its prefill runs only the rest."""
    return 0 if pool is None else pool.held_prefix(role, prompt)


def _start(model: nn.Module, prompt: list[int], settings: GenerationSettings, cache: Cache | None,
           pool: DecoderPool | None = None):
    """(stepper, first logits, path that ran, prompt tokens not run): the chosen path's prefill, or the eager one
    if that fails; the static and native decoders come from `pool` when given (a DecodeSession's), and run only
    the part of the prompt after what their caches hold from its earlier generations."""
    from modelpress.inference.static_decode import StaticDecoder

    kv_cache = settings.kv_config
    if cache is not None and kv_cache.mode != "float":
        log.warning("the given KV cache is used as it is; GenerationSettings.kv_cache=%r is ignored", kv_cache.mode)
    path = decode_path(model, settings, cache)
    if path == "native":
        from modelpress.inference.native_decode import NativeDecoder

        try:
            native = pooled(pool, "model", len(prompt) + settings.max_new_tokens, lambda length: NativeDecoder(
                model, length, products=settings.cpu_products, kv_cache=kv_cache.mode))
            start = held_prefix(pool, prompt)
            return native, native.prefill(prompt, start), path, start
        except ModelpressError as err:   # e.g. heads the step cannot lay out: say why, decode eagerly
            log.warning("%s; decoding eagerly", err)
            path = "eager"
    if path != "eager":
        decoder = pooled(pool, "model", len(prompt) + settings.max_new_tokens, lambda length: StaticDecoder(
            model, length, graph=path == "graph", keep_last_only=supports_logits_to_keep(model), kv_cache=kv_cache,
            compile=settings.compile, fused_writes=fused_writes(settings)))
        try:
            start = held_prefix(pool, prompt)
            return decoder, decoder.prefill(prompt, start), path, start
        except Exception as err:  # noqa: BLE001  (a model the static cache cannot drive: say why, decode eagerly)
            log.warning("static-cache prefill failed (%s: %s); decoding eagerly", type(err).__name__,
                        str(err).splitlines()[0][:300] if str(err) else "")
    steps = EagerSteps(model, cache, kv_cache)
    return steps, steps.prefill(prompt), "eager", 0


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor | list[int], settings: GenerationSettings,
             cache: Cache | None = None, generator: torch.Generator | None = None,
             on_tokens: TokenCallback | None = None) -> GenerationResult:
    """Sample (or pick greedily) one token per forward pass; `on_tokens` sees each token as it is made."""
    with kernel_context(settings, model) as fusions:
        result = _generate(model, input_ids, settings, cache, generator, on_tokens, fusions)
    result.fusions = fusions.summary()
    return result


def relayout_options(width: int) -> dict:
    """fuse_for_decode's re-layout options for forwards of `width` activation rows: 4-bit layers re-laid for the
    tensor-core GEMV up to its mma_ptx.MAX_ROWS rows, the gated MLP's activation in its epilogue at one row."""
    from modelpress.nn.mma_ptx import MAX_ROWS

    return dict(relayout=width <= MAX_ROWS, interleave=width == 1)


def fused_writes(settings: GenerationSettings) -> bool:
    """Whether a static cache writes keys and values in one kernel a layer (with the decode-time fusions)."""
    return settings.fuse and not settings.compile


@contextlib.contextmanager
def kernel_context(settings: GenerationSettings, *models: nn.Module, verifiers: tuple[nn.Module, ...] = (),
                   rows: int = 1, verify_rows: int = 1) -> Iterator[FusionReport]:
    """The context a generation runs in: the CPU backend's kernels for float32 activations, if asked, and on CUDA
    the decode-time fusions of inference/fusion.py (sibling projections as one matmul; RMS norms with the residual
    adds before them, rotary embeddings and SiLU-times-up as one kernel each), undone on the way out; a static cache
    built inside it writes keys and values in one kernel a layer (`fused_writes`). Not with compile=True: inductor fuses on its own terms,
    and modules and functions made anew for each call would fail the guards of the compiled forward, which is meant
    to be compiled once and reused by later calls. Every forward of `models` after the prefill takes one token (plain
    decoding, a speculative draft's steps), so their int4 layers are re-laid for the tensor-core GEMV. `rows`: the
    sequences decoded together; `verifiers`: models whose later forwards take `verify_rows` tokens (a speculative
    target's verify passes). The GEMV takes up to mma_ptx.MAX_ROWS rows: a model whose forwards take more is not
    re-laid (the weight would be decoded for cuBLAS at every call), and one whose forwards take several without the
    gated MLP's activation in the GEMV's epilogue (which takes one row)."""
    from modelpress.nn.cpu_backend import fast_cpu

    report = FusionReport()
    with contextlib.ExitStack() as stack:
        if settings.cpu_kernels:
            stack.enter_context(fast_cpu())
        for model in dict.fromkeys(models) if settings.fuse and not settings.compile else ():
            if any(p.is_cuda for p in itertools.chain(model.parameters(), model.buffers())):
                if model in IN_SESSION:  # fused already: a second time would fuse the fused modules
                    raise ModelpressError("the model is prepared for decoding by an open DecodeSession (its "
                                          "fusions applied, its graphs kept): generate through that session, or close "
                                          "it first")
                try:
                    width = rows * (verify_rows if model in verifiers else 1)  # activation rows a forward takes
                    fused, undo = fuse_for_decode(model, **relayout_options(width))
                except Exception as err:  # noqa: BLE001  (an optimization: never a reason not to generate)
                    log.warning("decoding unfused: the decode-time fusions failed (%s: %s)", type(err).__name__,
                                str(err).splitlines()[0][:300] if str(err) else "")
                    continue
                stack.callback(undo)
                report.merge(fused)
        if report.skipped:
            log.info("left unfused for decoding: %s", "; ".join(report.skipped))
        yield report


def _generate(model: nn.Module, input_ids: torch.Tensor | list[int], settings: GenerationSettings,
              cache: Cache | None, generator: torch.Generator | None,
              on_tokens: TokenCallback | None, fusions: FusionReport,
              pool: DecoderPool | None = None) -> GenerationResult:
    prompt = prompt_list(input_ids)
    start = time.perf_counter()
    stepper, logits, path, reused = _start(model, prompt, settings, cache, pool)
    forwards, new = 1, []
    while True:
        token = pick(logits[-1], settings.sampling, generator)
        new.append(token)
        if on_tokens is not None:
            on_tokens([token])
        if token in settings.eos_token_ids or len(new) >= settings.max_new_tokens:
            break
        logits = stepper.step(token)
        forwards += 1
    if path == "graph" and getattr(stepper, "graph", None) is None and forwards > 1:
        path = "static"
    if getattr(getattr(stepper, "cache", None), "wrote_fused", False):
        fusions.kv_writes = True
    if pool is not None and path != "eager":  # the prompt and every token fed after it are in the decoder's cache
        pool.remember("model", (prompt + new)[:stepper.position])
    return GenerationResult(tokens=new, prompt_tokens=len(prompt), seconds=time.perf_counter() - start,
                            target_forwards=forwards, decode_path=path,
                            capture_seconds=getattr(stepper, "capture_seconds", 0.0), reused_prompt_tokens=reused)
