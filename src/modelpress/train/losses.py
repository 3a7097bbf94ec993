"""Distillation losses: pure functions on logits (or on cached teacher log-probabilities).

Shapes: every function takes rows of next-token (or class) scores, (N, V), one row per scored position,
and returns a scalar: the mean over rows (rows where `mask` is False are left out).

Soft targets (Hinton et al. 2015): teacher and student distributions at temperature T, p = softmax(z / T).
The divergence is multiplied by T² so that its gradients keep the same size as T changes (the gradient of
the softened loss scales as 1/T²). Three divergences between teacher p_t and student p_s:
- forward KL  KL(p_t ‖ p_s): mass-covering, the classic choice;
- reverse KL  KL(p_s ‖ p_t): mode-seeking (MiniLLM, Gu et al. 2024);
- generalized JSD with weight β (GKD, Agarwal et al. 2024): m = β·p_t + (1-β)·p_s,
  JSD_β = β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m), bounded by the binary entropy of β (ln 2 at β = ½).
Mixed with hard labels: loss = α · CE(student, labels) + (1 - α) · T² · divergence.

Top-k teacher (cached so the teacher need not stay in memory): for each row the cache holds the teacher's
log-probabilities at temperature T of its k most likely tokens, normalised over the *whole* vocabulary,
and the log of the remaining mass (the tail). Both distributions are then compared on k + 1 buckets: the
k cached tokens and one bucket for everything else, the student's tail being the exact sum of its
probabilities outside the k tokens. This is honest about what was thrown away: the bucketed divergence
never exceeds the full one (coarse-graining cannot increase a divergence), the two are equal when k = V,
and what is lost is only how the teacher spread its tail among the other tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from modelpress.errors import ModelpressError

Divergence = Literal["fkl", "rkl", "jsd"]
DIVERGENCES = ("fkl", "rkl", "jsd")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TopKTargets:
    """Cached teacher rows: log p_t at temperature T of the top-k tokens, and of the tail bucket."""

    logprobs: torch.Tensor   # (N, k) float32, normalised over the full vocabulary
    indices: torch.Tensor    # (N, k) int64 token ids
    tail: torch.Tensor       # (N,) float32: log(1 - Σ top-k probabilities); -inf when k = V


def check_divergence(kind: str, beta: float) -> None:
    if kind not in DIVERGENCES:
        raise ModelpressError(f"unknown distillation loss {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ModelpressError(f"JSD weight beta must be strictly between 0 and 1, got {beta} "
                              f"(its limits are forward and reverse KL: use fkl or rkl)")


def check_temperature(temperature: float) -> None:
    if not temperature > 0 or math.isinf(temperature):
        raise ModelpressError(f"distillation temperature must be a positive number, got {temperature}")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities over the last dim; 0·log 0 terms are 0."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(dim=-1)


def divergence(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, kind: Divergence = "fkl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence (N,) between two distributions given as log-probabilities (N, V) (or (N, buckets))."""
    check_divergence(kind, beta)
    if kind == "fkl":
        return _kl(teacher_logprobs, student_logprobs)
    if kind == "rkl":
        return _kl(student_logprobs, teacher_logprobs)
    # log m = log(β p_t + (1-β) p_s), computed in log space
    mixture = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log(1 - beta))
    return beta * _kl(teacher_logprobs, mixture) + (1 - beta) * _kl(student_logprobs, mixture)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.device)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              kind: Divergence = "fkl", beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over rows of the divergence between softmax(teacher/T) and softmax(student/T)."""
    check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ModelpressError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                              f"{tuple(teacher_logits.shape)} differ in shape")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * _masked_mean(divergence(log_t, log_s, kind, beta), mask)


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTargets:
    """What the cache keeps of teacher rows (N, V): top-k log-probabilities at T and the tail mass."""
    check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ModelpressError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    return TopKTargets(values, indices, _tail_logprob(logp, indices))


def _tail_logprob(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Σ_{j ∉ indices} p_j per row, exactly (a masked logsumexp, not log(1 - Σ top-k))."""
    rest = logp.scatter(-1, indices, float("-inf"))
    return torch.logsumexp(rest, dim=-1)


def topk_soft_loss(student_logits: torch.Tensor, targets: TopKTargets, temperature: float = 1.0,
                   kind: Divergence = "fkl", beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean divergence on the k + 1 buckets (top-k tokens + tail); equals soft_loss when k = V."""
    check_temperature(temperature)
    if targets.indices.shape[0] != student_logits.shape[0]:
        raise ModelpressError(f"cached teacher has {targets.indices.shape[0]} rows, student logits "
                              f"{student_logits.shape[0]}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    indices = targets.indices.to(log_s.device).long()
    student_buckets = log_s.gather(-1, indices)
    teacher_buckets = targets.logprobs.to(log_s.device).float()
    if indices.shape[-1] < log_s.shape[-1]:  # k = V leaves no tail (and its log 0 would poison gradients)
        student_buckets = torch.cat([student_buckets, _tail_logprob(log_s, indices).unsqueeze(-1)], dim=-1)
        teacher_buckets = torch.cat([teacher_buckets, targets.tail.to(log_s.device).float().unsqueeze(-1)], dim=-1)
    return temperature**2 * _masked_mean(divergence(teacher_buckets, student_buckets, kind, beta), mask)


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the true labels (N,) at temperature 1; IGNORE_INDEX rows are left out."""
    return F.cross_entropy(student_logits.float(), labels.to(student_logits.device), ignore_index=IGNORE_INDEX)


def mixed_loss(soft: torch.Tensor | None, hard: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """α · hard + (1 - α) · soft; either part may be absent when its weight is 0 (or 1)."""
    if not 0 <= alpha <= 1:
        raise ModelpressError(f"hard-label weight alpha must be in [0, 1], got {alpha}")
    total = None
    if alpha < 1:
        if soft is None:
            raise ModelpressError(f"alpha={alpha} needs soft targets, but there is no teacher")
        total = (1 - alpha) * soft
    if alpha > 0:
        if hard is None:
            raise ModelpressError(f"alpha={alpha} needs hard labels, but none were given")
        total = alpha * hard if total is None else total + alpha * hard
    assert total is not None
    return total
