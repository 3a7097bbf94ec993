"""Generation for several prompts at once: one forward a step for the whole batch, on the static cache.

The prompts are left-padded to the longest and decoded together by one StaticDecoder of B rows (static_decode.py
says how the padding is masked): on CUDA the step is captured in a CUDA graph once and replayed, as at batch 1, and
every weight read of a step serves B tokens instead of one. Each row stops at its own end-of-sequence token or at
the length limit; a finished row is still fed (its tokens are dropped) until every row is done, so the step keeps
one shape.

Tokens are picked on the device for all rows at once (argmax, or one draw a row from next_token_probs), and read
back once a step. Greedy rows match what `generate` gives each prompt alone up to the matmuls' rounding at another
row count (tests: equal tokens on the default model in float32).

Where the static cache cannot serve the batch (decode="eager", a model it cannot mask, a KV mode that quantizes keys
over groups of tokens, whose groups a row's padding would shift), or where one prompt at a time is faster (on the
CPU, a packed model the native step serves, or decode="native"), or where the batched prefill fails, the prompts are
generated one at a time through `generate`, and the reason is logged; `BatchGenerationResult.batched` says which
happened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.inference.decoding import (GenerationSettings, fused_writes, generate, kernel_context, model_device,
                                           native_path_obstacle, prompt_list, static_cache_obstacle,
                                           supports_logits_to_keep)
from modelpress.inference.decoder_pool import DecoderPool, pooled
from modelpress.inference.fusion import FusionReport
from modelpress.inference.kv_cache import KV_MODES
from modelpress.inference.sampling import SamplingConfig, next_token_probs, sample
from modelpress.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)


@dataclass
class BatchGenerationResult:
    tokens: list[list[int]]    # each prompt's new tokens (cut after its end-of-sequence token)
    prompt_tokens: list[int]   # each prompt's length
    seconds: float             # the whole call, prefill and graph capture included
    forwards: int              # forward passes (of the whole batch, or of every prompt when not batched)
    decode_path: str           # the path that ran: static or graph when batched, else the paths of the rows
    batched: bool              # whether the rows decoded together (else one at a time, the reason logged)
    capture_seconds: float = 0.0
    fusions: str = ""

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"rows": len(self.tokens), "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "forwards": self.forwards,
                "decode_path": self.decode_path, "batched": self.batched, "capture_seconds": self.capture_seconds,
                "fusions": self.fusions, "tokens": self.tokens}


def pick_rows(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """One token a row of (B, V) logits, as a (B,) int64 tensor on their device: the argmax when greedy, else a
    draw from next_token_probs."""
    if config.greedy:
        return logits.argmax(dim=-1)
    return sample(next_token_probs(logits, config), generator)


def batch_obstacle(model: nn.Module, settings: GenerationSettings) -> str | None:
    """Why the prompts cannot (or should not) decode together on the static cache, or None."""
    if settings.decode == "eager":
        return "decode='eager' asks for transformers' dynamic cache, one prompt at a time"
    if settings.decode == "native":
        return "decode='native' asks for the native CPU step, which decodes one sequence"
    if settings.decode == "auto" and native_path_obstacle(model, settings, None) is None and any(
            isinstance(m, QuantLinear) for m in model.modules()):
        # the default model with int4/g32 layers and an int8 head, 2 threads: 222-230 tok/s one prompt at a time on
        # the native step, 81-144 over 2-8 prompts on the static cache (float weights: 48-49 against 59-126;
        # bench/cpu_batch.py)
        return "the native CPU step decodes a packed model one prompt at a time faster than a batch"
    mode = settings.kv_config.mode
    if mode in KV_MODES and KV_MODES[mode].kivi:
        return (f"the {mode} KV cache quantizes keys over groups of tokens, which a row's padding would shift; "
                f"batches take float, int8 or fp8 caches")
    return static_cache_obstacle(model, None, mode)


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: list[list[int]] | list[torch.Tensor] | torch.Tensor,
                   settings: GenerationSettings, generator: torch.Generator | None = None,
                   on_step: Callable[[list[int]], None] | None = None, session=None) -> BatchGenerationResult:
    """New tokens for each of `prompts` (token ids: a list of lists, or a (B, T) tensor of unpadded rows), decoded
    together where the static cache serves the batch (on CUDA with the step captured in a CUDA graph), else one
    prompt at a time; the same settings for every row. `on_step` sees each batched step's tokens, one a row
    (finished rows' included; not called when the prompts run one at a time). `session`: the DecodeSession whose
    prepared model and kept decoders the call uses (session.py; its generate_rows passes itself)."""
    rows = [prompt_list(p) for p in (prompts.unbind(0) if isinstance(prompts, torch.Tensor) else prompts)]
    if not rows:
        raise ModelpressError("no prompts to generate for")
    reason = batch_obstacle(model, settings) if len(rows) > 1 else "one prompt"
    if reason is not None:
        if len(rows) > 1:
            log.warning("generating the %d prompts one at a time: %s", len(rows), reason)
        return _one_at_a_time(model, rows, settings, generator, session)
    if session is None:  # a step's matmuls take B rows: 4-bit layers re-laid for the tensor-core GEMV up to its limit
        with kernel_context(settings, model, rows=len(rows)) as fusions:
            result = _batched(model, rows, settings, generator, on_step, fusions)
    else:
        fusions = session.fusions
        result = _batched(model, rows, settings, generator, on_step, fusions, session.pool)
    if result is None:  # the static prefill failed (said why): as generate falls back to its eager path
        return _one_at_a_time(model, rows, settings, generator, session)
    result.fusions = fusions.summary()
    return result


def _one_at_a_time(model: nn.Module, rows: list[list[int]], settings: GenerationSettings,
                   generator: torch.Generator | None, session=None) -> BatchGenerationResult:
    start = time.perf_counter()
    results = [generate(model, row, settings, generator=generator) if session is None
               else session.generate_one(row, settings, generator) for row in rows]
    return BatchGenerationResult(
        tokens=[r.tokens for r in results], prompt_tokens=[len(row) for row in rows],
        seconds=time.perf_counter() - start, forwards=sum(r.target_forwards for r in results),
        decode_path=",".join(dict.fromkeys(r.decode_path for r in results)), batched=False,
        capture_seconds=sum(r.capture_seconds for r in results), fusions=results[-1].fusions)


def _batched(model: nn.Module, rows: list[list[int]], settings: GenerationSettings,
             generator: torch.Generator | None, on_step: Callable[[list[int]], None] | None,
             fusions: FusionReport, pool: DecoderPool | None = None) -> BatchGenerationResult | None:
    from modelpress.inference.static_decode import StaticDecoder

    start = time.perf_counter()
    graph = model_device(model).type == "cuda" and settings.decode in ("auto", "graph")
    if settings.decode == "graph" and not graph:
        log.warning("CUDA graphs need a CUDA device, the model is on %s; decoding on a static cache without one",
                    model_device(model))
    decoder = pooled(pool, f"rows:{len(rows)}", max(map(len, rows)) + settings.max_new_tokens, lambda length:
                     StaticDecoder(model, length, graph=graph, keep_last_only=supports_logits_to_keep(model),
                                   kv_cache=settings.kv_config, compile=settings.compile,
                                   fused_writes=fused_writes(settings), batch=len(rows)))
    try:
        logits = decoder.prefill_rows(rows)
    except Exception as err:  # noqa: BLE001  (a model the static cache cannot drive: say why, go one at a time)
        log.warning("batched static-cache prefill failed (%s: %s); generating the prompts one at a time",
                    type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
        return None
    forwards, new = 1, [[] for _ in rows]
    done = [False] * len(rows)
    eos = set(settings.eos_token_ids)
    while True:
        picked = pick_rows(logits, settings.sampling, generator)
        tokens = picked.tolist()
        if on_step is not None:
            on_step(tokens)
        for row, token in enumerate(tokens):
            if not done[row]:
                new[row].append(token)
                done[row] = token in eos or len(new[row]) >= settings.max_new_tokens
        if all(done):
            break
        logits = decoder.step_rows(picked)
        forwards += 1
    if getattr(decoder.cache, "wrote_fused", False):
        fusions.kv_writes = True
    return BatchGenerationResult(tokens=new, prompt_tokens=[len(row) for row in rows],
                                 seconds=time.perf_counter() - start, forwards=forwards,
                                 decode_path="graph" if decoder.graph is not None else "static", batched=True,
                                 capture_seconds=decoder.capture_seconds)
