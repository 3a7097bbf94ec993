"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a cheap draft model proposes k tokens,
the target scores all of them in one forward pass, and each proposal x is kept with probability
min(1, p(x)/q(x)) (p: target, q: draft, both after the same temperature/top-k/top-p). At the first
rejection the token is redrawn from norm(max(0, p - q)); when all k are kept a bonus token comes from the
target's next distribution. Every emitted token is then distributed exactly as sampling the target
alone; with greedy settings (one-hot p and q) the output is the target's own greedy output.

Cache bookkeeping, per round, with n tokens so far (prompt + generated) and `last` the newest one:
- the target cache holds the first n-1 tokens; the verify pass feeds [last, d1..dk] and is cropped back
  to n + a entries after a of the k drafts are accepted;
- the draft cache holds at most n-1 tokens; it catches up on what it has not seen, drafts d1..dk, and is
  cropped to n + min(a, k-1) entries (dk itself was never fed to it).
Every round drafts k, the last one too: the tokens past the length limit are dropped (a prefix of an exact sample
is exact), and every verify pass has the same length, so the graph path captures one graph per model (the last
rounds would otherwise each capture a shorter verify pass, and pay its capture and first launch).
The self-speculative draft is a low-bit copy of the target (`low_bit_draft`).

Decode paths (GenerationSettings.decode, resolved per model by decoding.decode_path): eager runs both models
on DynamicCaches as above (also whenever a cache is given). static and graph give each model a StaticDecoder
(static_decode.py) with the same bookkeeping: "crop to m entries" becomes "rewind to position m", the draft
catches up and drafts with single steps, and the target verifies with one T = k+1 token forward; under graph
each forward length is captured once in a CUDA graph and replayed. There a draft of the target's own architecture
(self-speculation) reads the target's cache instead of keeping one (shared_cache_obstacle says when it can): it has
no prefill and never lags, so a round is k single draft steps, its position set to the target's after each verdict.
native (the CPU's default where it serves the model) gives a model a NativeDecoder (native_decode.py) with the same
interface: its verify pass is one native call over the k+1 tokens. If either model must decode eagerly, both do.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.inference.decoding import (
    GenerationResult,
    GenerationSettings,
    TokenCallback,
    decode_path,
    finish,
    forward_logits,
    fused_writes,
    held_prefix,
    kernel_context,
    prompt_list,
    supports_logits_to_keep,
)
from modelpress.inference.decoder_pool import DecoderPool, pooled
from modelpress.inference.fusion import FusionReport, reads_kv_codes
from modelpress.inference.kv_cache import make_kv_cache
from modelpress.inference.sampling import next_token_probs, pick, sample
from modelpress.inference.native_decode import NativeDecoder
from modelpress.inference.static_decode import StaticDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeculativeConfig:
    draft_tokens: int = 4  # k: tokens the draft proposes per round
    # a draft of the target's own architecture (self-speculation: a low-bit copy) reads the target's KV cache on
    # the static, graph and native paths instead of keeping its own (see shared_cache_obstacle); False: always its own
    share_kv_cache: bool = True

    def __post_init__(self) -> None:
        if self.draft_tokens <= 0:
            raise ModelpressError(f"draft tokens must be a positive integer, got {self.draft_tokens}")


def verify_draft(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/resample rule, batched over rows.

    target_probs (B, k+1, V): p at each drafted position, plus the position after the last draft
    draft_probs  (B, k, V):   q the drafts were drawn from
    draft_tokens (B, k)
    Returns accepted (B,) in 0..k (length of the kept prefix) and next_token (B,): the resampled token at
    the first rejection, or the bonus token when all k were kept.
    """
    b, k = draft_tokens.shape
    rows = torch.arange(b, device=target_probs.device)
    if k:
        index = draft_tokens.unsqueeze(-1)
        p_token = target_probs[:, :k].gather(-1, index).squeeze(-1)        # (B, k)
        q_token = draft_probs.gather(-1, index).squeeze(-1)                 # (B, k), > 0: the draft drew them
        uniform = torch.rand(b, k, generator=generator, device=target_probs.device)
        kept = uniform * q_token < p_token                                  # u < p/q without dividing
        accepted = kept.long().cumprod(dim=-1).sum(dim=-1)
    else:
        accepted = torch.zeros(b, dtype=torch.long, device=target_probs.device)
    p_next = target_probs[rows, accepted]                                   # (B, V)
    if not k:
        return accepted, sample(p_next, generator)
    q_next = draft_probs[rows, accepted.clamp(max=k - 1)]
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass 0 means p == q up to rounding, where a rejection has probability ~0: fall back to p
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_next)
    distribution = torch.where((accepted < k).unsqueeze(-1), residual, p_next)
    return accepted, sample(distribution, generator)


def vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_same_vocabulary(target: nn.Module, draft: nn.Module) -> None:
    t, d = vocabulary_size(target), vocabulary_size(draft)
    if t != d:
        raise ModelpressError(f"the draft model scores {d} tokens but the target scores {t}; speculative "
                              "decoding needs a draft that shares the target's tokenizer and vocabulary")


def low_bit_draft(model: nn.Module, scheme: WeightScheme) -> nn.Module:
    """A copy of `model` with its linear layers quantized by RTN under `scheme` (the output head stays float)."""
    from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn

    draft = copy.deepcopy(model)
    quantize_rtn(draft, RTNConfig(scheme=scheme))
    return draft.eval()


def _crop(cache: Cache, tokens: int) -> None:
    if tokens > 0:
        cache.crop(-tokens)  # negative: remove this many, in every transformers 5.x release


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor | list[int],
                         settings: GenerationSettings, config: SpeculativeConfig = SpeculativeConfig(),
                         target_cache: Cache | None = None, draft_cache: Cache | None = None,
                         generator: torch.Generator | None = None,
                         on_tokens: TokenCallback | None = None) -> GenerationResult:
    with kernel_context(settings, target, draft, verifiers=(target,), verify_rows=config.draft_tokens + 1) as fusions:
        result = _speculative_generate(target, draft, input_ids, settings, config, target_cache, draft_cache,
                                       generator, on_tokens, fusions)
    result.fusions = fusions.summary()
    return result


def _speculative_generate(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor | list[int],
                          settings: GenerationSettings, config: SpeculativeConfig, target_cache: Cache | None,
                          draft_cache: Cache | None, generator: torch.Generator | None,
                          on_tokens: TokenCallback | None, fusions: FusionReport,
                          pool: DecoderPool | None = None) -> GenerationResult:
    check_same_vocabulary(target, draft)
    _warn_if_windowed(settings, target_cache)
    tokens = prompt_list(input_ids)
    paths = speculation_paths(target, draft, settings, target_cache, draft_cache)
    if paths != ("eager", "eager"):
        result = _static_speculation(target, draft, tokens, settings, config, paths, generator, on_tokens, fusions,
                                     pool)
        if result is not None:
            return result
    prompt_length = len(tokens)
    if target_cache is None:  # settings.kv_cache is the target's KV cache (the draft's stays float)
        kv = settings.kv_config
        target_cache = DynamicCache(config=target.config) if kv.mode == "float" else make_kv_cache(target, kv)
    draft_cache = DynamicCache(config=draft.config) if draft_cache is None else draft_cache
    result = GenerationResult(tokens=[], prompt_tokens=prompt_length, seconds=0.0, target_forwards=0)
    start = time.perf_counter()
    if prompt_length > 1:
        forward_logits(target, tokens[:-1], target_cache, last_only=True)
        result.target_forwards += 1
    k = config.draft_tokens  # every round, the last too (its surplus tokens are dropped): one verify length
    while True:
        drafts, draft_probs = _draft(draft, tokens, draft_cache, k, settings, generator)
        result.draft_forwards += k
        logits = forward_logits(target, tokens[-1:] + drafts, target_cache)     # (k+1, V)
        result.target_forwards += 1
        a, next_token = _judge(logits, draft_probs, drafts, settings, generator)
        _crop(target_cache, k - a)
        _crop(draft_cache, k - 1 - a)
        if _emit(result, tokens, drafts[:a] + [next_token], k, a, settings, on_tokens):
            break
    result.seconds = time.perf_counter() - start
    return result


def _warn_if_windowed(settings: GenerationSettings, target_cache: Cache | None) -> None:
    """A KV cache with a float window (KIVI int4/int2, or a residual length) decides what is quantized by the
    cache's length after each call: a verify pass of k+1 tokens quantizes key groups, and moves tokens out of the
    window, a few tokens earlier than single steps would, so the accepted tokens follow the target as it decodes
    in blocks of k+1, not exactly as it decodes token by token (float and per-token int8/fp8 caches: exactly)."""
    kv = settings.kv_config
    if target_cache is None and kv.mode != "float" and kv.residual > 0:
        log.warning("KV cache %r keeps a float window of %d tokens: speculative decoding's verify passes quantize "
                    "a few tokens earlier than plain decoding does, so its output follows the target with this cache "
                    "closely but not exactly (float, int8 and fp8 caches without a window: exactly)", kv.mode,
                    kv.residual)


def speculation_paths(target: nn.Module, draft: nn.Module, settings: GenerationSettings,
                      target_cache: Cache | None, draft_cache: Cache | None) -> tuple[str, str]:
    """(target path, draft path): both eager, or each static or graph (a model on the eager path, e.g. one given
    a cache, makes both eager: the loop drives two DynamicCaches or two StaticDecoders)."""
    paths = decode_path(target, settings, target_cache), decode_path(draft, settings, draft_cache)
    if "eager" in paths and paths != ("eager", "eager"):
        log.warning("speculative decoding runs both models eagerly: the %s decodes eagerly",
                    "target" if paths[0] == "eager" else "draft")
        return "eager", "eager"
    return paths


def _judge(logits: torch.Tensor, draft_probs: torch.Tensor, drafts: list[int] | torch.Tensor,
           settings: GenerationSettings, generator: torch.Generator | None) -> tuple[int, int]:
    """The accept rule on one round: target logits (k+1, V), draft distributions (k, V) -> (accepted, next token)."""
    a, token = torch.cat(_verdict(logits, draft_probs, drafts, settings, generator)).tolist()  # one wait for both
    return a, token


def _verdict(logits: torch.Tensor, draft_probs: torch.Tensor, drafts: list[int] | torch.Tensor,
             settings: GenerationSettings, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """_judge's (accepted, next token) as two (1,) int64 tensors where the logits are, nothing read by the host.
    Greedy, the rule on one-hot distributions is: keep the drafts up to the first that is not the target's argmax,
    then take the target's argmax there; that is computed directly (no distributions, no draws)."""
    device = logits.device
    drafted = torch.as_tensor(drafts, dtype=torch.long).to(device)
    if settings.sampling.greedy:
        best = logits.argmax(dim=-1)                                              # (k+1,)
        accepted = (best[:-1] == drafted).long().cumprod(dim=0).sum().view(1)
        return accepted, best.index_select(0, accepted)  # (indexing by a 0-d tensor would read it on the host)
    target_probs = next_token_probs(logits, settings.sampling)
    return verify_draft(target_probs.unsqueeze(0), draft_probs.to(device).unsqueeze(0), drafted.view(1, -1),
                        generator)


def _emit(result: GenerationResult, tokens: list[int], new: list[int], k: int, a: int,
          settings: GenerationSettings, on_tokens: TokenCallback | None) -> bool:
    """Record a round that drafted k and kept a, emitting `new` up to the length limit (a last round may make more
    tokens than are left: any prefix of them is distributed as the target's; its drafts past the limit count in
    neither `drafted` nor `accepted`); True when generation is done."""
    remaining = settings.max_new_tokens - len(result.tokens)
    new, done = finish(new[:remaining], settings)
    useful = min(k, remaining - 1)  # drafts that could be emitted, with the token the verify pass adds
    result.rounds, result.drafted = result.rounds + 1, result.drafted + useful
    result.accepted += min(a, useful)
    tokens += new
    result.tokens += new
    if on_tokens is not None:
        on_tokens(new)
    return done or len(result.tokens) >= settings.max_new_tokens


def _static_speculation(target: nn.Module, draft: nn.Module, tokens: list[int], settings: GenerationSettings,
                        config: SpeculativeConfig, paths: tuple[str, str], generator: torch.Generator | None,
                        on_tokens: TokenCallback | None, fusions: FusionReport,
                        pool: DecoderPool | None = None) -> GenerationResult | None:
    """The loop above on two StaticDecoders, positions in the role of cache lengths (module docstring); None
    (reason logged) if a static prefill fails, for the caller to run the eager loop. The decoders come from `pool`
    when given (a DecodeSession's)."""
    start = time.perf_counter()
    result = GenerationResult(tokens=[], prompt_tokens=len(tokens), seconds=0.0, target_forwards=0)
    decoders = _prefilled_decoders(target, draft, tokens, settings, config, paths, pool)
    if decoders is None:
        return None
    verifier, drafter, shared, result.reused_prompt_tokens = decoders
    result.target_forwards = result.draft_forwards = int(len(tokens) > 1)
    k = config.draft_tokens  # every round, the last too: one verify length, so one captured graph
    if shared:
        result.draft_forwards, result.shared_kv_cache = 0, True
        _shared_cache_rounds(verifier, drafter, tokens, k, settings, generator, result, on_tokens)
    else:
        while True:
            drafts, draft_probs, forwards = _draft_steps(drafter, tokens, k, settings, generator)
            result.draft_forwards += forwards
            logits = verifier.forward(_verify_feed(verifier, tokens[-1], drafts))  # (k+1, V): positions n-1..n+k-1
            result.target_forwards += 1
            a, next_token = _judge(logits, draft_probs, drafts, settings, generator)
            drafts = drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts
            verifier.rewind(k - a)                       # keeps n + a: the tokens so far and the accepted drafts
            drafter.rewind(max(0, k - 1 - a))            # keeps n + min(a, k-1) of its n + k-1 (dk was not fed)
            if _emit(result, tokens, drafts[:a] + [next_token], k, a, settings, on_tokens):
                break
    result.seconds = time.perf_counter() - start
    if pool is not None:  # the slots before a decoder's (settled) position hold the tokens so far, but the last
        pool.remember("target", tokens[:min(verifier.position, len(tokens) - 1)])   # (never fed, or not by all)
        if not shared:
            pool.remember("draft", tokens[:min(drafter.position, len(tokens) - 1)])
    result.capture_seconds = verifier.capture_seconds + drafter.capture_seconds
    fusions.kv_writes |= any(getattr(getattr(d, "cache", None), "wrote_fused", False) for d in (verifier, drafter))
    ran = {verifier.path, drafter.path}   # graph only if both were captured; native only if both were native
    result.decode_path = ran.pop() if len(ran) == 1 else "static" if ran == {"graph", "static"} else "mixed"
    return result


def _shared_cache_rounds(verifier: StaticDecoder | NativeDecoder, drafter: StaticDecoder | NativeDecoder,
                         tokens: list[int], k: int,
                         settings: GenerationSettings, generator: torch.Generator | None, result: GenerationResult,
                         on_tokens: TokenCallback | None) -> None:
    """The rounds of a draft that reads the target's cache, queued one round ahead of the host (on the CPU's native
    step, where nothing is queued, the same loop runs each round as it is queued).

    A round needs nothing from the host: the token it feeds first (the last round's next token) and both positions
    stay on the device, the verdict is computed there and moves the target's position back over the rejected drafts
    (StaticDecoder.rewind_device), and the draft starts where the target is (follow). So round r+1 is queued before
    the host reads round r's verdict, and the GPU runs on while the host waits for it and launches: no idle between
    rounds (before, the host waited for each verdict and only then launched the next round's first draft step).
    A round is queued ahead only while the round before cannot reach the length limit; an end-of-sequence token
    read late wastes the one round queued after it. The host's positions are upper bounds (a round's rejected drafts
    are counted until its verdict is read; the caches have k spare slots for that)."""
    device = verifier.device
    last = torch.tensor([tokens[-1]], dtype=torch.long, device=device)  # the token the next round feeds first
    cuda = device.type == "cuda"
    # each round's [accepted, next, d1..dk] lands in one of two pinned buffers; an event says when it is there
    landing = [torch.empty(k + 2, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
    queued: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def queue_round() -> None:
        drafter.follow(verifier)
        logits = drafter.forward(last)
        drafts, probs = [], []
        for i in range(k):
            if settings.sampling.greedy:
                token = logits[-1].argmax().view(1)
            else:
                q = next_token_probs(logits[-1], settings.sampling)
                token = sample(q, generator).view(1)
                probs.append(q)
            drafts.append(token)
            if i < k - 1:
                logits = drafter.forward(token)
        drafts = torch.cat(drafts)
        logits = verifier.forward(torch.cat([last, drafts]))                  # (k+1, V) at positions n-1 .. n+k-1
        accepted, next_token = _verdict(logits, torch.stack(probs) if probs else torch.zeros(0, 0), drafts,
                                        settings, generator)
        verifier.rewind_device(k - accepted)
        last.copy_(next_token)
        buffer = landing[result.target_forwards % 2]
        buffer.copy_(torch.cat([accepted, next_token, drafts]), non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        queued.append((buffer, event))
        result.draft_forwards += k
        result.target_forwards += 1

    def read_round() -> bool:
        buffer, event = queued.pop(0)
        if event is not None:
            event.synchronize()
        a, next_token, *drafts = buffer.tolist()
        verifier.settle(k - a)
        return _emit(result, tokens, drafts[:a] + [next_token], k, a, settings, on_tokens)

    queue_round()
    while True:
        if len(result.tokens) + k + 1 < settings.max_new_tokens:  # the queued round cannot finish the generation
            queue_round()
        if read_round():
            return
        if not queued:
            queue_round()


def _prefilled_decoders(target: nn.Module, draft: nn.Module, tokens: list[int], settings: GenerationSettings,
                        config: SpeculativeConfig, paths: tuple[str, str], pool: DecoderPool | None = None
                        ) -> tuple[StaticDecoder, StaticDecoder, bool, int] | None:
    """(target's, draft's) StaticDecoder (or NativeDecoder), both holding the first n-1 tokens (the draft's first
    step feeds the last), whether the draft reads the target's cache, and how many of those tokens the target's
    held from a session's last call (not run again); None, with the reason logged, if a prefill fails."""
    # a round starts with at least one token left (n <= prompt + max_new_tokens - 1): its verify pass writes slots
    # n-1 .. n+k-1, at most prompt + max_new_tokens + k - 2
    max_len = len(tokens) + settings.max_new_tokens + config.draft_tokens + 1
    obstacle = shared_cache_obstacle(target, draft, paths, settings) if config.share_kv_cache else "not asked"
    if obstacle is None:  # _shared_cache_rounds' host positions may run up to k ahead of the device's
        max_len += config.draft_tokens
    elif config.share_kv_cache:
        log.info("the draft keeps its own KV cache: %s", obstacle)
    shared = obstacle is None
    verifier = pooled(pool, "target", max_len,
                      lambda length: _decoder(target, paths[0], length, settings, settings.kv_config))
    if shared:  # on the cache of the verifier this call got (of its length)
        drafter = pooled(pool, "draft", verifier.max_len,
                         lambda length: _decoder(draft, paths[1], length, settings, None, verifier),
                         suits=lambda kept: kept.cache_owner is verifier)
    else:
        drafter = pooled(pool, "draft", max_len, lambda length: _decoder(draft, paths[1], length, settings, None))
    # a session's decoders may hold a prefix of the prompt from its last call: only the rest runs
    starts = (held_prefix(pool, tokens[:-1], "target"), 0 if shared else held_prefix(pool, tokens[:-1], "draft"))
    if len(tokens) > 1:
        try:
            verifier.prefill(tokens[:-1], starts[0])
            if not shared:
                drafter.prefill(tokens[:-1], starts[1])
            else:  # the target's prompt keys and values are the draft's
                drafter.move_to(verifier.position)
        except Exception as err:  # noqa: BLE001  (a model the static cache cannot drive: say why, run eagerly)
            log.warning("static-cache prefill failed (%s: %s); speculative decoding runs eagerly",
                        type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
            return None
    return verifier, drafter, shared, starts[0]


def _decoder(model: nn.Module, path: str, max_len: int, settings: GenerationSettings, kv_cache,
             share_with: StaticDecoder | NativeDecoder | None = None) -> StaticDecoder | NativeDecoder:
    """A decoder on its own cache, or on `share_with`'s (a decoder of the same kind)."""
    if path == "native":
        mode = share_with.kv_cache if share_with is not None else "float" if kv_cache is None else kv_cache.mode
        decoder = NativeDecoder(model, max_len, products=settings.cpu_products, kv_cache=mode, shared=share_with)
    else:
        decoder = StaticDecoder(model, max_len, graph=path == "graph", keep_last_only=supports_logits_to_keep(model),
                                kv_cache=kv_cache, compile=settings.compile, fused_writes=fused_writes(settings),
                                cache=None if share_with is None else share_with.cache)
    decoder.cache_owner = share_with
    return decoder


# what must agree for a draft to attend over the target's keys and values (the cache's geometry and masks), and
# what makes it the target's own architecture rather than another model that happens to share that geometry
SHARED_CACHE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "vocab_size", "sliding_window", "layer_types", "rope_theta", "rope_parameters",
                       "max_position_embeddings")


def shared_cache_obstacle(target: nn.Module, draft: nn.Module, paths: tuple[str, str],
                          settings: GenerationSettings) -> str | None:
    """Why the draft cannot read the target's KV cache (a StaticDecoder's, or a NativeDecoder's), or None.

    A self-speculative draft (a low-bit copy of the target) can: every slot the draft writes while drafting is
    rewritten by the verify pass, which writes each layer's keys and values of its k+1 tokens before attending, so
    the target only ever reads its own; the slots before a round hold the target's keys and values, and the draft
    reads them where it would read its own (close to them: it is the same model, quantized). The output is exact
    whatever the draft reads; what changes is the draft's work: no prefill of its own, one step per round instead of
    two after a round that kept every draft (its cache never lags), and one cache's memory instead of two."""
    if paths != ("native", "native") and not set(paths) <= {"static", "graph"}:
        return f"the {paths[0]} / {paths[1]} decode paths keep one cache a model"
    kv = settings.kv_config
    if kv.mode != "float" and (kv.residual > 0 or kv.codecs()[0].layout == "channel"):
        return (f"the {kv.mode} KV cache keeps a float window whose contents follow its write order, which the "
                f"draft's writes would change")
    if paths != ("native", "native") and reads_kv_codes(target, kv) != reads_kv_codes(draft, kv):
        return "the int8 KV cache hands the target's attention its codes, which the draft's attention does not read"

    def text(model: nn.Module):
        config = model.config
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    t, d = text(target), text(draft)
    differ = [f for f in SHARED_CACHE_FIELDS if getattr(t, f, None) != getattr(d, f, None)]
    if differ:
        return f"the draft is not the target's architecture ({', '.join(differ)} differ)"
    t_param, d_param = next(target.parameters()), next(draft.parameters())
    if (t_param.dtype, t_param.device) != (d_param.dtype, d_param.device):
        return (f"the draft computes in {d_param.dtype} on {d_param.device}, the target in {t_param.dtype} on "
                f"{t_param.device}")
    return None


def _draft_steps(drafter: StaticDecoder | NativeDecoder, tokens: list[int], k: int, settings: GenerationSettings,
                 generator: torch.Generator | None) -> tuple[list[int] | torch.Tensor, torch.Tensor, int]:
    """k tokens drawn from the draft on its static cache, the (k, V) distributions they were drawn from (greedy:
    its argmaxes, and no distributions, (0, 0)), and the forward passes run: one step per token the draft has not
    seen (one, or two after a round that kept every draft), then one per draft but the last. On a StaticDecoder
    the tokens stay where they are drawn, a (k,) tensor on the device fed straight to the next step, so the host
    queues all k steps without waiting for one (the round's one wait is for the verdict); a NativeDecoder takes
    them as a list."""
    unseen = tokens[drafter.position:]
    for token in unseen[:-1]:
        drafter.step(token)
    logits = drafter.step(unseen[-1])  # (1, V), a static buffer: turned into q before the next step
    on_device = isinstance(drafter, StaticDecoder)
    greedy = settings.sampling.greedy  # the argmax; _judge needs no distributions then
    drafts = []
    probs = []
    for i in range(k):
        if greedy:
            token = logits[-1].argmax().view(1) if on_device else pick(logits[-1], settings.sampling)
        else:
            q = next_token_probs(logits[-1], settings.sampling)
            token = sample(q, generator).view(1)
            probs.append(q)
        drafts.append(token if on_device else int(token))
        if i < k - 1:
            logits = drafter.forward(token) if on_device else drafter.step(drafts[-1])
    q = torch.stack(probs) if probs else torch.zeros(0, 0)
    return torch.cat(drafts) if on_device else drafts, q, len(unseen) + k - 1


def _verify_feed(verifier: StaticDecoder | NativeDecoder, last: int, drafts: list[int] | torch.Tensor
                 ) -> list[int] | torch.Tensor:
    """[last, d1..dk] in the form the verifier takes: a device tensor for a StaticDecoder when the drafts are one."""
    if not isinstance(drafts, torch.Tensor):
        return [last, *drafts]
    if isinstance(verifier, StaticDecoder):
        return torch.cat([torch.tensor([last], dtype=torch.long).to(drafts.device, non_blocking=True), drafts])
    return [last, *drafts.tolist()]


def _draft(draft: nn.Module, tokens: list[int], cache: Cache, k: int, settings: GenerationSettings,
           generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
    """k tokens drawn from the draft, and the (k, V) distributions they were drawn from."""
    drafts: list[int] = []
    probs = []
    feed = tokens[cache.get_seq_length():]  # catch up on tokens the draft has not seen
    for _ in range(k):
        q = next_token_probs(forward_logits(draft, feed, cache, last_only=True)[-1], settings.sampling)
        token = int(sample(q, generator))
        drafts.append(token)
        probs.append(q)
        feed = [token]
    if not probs:
        return drafts, torch.zeros(0, 0)
    return drafts, torch.stack(probs)
