"""Prefill and decode throughput at batch 1, as medians over repeats (absolute times drift on shared
machines; compare models measured in the same run)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    prompt_tokens: int
    new_tokens: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> SpeedResult:
    """`prompt` is a (1, T) tensor of token ids; decode is greedy generation of `new_tokens` with a cache.
    Timed as `modelpress generate` runs: with the CPU's packed kernels on (nn/cpu_backend.py)."""
    from modelpress.nn.cpu_backend import fast_cpu

    with fast_cpu():
        return _measure(model, prompt, new_tokens, repeats)


def _measure(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> SpeedResult:
    device = next(model.parameters()).device
    ids = prompt.to(device)
    model(input_ids=ids, use_cache=False)  # warm-up
    prefill = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        prefill.append(time.perf_counter() - start)
    decode_rate = None
    if hasattr(model, "generate") and new_tokens > 0:
        decode = []
        short = ids[:, : min(ids.shape[1], 16)]
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = model.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
            _sync(device)
            made = out.shape[1] - short.shape[1]
            decode.append((time.perf_counter() - start) / max(made, 1))
        decode_rate = 1.0 / statistics.median(decode)
    return SpeedResult(
        prefill_tokens_per_s=ids.shape[1] / statistics.median(prefill),
        decode_tokens_per_s=decode_rate,
        prompt_tokens=ids.shape[1],
        new_tokens=new_tokens,
    )
