"""The one training loop behind distillation, QAT and LoRA recovery.

The caller gives a loss function of a batch of example indices (it knows where the examples live: token
windows, a teacher cache, labels) and the parameters to train; the loop does the rest:
- AdamW on float32 master weights (the model stays float32; low precision exists only inside autocast);
- precision "bf16": torch.autocast with bfloat16 (CPU and recent GPUs), "fp16": autocast with float16 and
  a GradScaler that scales the loss up, unscales gradients before clipping and skips steps whose
  gradients overflowed, "fp32": no autocast; "auto": bf16 on CPU and on GPUs that support it, else fp16;
- gradient accumulation over micro-batches, gradient clipping, linear warm-up then cosine decay that ends at
  the last step or, with a CPU-time budget, when the budget runs out (whichever comes first);
- a fixed shuffle of the examples per epoch from the seed, so a run is reproducible;
- a NaN/Inf loss stops training with NonFiniteLoss before it reaches the weights: at once without a scaler
  (fp32, bf16), and with fp16 loss scaling after `max_nonfinite_steps` consecutive steps whose loss was
  non-finite (each such step is skipped and the scale backed off, as for overflowing gradients). Without a
  scaler a non-finite gradient norm stops training too. The weights are then those of the last good step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.progress import progress

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100                    # optimizer steps
    lr: float = 1e-4
    batch_size: int = 1                 # examples per micro-batch
    grad_accumulation: int = 1          # micro-batches per optimizer step
    seq_len: int = 512                  # tokens per training window (used by callers that cut windows)
    precision: Precision = "auto"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1           # cosine decay ends at lr · min_lr_ratio
    max_grad_norm: float | None = 1.0   # None: no clipping
    seed: int = 0
    eval_every: int = 0                 # 0: evaluate only if asked at the end by the caller
    log_every: int = 10
    time_budget_s: float | None = None  # stop once this much process CPU time is used (the schedule ends there)
    max_nonfinite_steps: int = 5        # fp16: consecutive steps with a NaN/Inf loss skipped before giving up

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation", "seq_len", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelpressError(f"training {name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ModelpressError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.lr > 0:
            raise ModelpressError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.eval_every < 0:
            raise ModelpressError("weight decay, warm-up steps and eval_every must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ModelpressError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ModelpressError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")


@dataclass
class TrainResult:
    steps: int                                   # optimizer steps taken (skipped fp16 overflow steps included)
    seconds: float                               # wall-clock
    cpu_seconds: float                           # process CPU time (all threads)
    losses: list[float] = field(default_factory=list)                    # mean loss per step
    evals: list[tuple[int, float]] = field(default_factory=list)         # (step, value of eval_fn)
    skipped_steps: int = 0                       # fp16 steps whose gradients overflowed
    stopped_early: bool = False                  # the CPU-time budget ran out before `steps`
    nonfinite_steps: int = 0                     # fp16 steps skipped because the loss itself was NaN/Inf

    def to_dict(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None,
                "evals": self.evals, "skipped_steps": self.skipped_steps, "stopped_early": self.stopped_early,
                "nonfinite_steps": self.nonfinite_steps}


class TrainingDiverged(ModelpressError):
    """Training moved the weights somewhere it cannot go on from (a NaN/Inf loss, weights past a format's range)."""


class NonFiniteLoss(TrainingDiverged):
    """Training produced a NaN/Inf loss (or, without loss scaling, gradient) it could not recover from.
    `good_steps`: the last step that changed the weights (they are as it left them; 0: the initial weights)."""

    def __init__(self, message: str, good_steps: int) -> None:
        super().__init__(message)
        self.good_steps = good_steps


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16", "fp16"]:
    if precision != "auto":
        return precision
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a disabled one for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def lr_at(step: int, config: TrainConfig, budget_used: float = 0.0) -> float:
    """Linear warm-up over warmup_steps, then cosine decay from lr to lr · min_lr_ratio at the end of training:
    the last step, or the end of the CPU-time budget (`budget_used` in [0, 1]) if that comes first."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    done = min(1.0, max((step - config.warmup_steps) / span, budget_used))
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))


def example_order(num_examples: int, steps: int, per_step: int, seed: int) -> torch.Tensor:
    """(steps, per_step) example indices: whole shuffled epochs (one permutation per epoch) laid end to end."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * per_step
    epochs = [torch.randperm(num_examples, generator=generator) for _ in range(-(-needed // num_examples))]
    return torch.cat(epochs)[:needed].view(steps, per_step)


def check_trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ModelpressError("nothing to train: no parameter requires a gradient")
    low = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if low:
        raise ModelpressError(f"trainable parameters must be float32 master weights, found {', '.join(low)}; "
                              f"load the model in float32 and choose --precision bf16/fp16 for autocast")
    return params


def train(loss_fn: Callable[[torch.Tensor], torch.Tensor], parameters: Iterable[nn.Parameter], num_examples: int,
          config: TrainConfig, device: torch.device | str = "cpu",
          eval_fn: Callable[[], float] | None = None, desc: str = "train") -> TrainResult:
    """Minimise loss_fn(indices (batch_size,)) over `parameters`; returns losses and timings."""
    device = torch.device(device)
    params = check_trainable(parameters)
    if num_examples <= 0:
        raise ModelpressError("no training examples")
    precision = resolve_precision(config.precision, device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scaler.scale(torch.zeros((), device=device))   # creates the scale tensor, so update() works from step 1
    order = example_order(num_examples, config.steps, config.batch_size * config.grad_accumulation, config.seed)
    result = TrainResult(steps=0, seconds=0.0, cpu_seconds=0.0)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    bad_run = 0   # consecutive steps with a non-finite loss (fp16 only; without a scaler the first one stops)
    updated = 0   # the last step that changed the weights (1-based; 0: none yet)
    for step in progress(range(config.steps), desc=desc, total=config.steps):
        used = 0.0 if not config.time_budget_s else (time.process_time() - cpu0) / config.time_budget_s
        lr = lr_at(step, config, used)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = _accumulate(loss_fn, order[step].split(config.batch_size), precision, device, scaler, config)
        if math.isfinite(total):
            bad_run = 0
            _check_gradients(params, scaler, step, updated)
            if _optimizer_step(optimizer, scaler, params, config.max_grad_norm):
                result.skipped_steps += 1
            else:
                updated = step + 1
        else:
            bad_run += 1
            _nonfinite_loss(total, step, updated, bad_run, scaler, config)
            result.skipped_steps += 1
            result.nonfinite_steps += 1
        optimizer.zero_grad(set_to_none=True)
        result.steps = step + 1
        result.losses.append(total)
        if config.log_every and (step % config.log_every == 0 or step + 1 == config.steps):
            log.info("%s step %d/%d loss %.4f lr %.3g", desc, step + 1, config.steps, total, lr)
        if eval_fn is not None and config.eval_every and (step + 1) % config.eval_every == 0:
            result.evals.append((step + 1, float(eval_fn())))
        if config.time_budget_s is not None and time.process_time() - cpu0 >= config.time_budget_s:
            result.stopped_early = step + 1 < config.steps
            break
    result.seconds = time.perf_counter() - wall0
    result.cpu_seconds = time.process_time() - cpu0
    return result


def _accumulate(loss_fn, micro_batches, precision: str, device: torch.device, scaler: torch.amp.GradScaler,
                config: TrainConfig) -> float:
    """Backward over one step's micro-batches; the step's mean loss. A NaN/Inf micro-batch loss ends the
    step there (nothing of it is backpropagated) and is returned as the step's loss."""
    total = 0.0
    for micro in micro_batches:
        with autocast(precision, device):
            loss = loss_fn(micro)
        value = loss.detach().float().item()
        if not math.isfinite(value):
            return value
        scaler.scale(loss / config.grad_accumulation).backward()
        total += value / config.grad_accumulation
    return total


def _nonfinite_loss(value: float, step: int, good_steps: int, bad_run: int, scaler: torch.amp.GradScaler,
                    config: TrainConfig) -> None:
    """A step whose loss is NaN/Inf: with loss scaling, skipped and the scale backed off, up to
    max_nonfinite_steps in a row; otherwise (or after that) NonFiniteLoss."""
    if scaler.is_enabled() and bad_run < config.max_nonfinite_steps:
        scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
        log.warning("step %d: loss is %s; step skipped, loss scale lowered to %g", step + 1, value,
                    scaler.get_scale())
        return
    tried = (f" on {bad_run} consecutive steps, loss scaling lowering the scale each time" if scaler.is_enabled()
             else "")
    raise NonFiniteLoss(f"training loss became {value} at step {step + 1}{tried}; the weights are those after "
                        f"step {good_steps}. Lower the learning rate (or check the data), or train with "
                        f"--precision fp32", good_steps)


def _check_gradients(params: list[nn.Parameter], scaler: torch.amp.GradScaler, step: int, good_steps: int) -> None:
    """Without loss scaling, a NaN/Inf gradient would reach the weights: stop before the step instead.
    (With a scaler, such a step is skipped by the scaler itself.)"""
    if scaler.is_enabled():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        raise NonFiniteLoss(f"gradients became NaN/Inf at step {step + 1} although the loss was finite; the "
                            f"weights are those after step {good_steps}. Lower the learning rate or train with "
                            f"--precision fp32", good_steps)


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter],
                    max_grad_norm: float | None) -> bool:
    """Unscale, clip, step (skipped by the scaler on overflow), update the scale. True if the step was skipped."""
    scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not scaler.is_enabled():
        optimizer.step()
        return False
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < before
