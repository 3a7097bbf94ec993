"""Batched generation (inference/batch_decode.py): prompts of different lengths, left-padded on one static cache,
give each row the logits and tokens the row gets alone; rows stop on their own; what the batch cannot serve runs one
prompt at a time, saying why."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.errors import ModelpressError
from modelpress.formats import WeightScheme
from modelpress.inference.batch_decode import generate_batch
from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.static_decode import StaticDecoder
from conftest import build_family, build_tiny_llama

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [8, 3, 71], [12, 60, 3, 8, 44, 9, 19, 250, 6, 1, 77, 30], [42]]
GREEDY = SamplingConfig(temperature=0.0)


def varied():
    """A tiny model whose greedy tokens vary (the plain tiny Llama's repeat the prompt's last token)."""
    return build_family("qwen2")


def settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": 10, "sampling": GREEDY, "decode": "static", **kw})


def alone_and_batched_logits(model, prompts, feeds):
    """Logits of every row alone (a one-row decoder each) and of the rows together, after each prompt and each of
    `feeds` (B, S) tokens (teacher forcing: both see the same input)."""
    with torch.no_grad():
        alone = []
        for prompt, fed in zip(prompts, feeds):
            one = StaticDecoder(model, max(map(len, prompts)) + len(fed) + 1, graph=False)
            alone.append(torch.cat([one.prefill(prompt)] + [one.step(int(t)).clone() for t in fed]))
        both = StaticDecoder(model, max(map(len, prompts)) + feeds.shape[1] + 1, graph=False, batch=len(prompts))
        rows = [both.prefill_rows(prompts).clone()] + [both.step_rows(feeds[:, i]).clone()
                                                       for i in range(feeds.shape[1])]
    return torch.stack(alone), torch.stack(rows, dim=1)


@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma2", "qwen2"])
def test_each_row_of_a_batch_gets_the_logits_it_gets_alone(family):
    """Left padding is invisible: every row's logits equal its own decode's, across the sliding window too (the
    families' windows are 8 positions; the longest prompt is 12); masked as if the padding were tokens, they
    would not."""
    model = build_family(family)
    feeds = torch.randint(0, 200, (len(PROMPTS), 6), generator=torch.Generator().manual_seed(0))
    alone, rows = alone_and_batched_logits(model, PROMPTS, feeds)
    assert alone.shape == rows.shape == (len(PROMPTS), 7, model.config.vocab_size)
    assert torch.allclose(alone, rows, atol=1e-5, rtol=1e-5), (alone - rows).abs().max()
    with torch.no_grad():  # the padding forgotten after the prefill (shown, and counted in positions): they move
        unmasked = StaticDecoder(model, 20, graph=False, batch=len(PROMPTS))
        unmasked.prefill_rows(PROMPTS)
        unmasked.pads.zero_()
        wrong = unmasked.step_rows(feeds[:, 0])
    assert (wrong - rows[:, 1]).abs().max() > 1e-3


def test_batched_greedy_tokens_are_each_prompts_own():
    model = varied()
    # packed layers on the exact dequantize-then-matmul path (the CPU's bfloat16 kernels round otherwise at
    # another row count, and near-ties may then part)
    quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse("int4/g32")))
    exact = settings(max_new_tokens=12, cpu_kernels=False)
    result = generate_batch(model, PROMPTS, exact)
    assert result.batched and result.decode_path == "static"
    assert result.tokens == [generate(model, p, exact).tokens for p in PROMPTS]
    assert result.prompt_tokens == [len(p) for p in PROMPTS] and result.new_tokens == 12 * len(PROMPTS)
    assert result.forwards == 12  # the prefill and 11 steps, for all rows at once


def test_the_default_model_decodes_a_batch_as_it_decodes_each_prompt(default_model):
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
    prompts = [default_model.tokenizer(t)["input_ids"] for t in texts]
    auto = GenerationSettings(max_new_tokens=12, sampling=GREEDY)  # on the CPU: the static cache
    result = generate_batch(default_model.model, prompts, auto)
    assert result.batched and result.decode_path == "static"
    assert result.tokens == [generate(default_model.model, p, auto).tokens for p in prompts]


def test_each_row_stops_at_its_own_end_of_sequence_token():
    model = varied()
    free = generate_batch(model, PROMPTS, settings()).tokens
    at = next(i for i in range(1, len(free[1])) if free[1][i] not in free[1][:i])  # a token new to row 1
    stop = free[1][at]  # ends row 1's sequence there
    result = generate_batch(model, PROMPTS, settings(eos_token_ids=(stop,)))
    for got, full in zip(result.tokens, free):
        cut = full[: full.index(stop) + 1] if stop in full else full
        assert got == cut
    assert result.tokens[1] == free[1][: at + 1] and len(result.tokens[1]) < 10
    assert result.forwards == max(len(t) for t in result.tokens)


def test_int8_kv_cache_batches_and_matches_each_prompt():
    model = varied()
    result = generate_batch(model, PROMPTS, settings(kv_cache="int8"))
    assert result.batched
    assert result.tokens == [generate(model, p, settings(kv_cache="int8")).tokens for p in PROMPTS]


@pytest.mark.parametrize("kw, reason", [({"decode": "eager"}, "decode='eager'"),
                                        ({"decode": "native"}, "decode='native'"),
                                        ({"kv_cache": "int4"}, "groups of tokens")])
def test_what_the_batch_cannot_serve_runs_one_prompt_at_a_time(kw, reason, caplog):
    model = varied()
    with caplog.at_level(logging.WARNING):
        result = generate_batch(model, PROMPTS[:2], settings(**kw))
    assert not result.batched and reason in caplog.text and "one at a time" in caplog.text
    assert result.tokens == [generate(model, p, settings(**kw)).tokens for p in PROMPTS[:2]]


def test_on_the_cpu_a_packed_model_the_native_step_serves_decodes_one_prompt_at_a_time(caplog):
    """decode="auto" on the CPU: a packed model the native step serves runs one prompt at a time on it (faster there
    than a batch on the static cache); its float original decodes as a batch."""
    from modelpress.inference.decoding import native_path_obstacle

    model = varied()
    auto = GenerationSettings(max_new_tokens=6, sampling=GREEDY)
    assert generate_batch(model, PROMPTS[:2], auto).batched
    quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse("int4/g32")))
    native = native_path_obstacle(model, auto, None) is None
    with caplog.at_level(logging.WARNING):
        result = generate_batch(model, PROMPTS[:2], auto)
    assert result.batched is not native
    if native:
        assert result.decode_path == "native" and "faster than a batch" in caplog.text


def test_a_failed_batched_prefill_runs_one_prompt_at_a_time(monkeypatch, caplog):
    model = varied()

    def broken(self, prompts):
        raise RuntimeError("this model's forward takes no 4-D mask")

    monkeypatch.setattr(StaticDecoder, "prefill_rows", broken)
    with caplog.at_level(logging.WARNING):
        result = generate_batch(model, PROMPTS[:2], settings())
    assert not result.batched and "batched static-cache prefill failed (RuntimeError: this model" in caplog.text
    assert result.tokens == [generate(model, p, settings()).tokens for p in PROMPTS[:2]]


def test_top_k_one_samples_the_greedy_tokens_and_sampling_draws_per_row():
    model = varied()
    greedy = generate_batch(model, PROMPTS, settings()).tokens
    top1 = generate_batch(model, PROMPTS, settings(sampling=SamplingConfig(temperature=0.8, top_k=1)))
    assert top1.tokens == greedy
    same = [PROMPTS[0]] * 4  # identical rows draw independently
    drawn = generate_batch(model, same, settings(sampling=SamplingConfig(temperature=5.0)),
                           generator=torch.Generator().manual_seed(0)).tokens
    assert len({tuple(t) for t in drawn}) > 1


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor compiles C++ on the CPU")
def test_a_compiled_batch_gives_the_uncompiled_tokens():
    """GenerationSettings.compile: the batch's forwards through torch.compile (the padded rows' 4-D masks and
    positions as graph inputs) give the uncompiled batch's tokens."""
    torch._dynamo.reset()
    model = varied()
    compiled = generate_batch(model, PROMPTS, settings(compile=True))
    assert compiled.batched and compiled.tokens == generate_batch(model, PROMPTS, settings()).tokens


def test_bad_batches_are_refused():
    model = varied()
    with pytest.raises(ModelpressError, match="no prompts"):
        generate_batch(model, [], settings())
    with pytest.raises(ModelpressError, match="empty"):
        generate_batch(model, [[1, 2], []], settings())
    decoder = StaticDecoder(model, 16, graph=False, batch=2)
    with pytest.raises(ValueError, match="3 prompts for a decoder of 2 rows"):
        decoder.prefill_rows(PROMPTS[:3])
    with pytest.raises(ValueError, match="use forward_rows"):
        decoder.forward([1])


# ---- CUDA: the captured batched step ----

@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["int4/g32", "nf4/g64"])
def test_a_batch_is_captured_on_cuda_and_matches_its_static_run(cuda, spec):
    """bfloat16 with packed layers (the Triton kernels at M = B) and the decode-time fusions: the captured batch
    gives the uncaptured batch's tokens, and each row's first tokens are those it gets alone."""
    model = build_tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                             num_key_value_heads=2).to(cuda, torch.bfloat16)
    quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse(spec)))
    graphed = generate_batch(model, PROMPTS, settings(decode="auto"))
    static = generate_batch(model, PROMPTS, settings(decode="static"))
    assert graphed.batched and graphed.decode_path == "graph" and "KV writes" in graphed.fusions
    assert graphed.tokens == static.tokens
    for prompt, tokens in zip(PROMPTS, graphed.tokens):
        assert generate(model, prompt, settings(decode="auto")).tokens[:3] == tokens[:3]


@pytest.mark.gpu
def test_norms_laying_x_out_for_the_rows_mode_leave_the_tokens_as_they_were(cuda, monkeypatch):
    """A batch on 4-bit layers re-laid for the tensor-core GEMV's rows mode: with the norms before them writing x in
    fragment order too (fusion.LAY_NORMS), those layers read that copy, and the sums are the same bits, so the
    tokens are those of the rows read as stored."""
    from modelpress.inference import fusion
    from modelpress.nn import triton_backend

    monkeypatch.setattr(triton_backend, "MMA_MIN_TILES_PER_SM", 0)  # a tiny model's layers, re-laid all the same
    model = build_tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2).to(cuda, torch.bfloat16)
    quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse("int4/g128")))
    runs = {}
    for lay in (False, True):
        monkeypatch.setattr(fusion, "LAY_NORMS", lay)
        runs[lay] = generate_batch(model, PROMPTS, settings(decode="auto"))
    layers = model.config.num_hidden_layers
    assert runs[True].fusions.endswith(f"4-bit layers on the tensor-core GEMV, {2 * layers} norms writing x in "
                                       "fragment order, rotary, KV writes"), runs[True].fusions
    assert "fragment order" not in runs[False].fusions and "tensor-core GEMV" in runs[False].fusions
    assert runs[True].batched and runs[True].tokens == runs[False].tokens

