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
The self-speculative draft is a low-bit copy of the target (`low_bit_draft`).
"""

from __future__ import annotations

import copy
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
    finish,
    forward_logits,
    kernel_context,
    prompt_list,
)
from modelpress.inference.sampling import next_token_probs, sample


@dataclass(frozen=True)
class SpeculativeConfig:
    draft_tokens: int = 4  # k: tokens the draft proposes per round

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
    with kernel_context(settings):
        return _speculative_generate(target, draft, input_ids, settings, config, target_cache, draft_cache,
                                     generator, on_tokens)


def _speculative_generate(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor | list[int],
                          settings: GenerationSettings, config: SpeculativeConfig, target_cache: Cache | None,
                          draft_cache: Cache | None, generator: torch.Generator | None,
                          on_tokens: TokenCallback | None) -> GenerationResult:
    check_same_vocabulary(target, draft)
    tokens = prompt_list(input_ids)
    prompt_length = len(tokens)
    target_cache = DynamicCache(config=target.config) if target_cache is None else target_cache
    draft_cache = DynamicCache(config=draft.config) if draft_cache is None else draft_cache
    result = GenerationResult(tokens=[], prompt_tokens=prompt_length, seconds=0.0, target_forwards=0)
    start = time.perf_counter()
    if prompt_length > 1:
        forward_logits(target, tokens[:-1], target_cache, last_only=True)
        result.target_forwards += 1
    while True:
        remaining = settings.max_new_tokens - len(result.tokens)
        k = min(config.draft_tokens, remaining - 1)
        drafts, draft_probs = _draft(draft, tokens, draft_cache, k, settings, generator)
        result.draft_forwards += k
        logits = forward_logits(target, tokens[-1:] + drafts, target_cache)     # (k+1, V)
        result.target_forwards += 1
        target_probs = next_token_probs(logits, settings.sampling)
        device = target_probs.device
        accepted, next_token = verify_draft(target_probs.unsqueeze(0), draft_probs.to(device).unsqueeze(0),
                                            torch.tensor([drafts], dtype=torch.long, device=device), generator)
        a = int(accepted)
        _crop(target_cache, k - a)
        _crop(draft_cache, k - 1 - a)
        new, done = finish(drafts[:a] + [int(next_token)], settings)
        result.rounds, result.drafted, result.accepted = result.rounds + 1, result.drafted + k, result.accepted + a
        tokens += new
        result.tokens += new
        if on_tokens is not None:
            on_tokens(new)
        if done or len(result.tokens) >= settings.max_new_tokens:
            break
    result.seconds = time.perf_counter() - start
    return result


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
