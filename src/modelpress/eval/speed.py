"""Prefill and decode throughput at batch 1, as medians over repeats (absolute times drift on shared
machines; compare models measured in the same run)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.sampling import SamplingConfig


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
    """`prompt` is a (1, T) tensor of token ids; decode is greedy generation of `new_tokens` after its first 16,
    on the path `modelpress generate` takes (inference/decoding.py: the native step on the CPU where it serves the
    model, a captured graph on CUDA), the rate the median time between consecutive new tokens (so one-off costs,
    a graph's capture, do not count). Prefill: the whole prompt in one forward, the CPU's packed kernels on."""
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
    if hasattr(model, "generate") and new_tokens > 1:
        gaps: list[float] = []
        settings = GenerationSettings(max_new_tokens=new_tokens, sampling=SamplingConfig(temperature=0.0))
        generate(model, ids[0, :16].tolist(), settings)   # warm-up: first-use costs (plans, threads, pages)
        for _ in range(repeats):
            stamps: list[float] = []   # generate reads each token on the host (a sync) before the callback
            generate(model, ids[0, :16].tolist(), settings, on_tokens=lambda _: stamps.append(time.perf_counter()))
            gaps += [b - a for a, b in zip(stamps, stamps[1:])]
        decode_rate = 1.0 / statistics.median(gaps)
    return SpeedResult(
        prefill_tokens_per_s=ids.shape[1] / statistics.median(prefill),
        decode_tokens_per_s=decode_rate,
        prompt_tokens=ids.shape[1],
        new_tokens=new_tokens,
    )
