"""Evaluation's speed measurement: decode timed on generate's own path (one warm-up, then `repeats` runs),
prefill on one forward of the whole prompt."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny_llama
from modelpress.eval import speed


def run_with_spy(model, monkeypatch, device="cpu"):
    calls = []
    real = speed.generate

    def spy(model, prompt, settings, **kwargs):
        calls.append((len(prompt), settings.max_new_tokens, "on_tokens" in kwargs))
        return real(model, prompt, settings, **kwargs)

    monkeypatch.setattr(speed, "generate", spy)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0)).to(device)
    return speed.measure_speed(model, prompt, new_tokens=6, repeats=2), calls


def test_decode_is_timed_through_generate(monkeypatch):
    result, calls = run_with_spy(build_tiny_llama(), monkeypatch)
    assert calls == [(16, 6, False), (16, 6, True), (16, 6, True)]   # warm-up, then the timed runs
    assert result.prompt_tokens == 40 and result.new_tokens == 6
    assert result.prefill_tokens_per_s > 0 and math.isfinite(result.prefill_tokens_per_s)
    assert result.decode_tokens_per_s > 0 and math.isfinite(result.decode_tokens_per_s)


@pytest.mark.gpu
def test_decode_speed_on_cuda_with_packed_layers(cuda, monkeypatch):
    pytest.importorskip("triton")
    from modelpress.algorithms.quantize import RTNConfig, quantize_rtn

    model = build_tiny_llama().to(cuda, torch.bfloat16)
    quantize_rtn(model, RTNConfig("int4/g32"))
    result, calls = run_with_spy(model, monkeypatch, cuda)
    assert len(calls) == 3
    assert result.decode_tokens_per_s > 0 and math.isfinite(result.decode_tokens_per_s)
