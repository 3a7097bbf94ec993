"""Plain autoregressive decoding at batch 1 with a KV cache, streaming tokens to a callback, and the types
shared with speculative decoding (settings in, tokens + counters out).

tokens/s counts every new token over the whole call, prompt prefill included.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from modelpress.errors import ModelpressError
from modelpress.inference.sampling import SamplingConfig, next_token_probs, sample

TokenCallback = Callable[[list[int]], None]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] = ()  # generation stops after emitting one of these (it is kept)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ModelpressError(f"max new tokens must be a positive integer, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    tokens: list[int]          # new tokens only
    prompt_tokens: int
    seconds: float
    target_forwards: int       # forward passes of the (target) model, prefill included
    draft_forwards: int = 0
    drafted: int = 0           # draft tokens proposed
    accepted: int = 0          # draft tokens accepted
    rounds: int = 0            # draft-then-verify rounds

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
                "acceptance_rate": self.acceptance_rate, "rounds": self.rounds, "tokens": self.tokens}


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


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor | list[int], settings: GenerationSettings,
             cache: Cache | None = None, generator: torch.Generator | None = None,
             on_tokens: TokenCallback | None = None) -> GenerationResult:
    """Sample (or pick greedily) one token per forward pass; `on_tokens` sees each token as it is made."""
    prompt = prompt_list(input_ids)
    cache = DynamicCache(config=model.config) if cache is None else cache
    start = time.perf_counter()
    logits = forward_logits(model, prompt, cache, last_only=True)
    forwards, new = 1, []
    while True:
        token = int(sample(next_token_probs(logits[-1], settings.sampling), generator))
        new.append(token)
        if on_tokens is not None:
            on_tokens([token])
        if token in settings.eos_token_ids or len(new) >= settings.max_new_tokens:
            break
        logits = forward_logits(model, [token], cache, last_only=True)
        forwards += 1
    return GenerationResult(tokens=new, prompt_tokens=len(prompt), seconds=time.perf_counter() - start,
                            target_forwards=forwards)
