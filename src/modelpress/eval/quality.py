"""Perplexity, KL divergence and top-1 agreement of next-token distributions, over fixed windows.

Which positions of a window of T tokens are scored (`score`), each token predicted from the ones before it
within the window:
- "all" (the default): every position but the first, T - 1 tokens;
- "second-half": only tokens T//2 + 1 .. T - 1 (T - 1 - T//2 of them), as llama.cpp's perplexity tool
  does, so every scored token has at least half a window of context. Use it (with BOS-led windows when the
  tokenizer adds a BOS, see io/text.py) to compare figures with llama.cpp's.
KL divergence is KL(reference ‖ model), averaged over scored tokens,
in nats; top-1 agreement is the share of positions where both models' most likely next token is the same.
Several models can be scored in one pass so the reference runs once per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.progress import progress


SCORING = ("all", "second-half")


def first_scored(seq_len: int, score: str = "all") -> int:
    """Index of the first scored next-token prediction (prediction j is of token j + 1)."""
    if score not in SCORING:
        raise ModelpressError(f"unknown scoring {score!r}; choose one of {', '.join(SCORING)}")
    return 0 if score == "all" else seq_len // 2


@dataclass(frozen=True)
class QualityResult:
    perplexity: float
    kl_divergence: float | None
    top1_agreement: float | None
    scored_tokens: int
    windows: int


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0


def next_token_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1, V) float32 logits predicting tokens 1..T-1 of each window."""
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), use_cache=False)
    return out.logits[:, :-1].float()


@torch.no_grad()
def evaluate_quality(models: dict[str, nn.Module], windows: torch.Tensor, reference: nn.Module | None = None,
                     batch_size: int = 1, score: str = "all") -> dict[str, QualityResult]:
    if windows.numel() == 0 or windows.dim() != 2 or windows.shape[1] < 2:
        raise ModelpressError(f"need at least one window of 2+ tokens to evaluate, got shape {tuple(windows.shape)}")
    first = first_scored(windows.shape[1], score)
    totals = {name: _Totals() for name in models}
    batches = windows.split(batch_size)
    for batch in progress(batches, desc="evaluate", total=len(batches)):
        targets = batch[:, first + 1:]
        ref_logprobs = None
        if reference is not None:
            ref_logprobs = F.log_softmax(next_token_logits(reference, batch)[:, first:], dim=-1).cpu()
        for name, model in models.items():
            if model is reference:
                logprobs = ref_logprobs
            else:
                logprobs = F.log_softmax(next_token_logits(model, batch)[:, first:], dim=-1).cpu()
            t = totals[name]
            t.nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
            t.tokens += targets.numel()
            if ref_logprobs is not None:
                t.kl += (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum().item()
                t.agree += (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum().item()
    has_ref = reference is not None
    return {
        name: QualityResult(
            perplexity=float(torch.exp(torch.tensor(t.nll / t.tokens))),
            kl_divergence=t.kl / t.tokens if has_ref else None,
            top1_agreement=t.agree / t.tokens if has_ref else None,
            scored_tokens=t.tokens,
            windows=windows.shape[0],
        )
        for name, t in totals.items()
    }
