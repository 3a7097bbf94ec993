"""Decode paths of inference/decoding.py: the static cache (and, on CUDA, the captured step) produce the same
tokens and logits as transformers' DynamicCache path; impossible static paths fall back with a logged reason."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers.cache_utils import DynamicCache

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.formats import WeightScheme
from modelpress.inference.decoding import EagerSteps, GenerationSettings, forward_logits, generate
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.static_decode import StaticDecoder
from modelpress.nn import cpu_native
from conftest import build_family, build_tiny_llama

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


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor compiles C++ on the CPU")
def test_compiled_static_forward_matches_the_static_one():
    """GenerationSettings.compile: the static path's forwards through torch.compile (inductor) give the logits of
    the uncompiled static path, on a model with packed int4 layers (the quant_linear operator inside the
    compiled graph), and generate reports the path it took."""
    torch._dynamo.reset()
    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse("int4/g32")))
    tokens = [11, 23, 5, 60]
    with torch.no_grad():
        ref = step_logits(StaticDecoder(model, len(PROMPT) + 8, graph=False), tokens)
        compiled = StaticDecoder(model, len(PROMPT) + 8, graph=False, compile=True)
        got = step_logits(compiled, tokens)
    assert compiled.compile_error is None and compiled.forward_model is not model  # it really ran compiled
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    settings = GenerationSettings(max_new_tokens=6, decode="static", compile=True,
                                  sampling=SamplingConfig(temperature=0.0))
    result = generate(model, PROMPT, settings)
    assert result.decode_path == "static"
    assert result.tokens == generate(model, PROMPT, GenerationSettings(
        max_new_tokens=6, decode="static", sampling=SamplingConfig(temperature=0.0))).tokens


def test_a_compilation_that_fails_runs_the_forward_uncompiled(caplog):
    model = build_tiny_llama()
    decoder = StaticDecoder(model, len(PROMPT) + 8, graph=False, compile=True)

    def broken(**inputs):
        raise RuntimeError("inductor cannot lower this")

    decoder.forward_model = broken  # what a failed compilation raises at the first compiled call
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        got = step_logits(decoder, [11, 23])
        ref = step_logits(StaticDecoder(model, len(PROMPT) + 8, graph=False), [11, 23])
    assert decoder.forward_model is model and "inductor cannot lower this" in decoder.compile_error
    assert "running it uncompiled" in caplog.text
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, ref))  # max_len rounded up: 256


def test_static_cache_with_quantized_model():
    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    assert greedy(model, "static").tokens == greedy(model, "eager").tokens


def test_packed_layers_take_the_cpu_kernels_unless_turned_off():
    """generate on the CPU runs packed layers on the backend's kernels (bfloat16 inside) by default, from
    Python as from the CLI: the prompt on PyTorch's int4 kernel, each step on the native one where it is built;
    cpu_kernels=False keeps the exact reference path, whose tokens equal a float model holding the dequantized
    weights."""
    from modelpress.nn import cpu_native
    from modelpress.nn.cpu_backend import CPU_BACKEND
    from modelpress.nn.quant_linear import QuantLinear

    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    settings = dict(max_new_tokens=4, decode="eager", sampling=SamplingConfig(temperature=0.0))
    kinds = ("int4", "native 4-bit")
    before = [CPU_BACKEND.calls[k] for k in kinds]
    fast = generate(model, PROMPT, GenerationSettings(**settings))
    served = [CPU_BACKEND.calls[k] - b for k, b in zip(kinds, before)]
    assert sum(served) == layers * 4   # the prompt and 3 steps, every layer
    assert served[1] == (layers * 3 if cpu_native.available() else 0)   # the steps: one row each
    before = [CPU_BACKEND.calls[k] for k in kinds]
    exact = generate(model, PROMPT, GenerationSettings(**settings, cpu_kernels=False))
    assert [CPU_BACKEND.calls[k] for k in kinds] == before and not CPU_BACKEND.round_float32
    dense = build_tiny_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                dense.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
    assert exact.tokens == generate(dense, PROMPT, GenerationSettings(**settings)).tokens
    assert len(fast.tokens) == 4


def forward_and_rewind(decoder: StaticDecoder) -> list[torch.Tensor]:
    """Logits of: 4 tokens at once; 3 of them rejected, then 4 others (same length: a graph replays at another
    position); 2 rejected, then one step and a 2-token forward. Positions 7 -> 11 -> 8 -> 12 -> 10 -> 11 -> 13."""
    decoder.prefill(PROMPT)
    out = [decoder.forward([11, 12, 13, 14]).clone()]
    decoder.rewind(3)
    out.append(decoder.forward([50, 51, 52, 53]).clone())
    decoder.rewind(2)
    out.append(decoder.step(60).clone())
    out.append(decoder.forward([61, 62]).clone())
    return out


def test_forward_scores_every_token_and_rewound_tokens_are_forgotten():
    """forward(T tokens) gives the (T, V) logits a DynamicCache gives for the same sequence; after a rewind the
    stale keys/values past the position (slot 11 still holds 53 while 60 is scored at 10) are never seen."""
    model = build_tiny_llama()
    with torch.no_grad():
        decoder = StaticDecoder(model, len(PROMPT) + 8, graph=False)
        got = forward_and_rewind(decoder)
        seen = [11, 50, 51, 60, 61, 62]  # what the decoder holds at the end, after the prompt
        ref = forward_logits(model, PROMPT + [11, 12, 13, 14], DynamicCache(config=model.config))[-4:]
        cache = DynamicCache(config=model.config)
        ref_tail = forward_logits(model, PROMPT + seen[:1] + [50, 51, 52, 53], cache)[-4:]
        cache.crop(-2)
        ref_steps = forward_logits(model, [60, 61, 62], cache)
    assert decoder.position == len(PROMPT) + len(seen) == 13
    assert [g.shape for g in got] == [(4, 320), (4, 320), (1, 320), (2, 320)]
    for a, b in zip([ref, ref_tail, ref_steps[:1], ref_steps[1:]], got):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_forward_and_rewind_refuse_positions_outside_the_cache():
    decoder = StaticDecoder(build_tiny_llama(), 10, graph=False)
    with torch.no_grad():
        decoder.prefill(PROMPT)
        with pytest.raises(ValueError, match="4 tokens at position 7 overrun the static cache of 10"):
            decoder.forward([1, 2, 3, 4])
        with pytest.raises(ValueError, match="cannot rewind 8 tokens from position 7"):
            decoder.rewind(8)
        with pytest.raises(ValueError, match="at least one token"):
            decoder.forward([])
    assert decoder.position == 7

def test_auto_on_cpu_is_native_where_it_serves_else_eager():
    assert greedy(build_tiny_llama(), "auto", tokens=3).decode_path == ("native" if cpu_native.available() else "eager")
    gelu = build_tiny_llama(hidden_act="gelu")   # a decoder the native step does not compute
    assert greedy(gelu, "auto", tokens=3).decode_path == "eager"


def test_graph_on_cpu_falls_back_to_static(caplog):
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.decoding"):
        result = greedy(build_tiny_llama(), "graph", tokens=3)
    assert result.decode_path == "static"
    assert "CUDA graphs need a CUDA device" in caplog.text


def test_sliding_window_of_a_family_that_ignores_it_decodes_eagerly(caplog):
    """Llama's attention ignores a sliding_window in its config: the static cache, which would mask by it, stays
    out (a family it does not know to slide)."""
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.decoding"):
        result = greedy(build_tiny_llama(sliding_window=4), "static", tokens=3)
    assert result.decode_path == "eager"
    assert "sliding_window=4" in caplog.text


def test_a_quantized_static_cache_keeps_to_full_attention():
    from modelpress.inference.decoding import static_cache_obstacle

    model = build_family("gemma3")
    assert static_cache_obstacle(model, None, "float") is None
    assert "sliding windows of 8 tokens" in static_cache_obstacle(model, None, "int8")
    assert static_cache_obstacle(build_family("llama"), None, "int8") is None


LONG_PROMPT = PROMPT + [12, 60, 3, 8, 44]  # 12 tokens: past the test families' window of 8


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window", "gemma2", "gemma3"])
def test_sliding_window_models_decode_on_the_static_cache(family):
    """Every layer sliding (Mistral: one mask), or sliding and full layers mixed (a mask per layer type): the
    static cache keeps every position and the masks hide what a sliding layer must not see, so the static path
    gives the eager (DynamicCache) path's logits and tokens across the window; masked as full attention instead,
    it would not."""
    from modelpress.inference.static_decode import AttentionWindows

    model = build_family(family)
    settings = GenerationSettings(max_new_tokens=14, decode="static", sampling=SamplingConfig(temperature=0.0))
    static = generate(model, LONG_PROMPT, settings)
    eager = generate(model, LONG_PROMPT, GenerationSettings(max_new_tokens=14, decode="eager",
                                                            sampling=SamplingConfig(temperature=0.0)))
    assert static.decode_path == "static" and static.tokens == eager.tokens
    with torch.no_grad():
        def logits(stepper):
            out = [stepper.prefill(LONG_PROMPT).clone()]
            return out + [stepper.step(token).clone() for token in eager.tokens[:10]]

        ref = logits(EagerSteps(model, None))
        got = logits(StaticDecoder(model, len(LONG_PROMPT) + 12, graph=False))
        unwindowed = StaticDecoder(model, len(LONG_PROMPT) + 12, graph=False)
        unwindowed.windows = AttentionWindows()  # full attention everywhere
        wrong = logits(unwindowed)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(ref, got))
    assert max((a - b).abs().max().item() for a, b in zip(ref, wrong)) > 1e-3


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
@pytest.mark.parametrize("family", ["mistral-window", "gemma3"])
def test_sliding_window_models_are_captured_on_cuda(cuda, family):
    model = build_family(family).to(cuda)
    settings = GenerationSettings(max_new_tokens=14, sampling=SamplingConfig(temperature=0.0))
    graphed = generate(model, LONG_PROMPT, settings)
    eager = generate(model, LONG_PROMPT, GenerationSettings(max_new_tokens=14, decode="eager",
                                                            sampling=SamplingConfig(temperature=0.0)))
    assert graphed.decode_path == "graph" and graphed.tokens == eager.tokens


@pytest.mark.gpu
def test_generate_on_cuda_captures_by_default(cuda):
    model = build_tiny_llama().to(cuda)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("nf4/g32")))
    result, eager = greedy(model, "auto"), greedy(model, "eager")
    assert result.decode_path == "graph"
    assert result.tokens == eager.tokens


@pytest.mark.gpu
def test_compiled_step_is_captured_on_cuda(cuda):
    """GenerationSettings.compile on CUDA: the compiled forward (inductor's kernels and the quant_linear operator's
    Triton kernels) is captured in the CUDA graph and gives the uncompiled graph path's logits."""
    torch._dynamo.reset()
    model = build_tiny_llama().to(cuda)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    tokens = [11, 23, 5, 60]
    with torch.no_grad():
        ref = step_logits(StaticDecoder(model, len(PROMPT) + 8, graph=True), tokens)
        compiled = StaticDecoder(model, len(PROMPT) + 8, graph=True, compile=True)
        got = step_logits(compiled, tokens)
    assert compiled.graph is not None and compiled.compile_error is None and compiled.replays == len(tokens)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
    settings = GenerationSettings(max_new_tokens=6, compile=True, sampling=SamplingConfig(temperature=0.0))
    assert generate(model, PROMPT, settings).decode_path == "graph"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_forward_and_rewind_match_eager_on_cuda(cuda, dtype):
    """One graph per forward length (4, 1, 2), captured once and replayed at whatever position the rewinds left."""
    model = build_tiny_llama().to(cuda, dtype)
    with torch.no_grad():
        ref = forward_and_rewind(StaticDecoder(model, len(PROMPT) + 8, graph=False))
        graphed = StaticDecoder(model, len(PROMPT) + 8, graph=True)
        got = forward_and_rewind(graphed)
    assert graphed.graph_error is None, graphed.graph_error
    assert (graphed.captures, graphed.replays, sorted(graphed.blocks)) == (3, 4, [1, 2, 4])
    assert graphed.position == 13 and int(graphed.pos) == 13
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=tol, rtol=tol)
