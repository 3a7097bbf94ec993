"""Knowledge distillation: train a student on a teacher's soft targets mixed with the hard labels.

The teacher is either live (run on every batch, no gradients) or a TeacherCache of its top-k rows built
once before training, after which the caller can free the teacher. With no teacher at all the loss is
plain cross-entropy (alpha must then be 1): the same loop then serves fine-tuning on hard labels.
Works for causal language models and for sequence classifiers (data.py tells them apart).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.train.data import TaskData, check_same_vocabulary, model_rows, output_size
from modelpress.train.losses import (
    Divergence,
    check_divergence,
    check_temperature,
    hard_loss,
    mixed_loss,
    soft_loss,
    topk_soft_loss,
)
from modelpress.train.teacher_cache import TeacherCache, build_teacher_cache
from modelpress.train.trainer import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 1.0
    alpha: float = 0.0                  # weight of the hard-label cross-entropy (1 - alpha on soft targets)
    loss: Divergence = "fkl"            # fkl | rkl | jsd
    beta: float = 0.5                   # JSD's teacher weight
    top_k: int | None = None            # cache the teacher's top-k rows once instead of running it live
    freeze: tuple[str, ...] = ()        # parameter name patterns (fnmatch) kept fixed

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_divergence(self.loss, self.beta)
        if not 0 <= self.alpha <= 1:
            raise ModelpressError(f"hard-label weight alpha must be in [0, 1], got {self.alpha}")
        if self.top_k is not None and self.top_k <= 0:
            raise ModelpressError(f"top-k must be a positive integer, got {self.top_k}")


@dataclass
class DistillResult:
    train: TrainResult
    cache_seconds: float = 0.0          # building the teacher cache (wall-clock)
    cache_cpu_seconds: float = 0.0
    cache_bytes: int = 0
    trained_parameters: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.train.to_dict(), "cache_seconds": round(self.cache_seconds, 2),
                "cache_cpu_seconds": round(self.cache_cpu_seconds, 2), "cache_bytes": self.cache_bytes,
                "trained_parameters": self.trained_parameters, **self.extra}


def _frozen(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern names a parameter by its full name, its module's name, or any one dotted part ("embed_tokens")."""
    module = name.rsplit(".", 1)[0]
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p) or
               any(fnmatch.fnmatchcase(part, p) for part in parts) for p in patterns)


def distillation_loss_fn(student: nn.Module, teacher: nn.Module | TeacherCache | None, data: TaskData,
                         config: DistillConfig):
    """loss(indices) for the trainer: student rows against the teacher's (live or cached) and the labels."""
    def loss(indices: torch.Tensor) -> torch.Tensor:
        rows = model_rows(student, data, indices)
        hard = hard_loss(rows.logits, rows.labels) if config.alpha > 0 else None
        soft = None
        if isinstance(teacher, TeacherCache):
            soft = topk_soft_loss(rows.logits, teacher.targets(indices), config.temperature, config.loss,
                                  config.beta, rows.mask)
        elif teacher is not None and config.alpha < 1:
            with torch.no_grad():
                teacher_rows = model_rows(teacher, data, indices)
            soft = soft_loss(rows.logits, teacher_rows.logits.to(rows.logits.device), config.temperature,
                             config.loss, config.beta, rows.mask)
        return mixed_loss(soft, hard, config.alpha)

    return loss


def distill(student: nn.Module, teacher: nn.Module | TeacherCache | None, data: TaskData,
            config: DistillConfig = DistillConfig(), train_config: TrainConfig | None = None,
            eval_fn=None) -> DistillResult:
    """Train `student` in place. A teacher model with config.top_k set is first reduced to a TeacherCache
    (the function keeps no reference to the teacher afterwards, so the caller may free it)."""
    train_config = train_config or TrainConfig()
    if teacher is None and config.alpha < 1:
        raise ModelpressError(f"no teacher given, so the loss can only be hard-label cross-entropy: use alpha=1 "
                              f"(got alpha={config.alpha})")
    vocab = output_size(student)
    result_extra = {}
    cache_wall = cache_cpu = 0.0
    if isinstance(teacher, nn.Module):
        check_same_vocabulary(teacher, student)
        if config.top_k is not None and config.alpha < 1:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            teacher = build_teacher_cache(teacher, data, config.top_k, config.temperature,
                                          batch_size=train_config.batch_size, precision=train_config.precision)
            cache_wall, cache_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        else:
            teacher.eval()
    if isinstance(teacher, TeacherCache):
        teacher.check_fits(data, vocab, config.temperature)
        result_extra["top_k"] = teacher.top_k
    params, switched_off = _set_trainable(student, config.freeze)
    device = next(student.parameters()).device
    student.train()
    try:
        result = train(distillation_loss_fn(student, teacher, data, config), [p for _, p in params], len(data),
                       train_config, device=device, eval_fn=eval_fn, desc="distill")
    finally:
        student.eval()
        for p in switched_off:
            p.requires_grad_(True)
    return DistillResult(result, cache_wall, cache_cpu, teacher.nbytes if isinstance(teacher, TeacherCache) else 0,
                         sum(p.numel() for _, p in params), result_extra)


def _set_trainable(model: nn.Module, freeze: tuple[str, ...]
                   ) -> tuple[list[tuple[str, nn.Parameter]], list[nn.Parameter]]:
    """Parameters that train (requiring a gradient, not matching `freeze`), and those switched off for the run."""
    trainable, switched_off = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if _frozen(name, freeze):
            p.requires_grad_(False)
            switched_off.append(p)
        else:
            trainable.append((name, p))
    if not trainable:
        for p in switched_off:
            p.requires_grad_(True)
        raise ModelpressError(f"nothing to train in {type(model).__name__} (freeze patterns: {list(freeze)})")
    return trainable, switched_off
