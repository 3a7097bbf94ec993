"""A learned residual rotation (SpinQuant's R1, weight-only): an orthogonal Q fitted to the quantized model's loss.

A random Hadamard rotation spreads outlier channels, but which draw is taken matters: on SmolLM2-135M at
int3-asym/g128 (then GPTQ), six draws put the out-of-domain perplexity increase between +77% and +85%
(docs/cross_domain.md). SpinQuant fits the rotation instead. Here, on a model already rotated (every norm's
gain folded into its readers, so each norm's weight is one), a second rotation Q = exp(S - S^T) is learned:

- every stream reader computes with Q_s(W Q), every writer with Q_s(Q^T W) (bias Q^T b, not quantized),
  the embedding is E Q and an untied head H Q (neither quantized), where Q_s is the scheme's round-to-nearest
  quantizer with a straight-through gradient (train/qat.py);
- the loss is the KL divergence of that model's next-token distribution from the float model's, on calibration
  windows, a few at a time;
- S (skew-symmetric through S - S^T, zero at the start: Q = I, the rotation given) follows Adam's steps, the
  rate decaying to zero on a cosine.

The exponential keeps Q orthogonal to rounding at every step, so the model's function is the float model's
whatever Q is learnt; only how its weights round changes. Q is then folded into the weights exactly as the first
rotation was (algorithms/rotate.py), and the caller's calibrated quantizer (GPTQ) runs on the result.

Measured on that model (docs/cross_domain.md): the round-to-nearest KL it is fitted to falls by a seventh to a
third, but GPTQ afterwards lands where it lands without it, and round to nearest after it stays behind no rotation
at all. An option, off by default.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import linear_weight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnedRotation:
    q: torch.Tensor                 # (D, D) float64, orthogonal
    losses: tuple[float, ...]       # the KL of each step's batch, before that step


def _param_name(names: dict[int, str], tensor: torch.Tensor) -> str:
    """`tensor`'s name in `names` ({id(parameter): name} of the model)."""
    if id(tensor) not in names:
        raise ModelpressError("a rotated layer's weight is not a parameter of the model: the rotation cannot be learnt")
    return names[id(tensor)]


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = linear_weight(module)
    if weight is not getattr(module, "weight", None):
        raise ModelpressError(f"{type(module).__name__} stores its weight transposed (not an nn.Linear layout): a "
                              "learned rotation supports nn.Linear readers and writers only")
    return weight


def learn_rotation(model: nn.Module, readers: list[nn.Module], writers: list[nn.Module], head: nn.Module | None,
                   ids: torch.Tensor, scheme: WeightScheme | str, steps: int, lr: float, batch_size: int,
                   seed: int = 0) -> LearnedRotation:
    """Fit Q (see the module docstring) on `model`, whose stream is read by `readers` through unit-gain norms and
    written by `writers`; `head` is the output head when it has a table of its own (None when tied to the
    embedding, which then carries it). `ids`: (windows, seq_len) calibration tokens. The model is not changed."""
    scheme = WeightScheme.parse(scheme) if isinstance(scheme, str) else scheme
    if steps <= 0 or lr <= 0 or batch_size <= 0:
        raise ModelpressError(f"a learned rotation needs positive steps, rate and batch, got {steps}, {lr}, "
                              f"{batch_size}")
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ModelpressError(f"a learned rotation needs (windows, seq_len) calibration tokens, got {tuple(ids.shape)}")
    from modelpress.train.qat import ste_fake_quantize

    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    size = embedding.weight.shape[1]
    params = {id(param): name for name, param in model.named_parameters()}
    layers = [*readers, *writers, *([head] if head is not None else [])]
    names = {id(m): _param_name(params, _weight_of(m)) for m in layers}
    embedding_name = _param_name(params, embedding.weight)
    weights = {id(m): _weight_of(m).detach().float() for m in [*readers, *writers]}
    biases = {id(m): (_param_name(params, m.bias), m.bias.detach().float())
              for m in writers if getattr(m, "bias", None) is not None}
    skew = torch.zeros(size, size, device=device, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([skew], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            order = torch.empty(0, dtype=torch.long)
            for step in range(steps):
                if len(order) < batch_size:    # every window once before any twice: epochs of random order
                    order = torch.cat([order, torch.randperm(ids.shape[0], generator=generator)])
                pick, order = order[:batch_size], order[batch_size:]
                batch = ids[pick].to(device)
                with torch.no_grad():
                    target = F.log_softmax(model(input_ids=batch).logits.float(), -1)
                q = torch.linalg.matrix_exp(skew - skew.T)
                overrides = {embedding_name: (embedding.weight.float() @ q).to(embedding.weight.dtype)}
                for module in readers:
                    w = ste_fake_quantize(weights[id(module)] @ q, scheme)
                    overrides[names[id(module)]] = w.to(module.weight.dtype)
                for module in writers:
                    w = ste_fake_quantize(q.T @ weights[id(module)], scheme)
                    overrides[names[id(module)]] = w.to(module.weight.dtype)
                    if id(module) in biases:
                        bias_name, bias = biases[id(module)]
                        overrides[bias_name] = (q.T @ bias).to(module.bias.dtype)
                if head is not None:
                    overrides[names[id(head)]] = (head.weight.float() @ q).to(head.weight.dtype)
                logits = functional_call(model, overrides, args=(), kwargs={"input_ids": batch}).logits.float()
                loss = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none").sum(-1).mean()
                if not torch.isfinite(loss):
                    raise ModelpressError(f"the learned rotation's loss is {float(loss)} at step {step}: lower the "
                                          "rate")
                losses.append(float(loss.detach()))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                if step % 10 == 0 or step == steps - 1:
                    log.info("learned rotation: step %d of %d, KL %.4f", step + 1, steps, losses[-1])
    finally:
        model.train(was_training)
    s = skew.detach().double()
    return LearnedRotation(torch.linalg.matrix_exp(s - s.T).cpu(), tuple(losses))
