"""Decode paths of inference/decoding.py: the static cache (and, on CUDA, the captured step) produce the same
tokens and logits as transformers' DynamicCache path; impossible static paths fall back with a logged reason."""

from __future__ import annotations

import logging

import pytest
import torch

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.formats import WeightScheme
from modelpress.inference.decoding import EagerSteps, GenerationSettings, generate
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.static_decode import StaticDecoder
from conftest import build_tiny_llama

PROMPT = [5, 17, 33, 2, 90, 41, 7]


def greedy(model, path: str, tokens: int = 12):
    return generate(model, PROMPT, GenerationSettings(max_new_tokens=tokens, decode=path,
                                                      sampling=SamplingConfig(temperature=0.0)))


def step_logits(stepper, tokens: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each of `tokens` (teacher forcing: every path sees the same input)."""
    out = [stepper.prefill(PROMPT).clone()]
    for token in tokens:
        out.append(stepper.step(token).clone())
    return out


def test_static_cache_matches_dynamic_cache():
    model = build_tiny_llama()
    eager, static = greedy(model, "eager"), greedy(model, "static")
    assert static.decode_path == "static" and eager.decode_path == "eager"
    assert static.tokens == eager.tokens
    with torch.no_grad():
        ref = step_logits(EagerSteps(model, None), eager.tokens[:6])
        got = step_logits(StaticDecoder(model, len(PROMPT) + 8, graph=False), eager.tokens[:6])
    for a, b in zip(ref, got):
        assert a.shape == b.shape == (1, 320)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_static_cache_with_quantized_model():
    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    assert greedy(model, "static").tokens == greedy(model, "eager").tokens


def test_packed_layers_take_the_cpu_kernels_unless_turned_off():
    """generate on the CPU runs packed layers on the backend's int4 kernel (bfloat16 inside) by default, from
    Python as from the CLI; cpu_kernels=False keeps the exact reference path, whose tokens equal a float model
    holding the dequantized weights."""
    from modelpress.nn.cpu_backend import CPU_BACKEND
    from modelpress.nn.quant_linear import QuantLinear

    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    settings = dict(max_new_tokens=4, decode="eager", sampling=SamplingConfig(temperature=0.0))
    before = CPU_BACKEND.calls["int4"]
    fast = generate(model, PROMPT, GenerationSettings(**settings))
    assert CPU_BACKEND.calls["int4"] - before == layers * 4   # the prompt and 3 steps, every layer
    before = CPU_BACKEND.calls["int4"]
    exact = generate(model, PROMPT, GenerationSettings(**settings, cpu_kernels=False))
    assert CPU_BACKEND.calls["int4"] == before and not CPU_BACKEND.round_float32
    dense = build_tiny_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                dense.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
    assert exact.tokens == generate(dense, PROMPT, GenerationSettings(**settings)).tokens
    assert len(fast.tokens) == 4


def test_auto_is_eager_on_cpu():
    assert greedy(build_tiny_llama(), "auto", tokens=3).decode_path == "eager"


def test_graph_on_cpu_falls_back_to_static(caplog):
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.decoding"):
        result = greedy(build_tiny_llama(), "graph", tokens=3)
    assert result.decode_path == "static"
    assert "CUDA graphs need a CUDA device" in caplog.text


def test_sliding_window_model_decodes_eagerly(caplog):
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.decoding"):
        result = greedy(build_tiny_llama(sliding_window=4), "static", tokens=3)
    assert result.decode_path == "eager"
    assert "sliding_window=4" in caplog.text


def test_unknown_decode_path_is_refused():
    from modelpress.errors import ModelpressError

    with pytest.raises(ModelpressError, match="unknown decode path 'fast'"):
        GenerationSettings(decode="fast")


# ---- CUDA: the captured step ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_step_matches_eager_step_on_cuda(cuda, dtype):
    model = build_tiny_llama().to(cuda, dtype)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))  # bfloat16: the Triton kernels
    tokens = greedy(model, "static").tokens
    with torch.no_grad():
        ref = step_logits(StaticDecoder(model, len(PROMPT) + 8, graph=False), tokens[:6])
        graphed = StaticDecoder(model, len(PROMPT) + 8, graph=True)
        got = step_logits(graphed, tokens[:6])
    assert graphed.graph is not None, graphed.graph_error
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_generate_on_cuda_captures_by_default(cuda):
    model = build_tiny_llama().to(cuda)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("nf4/g32")))
    result, eager = greedy(model, "auto"), greedy(model, "eager")
    assert result.decode_path == "graph"
    assert result.tokens == eager.tokens
