"""The native CPU decode step (inference/native_decode.py over nn/cpu_step.c): on every family it computes, float32
and with packed layers, its logits equal transformers' own forward on a DynamicCache to float32 rounding, token by
token, several tokens at once and after rewinds; generate and speculative decoding take it on the CPU by default,
and every model or setting it does not compute is named and decoded eagerly."""

from __future__ import annotations

import copy
import logging
from unittest import mock

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import Cache

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.errors import ModelpressError
from modelpress.formats import WeightScheme
from modelpress.inference.decoding import GenerationSettings, forward_logits, generate
from modelpress.inference.kv_cache import KVCacheConfig, make_kv_cache
from modelpress.inference import native_decode
from modelpress.inference.native_decode import NativeDecoder, native_obstacle
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.speculative import SpeculativeConfig, speculative_generate
from modelpress.nn import cpu_native
from modelpress.nn.cpu_backend import fast_cpu
from modelpress.nn.quant_linear import QuantLinear
from conftest import build_family, native_build, random_packed

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="the native CPU library did not build here")

PROMPT = [5, 17, 33, 2, 90, 41, 7]
build = build_family


def compare(model, tokens: list[int], atol: float = 1e-4, native_prefill: bool = True,
            kv_cache: str = "float") -> tuple[NativeDecoder, Cache]:
    """Teacher-forced: the prompt, then each of `tokens` alone against the model's own forward on a DynamicCache
    (kv_cache int8: on the eager path's QuantizedKVCache); then, after a rewind of 3, those 3 tokens in one call
    against the single steps' logits. native_prefill=False: the prompt through transformers' forward as a long one
    would be (packed layers: PyTorch's batched kernels round otherwise than the native ones, so both caches start
    from the same prefill)."""
    native = NativeDecoder(model, len(PROMPT) + len(tokens) + 4, kv_cache=kv_cache)
    cache = make_kv_cache(model, KVCacheConfig(kv_cache))
    with mock.patch.object(native_decode, "NATIVE_PREFILL_TOKENS", len(PROMPT) if native_prefill else 0):
        first = native.prefill(PROMPT)
    assert torch.allclose(first, forward_logits(model, PROMPT, cache, last_only=True), atol=atol)
    steps = []
    for token in tokens:
        got, ref = native.step(token), forward_logits(model, [token], cache, last_only=True)
        assert got.shape == ref.shape == (1, model.config.vocab_size)
        assert torch.allclose(got, ref, atol=atol, rtol=atol), (got - ref).abs().max()
        steps.append(got.clone())
    native.rewind(3)
    together = native.forward(tokens[-3:])
    assert together.shape == (3, model.config.vocab_size)
    assert torch.allclose(together, torch.cat(steps[-3:]), atol=atol, rtol=atol)
    assert native.position == cache.get_seq_length() == len(PROMPT) + len(tokens)
    return native, cache


@pytest.mark.parametrize("family", ["llama", "llama3-rope", "mistral", "qwen2", "qwen3", "mistral-window",
                                    "qwen2-window", "gemma2", "gemma3"])
@torch.no_grad()
def test_float_models_give_their_own_logits(family, one_thread):
    """Sliding-window models (window 8) run past their window: 7 prompt tokens and 12 more."""
    model = build(family)
    assert native_obstacle(model) is None
    compare(model, [11, 23, 5, 60, 1, 2, 99, 150, 7, 8, 31, 64])


@torch.no_grad()
def test_gemma_pieces_each_matter(one_thread):
    """The settings Gemma adds each change the logits when changed alone (the soft-caps, the window, the attention
    scaling; a SiLU MLP is named as not computed), and the native step follows each change."""
    base = build("gemma2")
    reference = forward_logits(base, PROMPT * 2, make_kv_cache(base, KVCacheConfig("float")))
    for overrides in (dict(attn_logit_softcapping=0.5), dict(final_logit_softcapping=0.5), dict(sliding_window=3),
                      dict(hidden_activation="silu"), dict(query_pre_attn_scalar=4)):
        model = build("gemma2", **overrides)
        changed = forward_logits(model, PROMPT * 2, make_kv_cache(model, KVCacheConfig("float")))
        assert (changed - reference).abs().max() > 1e-3, overrides
        if overrides.get("hidden_activation") == "silu":
            assert "hidden_activation is 'silu'" in native_obstacle(model)
            continue
        native = NativeDecoder(model, 32)
        assert torch.allclose(native.forward(PROMPT * 2), changed, atol=1e-4, rtol=1e-4), overrides


@pytest.mark.parametrize("heads", [dict(head_dim=64, num_attention_heads=3, num_key_value_heads=1),
                                   dict(head_dim=24, num_attention_heads=4, num_key_value_heads=4),
                                   dict(head_dim=40, num_attention_heads=6, num_key_value_heads=3)])
@torch.no_grad()
def test_attention_of_every_head_shape_past_a_value_tile(heads, one_thread):
    """Attention takes four cached keys at a time for the heads sharing them and the values in tiles of 32
    positions, 64 columns of a head in registers: head sizes of whole and partial vectors (64, 24, 40), groups of
    1-3 heads, and more positions than a tile, not a multiple of four, against transformers' own attention."""
    model = build("mistral", **heads)
    compare(model, [(7 * i + 3) % 300 for i in range(38)])


@pytest.mark.parametrize("family, spec", [("qwen3", None), ("qwen3", "int4/g32"), ("gemma3", None)])
@torch.no_grad()
def test_a_long_prompt_runs_through_the_model_and_its_cache_is_copied(family, spec, one_thread):
    """Past NATIVE_PREFILL_TOKENS the prompt takes transformers' batched forward; the keys and values it leaves
    are the native cache's, so later steps are those of a prompt prefilled natively. A sliding-window layer's cache
    keeps only its last positions (window - 1 of them), which are all a later step reads."""
    from modelpress.inference.native_decode import NATIVE_PREFILL_TOKENS

    model = build(family)
    if spec is not None:
        quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    prompt = (PROMPT * 10)[: NATIVE_PREFILL_TOKENS + 5]
    with fast_cpu():
        long, short = NativeDecoder(model, 64), NativeDecoder(model, 64)
        long.prefill(prompt)
        short.prefill(prompt[:NATIVE_PREFILL_TOKENS])
        short.forward(prompt[NATIVE_PREFILL_TOKENS:])
        assert long.position == short.position == len(prompt)
        # int4: PyTorch's batched int4 kernel (the long prefill) sums bfloat16 products otherwise than the native
        # kernel, ~1% apart after a few layers; float32 checks the copy itself
        tol = 1e-4 if spec is None else 5e-2
        for (k1, v1), (k2, v2), block in zip(long.caches, short.caches, long.blocks):
            kept = slice(len(prompt) - block.window + 1 if block.window else 0, len(prompt))
            assert torch.allclose(k1[:, kept], k2[:, kept], atol=tol, rtol=tol)
            assert torch.allclose(v1[:, kept], v2[:, kept], atol=tol, rtol=tol)
        assert torch.allclose(long.step(11), short.step(11), atol=tol, rtol=tol)


@pytest.mark.parametrize("spec", ["int4/g32", "int4-asym/g64", "nf4/g64", "fp4/g32", "int8/channel", "int8-asym/g32",
                                  "fp8-e4m3/channel"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@torch.no_grad()
def test_packed_models_give_the_cpu_kernels_logits(family, spec, one_thread):
    """Against the eager path with the CPU kernels (fast_cpu, as generate runs): the same packed products (int4
    rounds x to bfloat16 on both paths where the CPU has AVX512_BF16), so float32 rounding apart."""
    model = build(family)
    quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    assert native_obstacle(model) is None
    with fast_cpu():
        compare(model, [11, 23, 5, 60], atol=2e-4, native_prefill=False)


@torch.no_grad()
def test_an_input_permutation_is_applied(one_thread):
    """A GPTQ act-order layer reads x in its stored input order: the step gathers x as the layer does."""
    model = build("llama")
    layer = model.model.layers[1].mlp.down_proj
    packed = random_packed("int4/g32", layer.out_features, layer.in_features, seed=3, perm=True)
    model.model.layers[1].mlp.down_proj = QuantLinear(packed)
    assert packed.input_perm is not None
    with fast_cpu():
        compare(model, [11, 23, 5, 60], atol=2e-4, native_prefill=False)


@pytest.mark.parametrize("family, native_prefill", [("llama", True), ("qwen3", True), ("qwen3", False)])
@torch.no_grad()
def test_an_int8_cache_gives_the_eager_int8_caches_logits_and_codes(family, native_prefill, one_thread):
    """kv_cache="int8": every key and value quantized as it is written (int8 per token and head, float16 scales),
    attention on codes times scales, against the eager path's QuantizedKVCache; the prompt natively or through
    transformers (its codes copied). The codes are the eager cache's: the same rule on keys and values computed in
    another float32 order, so a code may sit across a rounding boundary now and then, never more than one apart."""
    model = build(family, head_dim=40, num_attention_heads=6, num_key_value_heads=3)
    native, cache = compare(model, [(7 * i + 3) % 300 for i in range(36)], native_prefill=native_prefill,
                            kv_cache="int8")
    n = native.position
    same = total = 0
    for ((k_codes, k_scales), (v_codes, v_scales)), layer in zip(native.caches, cache.layers):
        for codes, scales, stored in ((k_codes, k_scales, layer.stored[0]), (v_codes, v_scales, layer.stored[1])):
            expected = stored.qdata[0].to(torch.int16) - 128
            diff = (codes[:, :n].to(torch.int16) - expected).abs()
            assert int(diff.max()) <= 1
            same, total = same + int((diff == 0).sum()), total + diff.numel()
            assert torch.allclose(scales[:, :n], stored.scale[0, :, :, 0].float(), rtol=1e-3, atol=0)
    assert same / total > 0.995
    float_bytes = NativeDecoder(model, native.capacity).cache_bytes
    assert native.cache_bytes * 3 < float_bytes   # codes a quarter of float32's, plus a scale per 40 values


@pytest.mark.parametrize("name", ["avx2", "plain"])
@torch.no_grad()
def test_the_int8_cache_on_builds_without_avx512(name, tmp_path, one_thread):
    """Codes become floats by each build's own instructions (AVX-512, AVX2, or the compiler's vector extension):
    the AVX2 and plain C builds give the eager int8 cache's logits too (float32 model: the same products)."""
    lib = native_build(name, tmp_path)
    model = build("mistral", head_dim=40, num_attention_heads=6, num_key_value_heads=3)
    with mock.patch.object(cpu_native, "library", lambda: lib):
        compare(model, [(7 * i + 3) % 300 for i in range(36)], kv_cache="int8")
        # GELU and soft-capping through each build's vectors (soft-caps small enough to bend the values)
        compare(build("gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=1.0), [11, 23, 5, 60, 1, 2])


@torch.no_grad()
def test_generate_and_speculation_keep_an_int8_cache_on_the_native_step(one_thread):
    target = build("llama")
    draft = copy.deepcopy(target)
    quantize_rtn(draft, RTNConfig(WeightScheme.parse("int4/g32")))
    settings = [GenerationSettings(max_new_tokens=16, decode=path, kv_cache="int8",
                                   sampling=SamplingConfig(temperature=0.0)) for path in ("auto", "eager")]
    native, eager = (generate(target, PROMPT, s) for s in settings)
    assert (native.decode_path, eager.decode_path) == ("native", "eager")
    assert native.tokens == eager.tokens
    speculated = speculative_generate(target, draft, PROMPT, settings[0], SpeculativeConfig(3))
    assert speculated.decode_path == "native" and speculated.tokens == native.tokens and speculated.drafted > 0


def greedy(path: str, tokens: int = 10) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=tokens, decode=path, sampling=SamplingConfig(temperature=0.0))


@torch.no_grad()
def test_generate_takes_the_native_step_on_the_cpu_by_default(one_thread):
    model = build("qwen2")
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int8/g32")))
    auto, eager = generate(model, PROMPT, greedy("auto")), generate(model, PROMPT, greedy("eager"))
    assert (auto.decode_path, eager.decode_path) == ("native", "eager")
    assert auto.tokens == eager.tokens
    sampled = [generate(model, PROMPT, GenerationSettings(max_new_tokens=8, decode=path),
                        generator=torch.Generator().manual_seed(4)).tokens for path in ("native", "eager")]
    assert sampled[0] == sampled[1]   # the same draws from the same distributions


@torch.no_grad()
def test_speculative_decoding_on_the_native_step_keeps_greedy_output(one_thread):
    target = build("llama")
    draft = copy.deepcopy(target)
    quantize_rtn(draft, RTNConfig(WeightScheme.parse("int4/g32")))
    plain = generate(target, PROMPT, greedy("eager", 16))
    result = speculative_generate(target, draft, PROMPT, greedy("auto", 16), SpeculativeConfig(3))
    assert result.decode_path == "native" and result.tokens == plain.tokens
    assert result.drafted > 0


def quantized(spec: str):
    model = build("llama")
    quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    return model


@pytest.mark.parametrize("make, reason", [
    (lambda: quantized("int3-asym/g32"), "int3-asym/g32, which the native kernels do not serve"),
    (lambda: build("llama").to(torch.bfloat16), "not float32"),
    (lambda: build("gemma3", hidden_activation="gelu"), "hidden_activation is 'gelu'"),
    (lambda: build("qwen3", layer_types=["full_attention", "chunked_attention"]), "attention layers of kinds"),
    (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), "GPT2LMHeadModel is not"),
    (lambda: build("llama", hidden_act="gelu"), "hidden_act"),
    (lambda: build("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (lambda: build("llama").train(), "training mode"),
])
def test_models_it_does_not_compute_are_named(make, reason):
    assert reason in native_obstacle(make())


@torch.no_grad()
def test_asking_for_it_where_it_cannot_run_decodes_eagerly(caplog, one_thread):
    model = quantized("int3-asym/g32")
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.decoding"):
        result = generate(model, PROMPT, greedy("native", 4))
    assert result.decode_path == "eager" and "do not serve" in caplog.text
    float_model = build("llama")
    for settings in (GenerationSettings(max_new_tokens=3, kv_cache="fp8"),
                     GenerationSettings(max_new_tokens=3, kv_cache=KVCacheConfig("int8", residual_length=4)),
                     GenerationSettings(max_new_tokens=3, cpu_kernels=False)):
        assert generate(float_model, PROMPT, settings).decode_path == "eager"


def test_an_int8_cache_is_refused_for_sliding_windows():
    """The int8 cache keeps full-attention models only, on the native step as on the eager path: both say so."""
    from modelpress.inference.decoding import native_path_obstacle

    model = build("gemma3")
    with pytest.raises(ModelpressError, match="full-attention models only"):
        NativeDecoder(model, 32, kv_cache="int8")
    reason = native_path_obstacle(model, GenerationSettings(kv_cache="int8"), None)
    assert "full-attention models only" in reason and "sliding_attention" in reason
    assert native_path_obstacle(model, GenerationSettings(), None) is None


@torch.no_grad()
def test_the_cache_bounds_are_kept(one_thread):
    model = build("llama")
    native = NativeDecoder(model, len(PROMPT) + 2)
    with pytest.raises(ModelpressError, match="cache holds"):
        native.prefill(PROMPT * 2)
    native.prefill(PROMPT)
    native.forward([1, 2])
    with pytest.raises(ModelpressError, match="overrun"):
        native.step(3)
    with pytest.raises(ValueError, match="rewind"):
        native.rewind(len(PROMPT) + 3)
    with pytest.raises(ModelpressError, match="cannot run this model"):
        NativeDecoder(quantized("int3-asym/g32"), 16)


@torch.no_grad()
def test_a_decoder_that_cannot_be_built_decodes_eagerly(monkeypatch, caplog, one_thread):
    from modelpress.inference import native_decode

    class Refusing:
        def __init__(self, *args, **kwargs):
            raise ModelpressError("the native decode step refused the model: shapes")

    monkeypatch.setattr(native_decode, "NativeDecoder", Refusing)
    model = build("llama")
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.decoding"):
        result = generate(model, PROMPT, greedy("auto", 4))
    assert result.decode_path == "eager" and "refused the model" in caplog.text
    assert result.tokens == generate(model, PROMPT, greedy("eager", 4)).tokens


@torch.no_grad()
def test_int8_products_are_an_option_that_really_runs(one_thread):
    """cpu_products="int8": x quantized to int8 per block of 32 for int8 weights (AVX512_VNNI): close to the exact
    path, not equal to it; unknown products are refused."""
    if not cpu_native.products_available("int8"):
        pytest.skip("this CPU has no AVX512_VNNI")
    model = build("llama")
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int8/g32")))
    with fast_cpu():
        exact, int8 = (NativeDecoder(model, 16, products=p) for p in ("float32", "int8"))
        for a, b in ((exact.prefill(PROMPT), int8.prefill(PROMPT)), (exact.step(11), int8.step(11))):
            assert not torch.equal(a, b) and (a - b).abs().max() < 0.05 * a.abs().max()
    settings = GenerationSettings(max_new_tokens=4, cpu_products="int8", sampling=SamplingConfig(temperature=0.0))
    assert generate(model, PROMPT, settings).decode_path == "native"
    with pytest.raises(ModelpressError, match="CPU products"):
        GenerationSettings(cpu_products="int4")


@pytest.mark.parametrize("spec", [None, "int4/g32", "nf4/g64", "int8/g32"])
@torch.no_grad()
def test_threads_split_rows_and_give_the_same_numbers(spec):
    """A forward over 1, 2 or 3 threads (rows of every projection and of the head split in blocks of 4), of one
    token (steps) or several (the prompt, a 5-token verify pass): the same logits bit for bit, since every row is
    summed as one thread would."""
    model = build("qwen2")
    if spec is not None:
        quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    runs = []
    with fast_cpu():
        for threads in (1, 2, 3):
            native = NativeDecoder(model, 16, threads=threads)
            first = native.prefill(PROMPT)
            assert native.head_native
            runs.append(torch.cat([first, native.step(11), native.step(23), native.forward([5, 60, 7, 2, 9])]))
    assert runs[0].shape[0] == 8
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_head_it_does_not_serve_is_the_models_own(family, one_thread):
    """The model's own head runs on the step's final hidden states (Gemma 2: its logits soft-capped after it). The
    hidden states are checked against the eager forward's, and the logits against the head run on them: under
    fast_cpu the packed head rounds its input to bfloat16, where a last-bit difference between the two paths' hidden
    states (their int4 kernels sum in different orders) can flip one element's rounding and move the logits ~1e-3."""
    from modelpress.algorithms.quantize.head import HeadConfig, quantize_head

    # a head tied to Gemma's scaled embedding is not quantized; a small cap, so that capping shows in the logits
    cap = 0.5 if family == "gemma2" else None
    model = build(family, tie_word_embeddings=False, **({} if cap is None else dict(final_logit_softcapping=cap)))
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    quantize_head(model, HeadConfig(WeightScheme.parse("int3-asym/g32")))
    inputs = []
    model.lm_head.register_forward_hook(
        lambda module, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])[-1:]))
    with fast_cpu():
        native = NativeDecoder(model, len(PROMPT) + 8)
        cache = make_kv_cache(model, KVCacheConfig("float"))
        with mock.patch.object(native_decode, "NATIVE_PREFILL_TOKENS", 0):
            native.prefill(PROMPT)
        forward_logits(model, PROMPT, cache, last_only=True)
        for token in [11, 23, 5, 60]:
            inputs.clear()
            got, ref = native.step(token), forward_logits(model, [token], cache, last_only=True)
            (hidden, eager_hidden) = inputs
            assert torch.allclose(hidden, eager_hidden, atol=2e-4, rtol=2e-4)
            own = model.lm_head(hidden).float()
            if cap is not None:
                assert not torch.allclose(own, torch.tanh(own / cap) * cap, atol=1e-2)
                own = torch.tanh(own / cap) * cap
            assert torch.equal(got, own)
            assert torch.allclose(got, ref, atol=1e-2, rtol=1e-2)
    assert not native.head_native


@torch.no_grad()
def test_a_forked_child_starts_its_own_threads():
    """The pool's workers are not copied by fork: a child (a DataLoader worker, say) starts its own."""
    import os
    import select
    import signal

    model = build("llama")
    native = NativeDecoder(model, 16, threads=2)
    native.prefill(PROMPT)
    expected = native.step(11)
    native.rewind(1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: one threaded step, its logits through the pipe
        try:
            os.write(write, native.step(11).numpy().tobytes())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while select.select([read], [], [], 60)[0] and (chunk := os.read(read, 1 << 16)):
        data += chunk
    if len(data) < expected.numel() * 4:   # a child waiting on workers it does not have never answers
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read)
    assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(expected.shape), expected)
