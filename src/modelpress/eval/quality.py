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
Under torchrun (engine/distributed.py) each rank scores its share of the batches (batch i on rank
i % world); every batch's sums are gathered and added up in batch order on every rank, exactly as one
process adds them, so the numbers are identical to a single-process evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.engine.distributed import Ranks
from modelpress.errors import ModelpressError
from modelpress.nn.backends import decoded_once
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


def next_token_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1, V) float32 logits predicting tokens 1..T-1 of each window."""
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), use_cache=False)
    return out.logits[:, :-1].float()


FIELDS = ("nll", "kl", "agree", "tokens")   # per batch and model: the sums the results are made of


@torch.no_grad()
@decoded_once()   # packed weights decoded once per evaluation, not per forward
def evaluate_quality(models: dict[str, nn.Module], windows: torch.Tensor, reference: nn.Module | None = None,
                     batch_size: int = 1, score: str = "all") -> dict[str, QualityResult]:
    if windows.numel() == 0 or windows.dim() != 2 or windows.shape[1] < 2:
        raise ModelpressError(f"need at least one window of 2+ tokens to evaluate, got shape {tuple(windows.shape)}")
    first = first_scored(windows.shape[1], score)
    ranks = Ranks.active()
    batches = windows.split(batch_size)
    # sums[b, m] = (nll, kl, agree, tokens) of batch b for model m; zeros for batches another rank scores
    sums = torch.zeros(len(batches), len(models), len(FIELDS), dtype=torch.float64)
    mine = ranks.share(range(len(batches)))
    for b in progress(mine, desc="evaluate", total=len(mine)):
        batch = batches[b]
        targets = batch[:, first + 1:]
        ref_logprobs = None
        if reference is not None:
            ref_logprobs = F.log_softmax(next_token_logits(reference, batch)[:, first:], dim=-1).cpu()
        for m, model in enumerate(models.values()):
            if model is reference:
                logprobs = ref_logprobs
            else:
                logprobs = F.log_softmax(next_token_logits(model, batch)[:, first:], dim=-1).cpu()
            sums[b, m, 0] = -logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
            sums[b, m, 3] = targets.numel()
            if ref_logprobs is not None:
                sums[b, m, 1] = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum().item()
                sums[b, m, 2] = (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum().item()
    ranks.sum_(sums)       # each entry is one rank's value plus zeros: exact
    has_ref = reference is not None
    results = {}
    for m, name in enumerate(models):
        nll = kl = agree = tokens = 0.0
        for b in range(len(batches)):          # batch order, as a single process adds them
            nll += float(sums[b, m, 0])
            kl += float(sums[b, m, 1])
            agree += float(sums[b, m, 2])
            tokens += float(sums[b, m, 3])
        results[name] = QualityResult(
            perplexity=float(torch.exp(torch.tensor(nll / tokens))),
            kl_divergence=kl / tokens if has_ref else None,
            top1_agreement=agree / tokens if has_ref else None,
            scored_tokens=int(tokens),
            windows=windows.shape[0],
        )
    return results
