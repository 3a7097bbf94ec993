"""DecodeSession: generations from one prepared model, its decoders (caches, CUDA graphs, native structs) kept between
calls, give the tokens a call of generate / speculative_generate / generate_batch gives; which call reuses which
decoder; the fusions undone and the decoders freed on close; bad use refused."""

import copy

import pytest
import torch
from conftest import build_tiny_llama

from modelpress.errors import ModelpressError
from modelpress.inference.batch_decode import generate_batch
from modelpress.inference.decoder_pool import DecoderPool
from modelpress.inference.decoding import IN_SESSION, GenerationSettings, generate
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.session import DecodeSession
from modelpress.inference.speculative import SpeculativeConfig, speculative_generate
from modelpress.nn import cpu_native

pytestmark = pytest.mark.usefixtures("one_thread")

# initializer_range 0.1: logits that depend on the context and its positions (the default 0.02 repeats one token,
# which would hide a decoder restarted at a wrong position)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False)
PROMPTS = [[5, 17, 33, 2, 90], [7], list(range(3, 60)), [250, 41, 9, 9, 12, 77]]


@pytest.fixture(scope="module")
def pair():
    """A float32 target and a perturbed copy as its draft (the target's architecture: it reads the target's cache)."""
    target = build_tiny_llama(0, **TINY).float()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return target, draft


def settings(decode: str, tokens: int = 12, temperature: float = 0.0) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=tokens, decode=decode, sampling=SamplingConfig(temperature))


DECODES = ["static"] + (["native"] if cpu_native.available() else [])


@pytest.mark.parametrize("decode", DECODES)
def test_session_tokens_equal_fresh_generations_and_decoders_are_reused(pair, decode):
    target, _ = pair
    with DecodeSession(target, settings(decode)) as session:
        for prompt, tokens in zip(PROMPTS, (12, 20, 12, 7)):
            expected = generate(target, prompt, settings(decode, tokens))
            got = session.generate(prompt, max_new_tokens=tokens)
            assert got.tokens == expected.tokens and got.decode_path == expected.decode_path == decode
            assert len(set(got.tokens)) > 2   # not one token repeated: a wrong position would show
        # every call needed at most 80 positions: one decoder of 256, built once and reused three times
        assert (session.pool.built, session.decoders_reused) == (1, 3)
        assert session.pool.kept["model"].max_len == DecoderPool.LENGTH_STEP


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_a_session_on_a_quantized_kv_cache_gives_fresh_tokens(pair, kv):
    """The static quantized cache (int8 per token; int4 = KIVI: keys per channel over token groups, a float window
    in a ring) holds the last generation's codes and ring when the next starts: never read."""
    target, _ = pair
    quantized = GenerationSettings(max_new_tokens=40, decode="static", kv_cache=kv,
                                   sampling=SamplingConfig(temperature=0))
    with DecodeSession(target, quantized) as session:
        for prompt in (PROMPTS[2], PROMPTS[0], PROMPTS[1]):   # the long one first: its codes are left behind
            assert session.generate(prompt).tokens == generate(target, prompt, quantized).tokens
        assert session.decoders_reused == 2


def test_sampled_session_calls_draw_as_fresh_ones(pair):
    target, _ = pair
    sampled = SamplingConfig(0.9, top_k=50)
    with DecodeSession(target, settings("static")) as session:
        for seed, prompt in enumerate(PROMPTS[:2]):
            got = session.generate(prompt, max_new_tokens=16, sampling=sampled,
                                   generator=torch.Generator().manual_seed(seed))
            fresh = generate(target, prompt, GenerationSettings(max_new_tokens=16, decode="static", sampling=sampled),
                             generator=torch.Generator().manual_seed(seed))
            assert got.tokens == fresh.tokens and len(got.tokens) == 16


def test_a_call_too_long_or_far_shorter_builds_a_new_decoder(pair):
    target, _ = pair
    with DecodeSession(target, settings("static", 8)) as session:
        session.generate(PROMPTS[0])                              # 13 positions: 256
        session.generate(PROMPTS[0], max_new_tokens=300)          # 305: a decoder of 512 replaces it
        assert session.pool.kept["model"].max_len == 512 and session.pool.built == 2
        session.generate(PROMPTS[0], max_new_tokens=200)          # 205 -> 256: the 512 one serves (at most 2x)
        assert session.pool.built == 2 and session.decoders_reused == 1
        prompt = [3 + i % 290 for i in range(699)]
        long = session.generate(prompt, max_new_tokens=8)         # 707 -> 768: 512 is too short
        assert session.pool.kept["model"].max_len == 768 and session.pool.built == 3
        assert long.tokens == generate(target, prompt, settings("static", 8)).tokens
        session.generate(PROMPTS[1], max_new_tokens=8)            # 9 -> 256: 768 is over twice that, rebuilt
        assert session.pool.kept["model"].max_len == 256 and session.pool.built == 4


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("share", [True, False], ids=["target-cache", "own-cache"])
def test_speculative_session_equals_speculative_generate(pair, decode, share):
    target, draft = pair
    config = SpeculativeConfig(3, share_kv_cache=share)
    with DecodeSession(target, settings(decode), draft=draft, speculative=config) as session:
        for prompt in PROMPTS:
            expected = speculative_generate(target, draft, prompt, settings(decode), config)
            got = session.generate(prompt)
            assert got.tokens == expected.tokens == generate(target, prompt, settings(decode)).tokens
            assert (got.rounds, got.accepted, got.shared_kv_cache) == (expected.rounds, expected.accepted, share)
        assert session.pool.built == 2 and session.decoders_reused == 2 * (len(PROMPTS) - 1)
        if share:  # the draft's decoder is on the cache of the target's
            assert session.pool.kept["draft"].cache_owner is session.pool.kept["target"]


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("share", [True, False], ids=["target-cache", "own-cache"])
def test_a_speculative_conversation_runs_only_each_turns_new_tokens(pair, decode, share):
    """With a draft: the target's cache (and the draft's own, if it has one) keeps the conversation; each turn's
    greedy tokens are plain decoding's, and the target runs only what its cache does not hold."""
    target, draft = pair
    config = SpeculativeConfig(3, share_kv_cache=share)
    greedy = settings(decode, 10)
    with DecodeSession(target, greedy, draft=draft, speculative=config) as session:
        prompt, held = [], 0
        for message in ([5, 17, 33, 2, 90], [250, 41, 9], [60, 61, 62, 63], [3 + i % 290 for i in range(240)]):
            prompt = prompt + message
            got, fresh = session.generate(prompt), speculative_generate(target, draft, prompt, greedy, config)
            assert got.tokens == fresh.tokens == generate(target, prompt, greedy).tokens
            assert (got.rounds, got.accepted) == (fresh.rounds, fresh.accepted)   # the draft saw the same context
            assert got.reused_prompt_tokens == held and got.shared_kv_cache == share
            assert assert_held_tokens_are_cached(session, {"target": target, "draft": draft}) == 2 - share
            held = len(prompt) + len(got.tokens) - 1
            prompt = prompt + got.tokens
        assert session.pool.built == 4   # the last turn outgrew both decoders: rebuilt, the prefix copied over


def test_a_rebuilt_target_decoder_takes_a_new_draft_decoder_on_its_cache(pair):
    target, draft = pair
    with DecodeSession(target, settings("static"), draft=draft, speculative=SpeculativeConfig(3)) as session:
        session.generate(PROMPTS[0])
        first = dict(session.pool.kept)
        result = session.generate(PROMPTS[0], max_new_tokens=400)
        assert session.pool.kept["target"] is not first["target"] and session.pool.kept["draft"] is not first["draft"]
        assert session.pool.kept["draft"].cache_owner is session.pool.kept["target"]
        assert result.tokens == generate(target, PROMPTS[0], settings("static", 400)).tokens


def test_rows_session_equals_generate_batch(pair):
    target, _ = pair
    with DecodeSession(target, settings("static", 10), rows=3) as session:
        for batch in (PROMPTS[:3], PROMPTS[1:4], PROMPTS[:2]):
            expected = generate_batch(target, batch, settings("static", 10))
            got = session.generate_rows(batch)
            assert got.tokens == expected.tokens and got.batched
        assert session.pool.built == 2 and session.decoders_reused == 1   # rows:3 twice, then rows:2
        one = session.generate_rows([PROMPTS[0]])                           # one prompt: the "model" decoder
        assert one.tokens == [generate(target, PROMPTS[0], settings("static", 10)).tokens]


def assert_held_tokens_are_cached(session, models):
    """What the pool says a kept decoder holds is in its cache: the keys and values of a fresh prefill of those
    tokens (float caches), for each role with held tokens."""
    from modelpress.inference.native_decode import NativeDecoder
    from modelpress.inference.static_decode import StaticDecoder

    def states(decoder, n):
        if isinstance(decoder, NativeDecoder):
            return [t[:, :n] for t in decoder._cache_tensors]
        return [t[:, :, :n] for layer in decoder.cache.layers for t in (layer.keys, layer.values)]

    checked = 0
    for role, held in session.pool.held.items():
        kept = session.pool.kept[role]
        fresh = (NativeDecoder(models[role], kept.max_len) if isinstance(kept, NativeDecoder)
                 else StaticDecoder(models[role], kept.max_len, graph=False))
        fresh.prefill(held)
        for got, expected in zip(states(kept, len(held)), states(fresh, len(held))):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        checked += 1
    return checked


@pytest.mark.parametrize("decode", DECODES)
def test_a_conversation_runs_only_each_turns_new_tokens(pair, decode):
    """Each turn's prompt is the last prompt, its reply and a new message: the cache holds all but the reply's
    last token (never fed), so only that and the message run; the tokens are a fresh generation's."""
    target, _ = pair
    greedy = settings(decode, 10)
    turns = [PROMPTS[0], [250, 41, 9], [60, 61, 62, 63]]
    with DecodeSession(target, greedy) as session, DecodeSession(target, greedy, reuse_prefix=False) as whole:
        prompt, held = [], 0
        for message in turns:
            prompt = prompt + message
            got, again = session.generate(prompt), whole.generate(prompt)
            assert got.tokens == again.tokens == generate(target, prompt, greedy).tokens
            assert got.reused_prompt_tokens == held and again.reused_prompt_tokens == 0
            assert assert_held_tokens_are_cached(session, {"model": target}) == 1
            held = len(prompt) + len(got.tokens) - 1
            prompt = prompt + got.tokens
        assert held > 30 and session.pool.built == 1
        # a prompt that leaves the conversation after 3 tokens reuses those; one equal to what the cache holds
        # runs its last token (its logits start the generation)
        branch = prompt[:3] + [1, 2, 3]
        assert session.generate(branch).reused_prompt_tokens == 3
        assert session.generate(branch).reused_prompt_tokens == len(branch) - 1
        assert session.generate(branch).tokens == generate(target, branch, greedy).tokens


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("kv", ["float", "int8"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])   # gemma3: sliding-window layers (window 8: none for int8)
@pytest.mark.parametrize("start", [10, 40], ids=["rest-by-the-model", "rest-in-one-step"])
def test_a_prefill_after_a_held_prefix_matches_a_whole_one(pair, decode, kv, family, start):
    """The logits of a prompt run after a prefix the cache holds equal a whole prefill's; the prefix's slots are
    those an earlier, different prompt wrote. The native step runs a rest of up to NATIVE_PREFILL_TOKENS itself, a
    longer one through transformers on a cache preloaded with the prefix."""
    from conftest import build_family

    from modelpress.inference.kv_cache import KVCacheConfig
    from modelpress.inference.native_decode import NATIVE_PREFILL_TOKENS, NativeDecoder
    from modelpress.inference.static_decode import StaticDecoder

    if kv == "int8" and family == "gemma3" and decode == "native":
        pytest.skip("the native step keeps no int8 cache for sliding windows")
    model = pair[0] if family == "llama" else build_family(family, sliding_window=8)
    make = ((lambda: NativeDecoder(model, 128, kv_cache=kv)) if decode == "native"
            else (lambda: StaticDecoder(model, 128, graph=False, kv_cache=KVCacheConfig(kv, residual_length=0))))
    prompt = [3 + 7 * i % 290 for i in range(60)]
    assert (len(prompt) - start > NATIVE_PREFILL_TOKENS) == (start == 10)
    whole, reused = make(), make()
    expected = whole.prefill(prompt)
    reused.prefill(prompt[:start] + [299] * 40)              # its tail differs: overwritten by the second prefill
    reused.restart()
    got = reused.prefill(prompt, start=start)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert reused.position == whole.position == len(prompt)
    torch.testing.assert_close(reused.step(5), whole.step(5), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="from position 60"):
        reused.prefill(prompt, start=60)


@pytest.mark.parametrize("decode,kv", [(d, "float") for d in DECODES] + [("static", "int8")]
                         + ([("native", "int8")] if "native" in DECODES else []))
def test_a_conversation_that_outgrows_its_cache_keeps_its_prefix(pair, decode, kv):
    """A turn too long for the kept decoder builds a longer one, the held keys and values copied into it."""
    target, _ = pair
    greedy = GenerationSettings(max_new_tokens=10, decode=decode, kv_cache=kv, sampling=SamplingConfig(temperature=0))
    with DecodeSession(target, greedy) as session:
        first = session.generate(PROMPTS[2])                      # 57 + 10: a decoder of 256
        prompt = PROMPTS[2] + first.tokens + [3 + i % 290 for i in range(240)]
        second = session.generate(prompt)                         # 307 + 10: one of 512 in its place
        assert session.pool.built == 2 and session.pool.kept["model"].max_len == 512
        assert second.reused_prompt_tokens == len(PROMPTS[2]) + 9
        assert second.tokens == generate(target, prompt, greedy).tokens


@pytest.mark.gpu
def test_a_prefill_after_a_held_prefix_matches_a_whole_one_on_cuda(pair, cuda):
    """The same on a CUDA graph decoder (float32): the rest of the prompt runs eagerly at its positions, and the
    captured step that follows reads the held prefix."""
    from modelpress.inference.static_decode import StaticDecoder

    model = copy.deepcopy(pair[0]).to(cuda)
    prompt = list(range(3, 63))
    whole, reused = StaticDecoder(model, 128, graph=True), StaticDecoder(model, 128, graph=True)
    expected = whole.prefill(prompt)
    reused.prefill(prompt[:10] + [299] * 40)
    reused.step(4)                                           # captured at position 50
    reused.restart()
    torch.testing.assert_close(reused.prefill(prompt, start=10), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reused.step(5), whole.step(5), rtol=1e-4, atol=1e-4)
    assert reused.replays == 1


def test_no_prefix_is_reused_where_the_cache_rewrites_old_positions(pair):
    """KIVI (int4): a float window in a ring and key groups re-quantized from it; an earlier generation's slots
    cannot be trusted, so every prompt runs whole. A per-token int8 cache keeps its prefixes."""
    target, _ = pair
    for kv, reuses in (("int4", False), ("int8", True)):
        quantized = GenerationSettings(max_new_tokens=8, decode="static", kv_cache=kv,
                                       sampling=SamplingConfig(temperature=0))
        with DecodeSession(target, quantized) as session:
            first = session.generate(PROMPTS[2])
            prompt = PROMPTS[2] + first.tokens + [7, 8]
            second = session.generate(prompt)
            assert second.reused_prompt_tokens == (len(PROMPTS[2]) + 7 if reuses else 0)
            assert second.tokens == generate(target, prompt, quantized).tokens


def test_bad_use_is_refused(pair):
    target, draft = pair
    session = DecodeSession(target, settings("static"))
    with pytest.raises(ModelpressError, match="needs a tokenizer"):
        session.generate("some text")
    with pytest.raises(ModelpressError, match="3 prompts for a session of 1 rows"):
        session.generate_rows(PROMPTS[:3])
    session.close()
    assert not session.pool.kept
    with pytest.raises(ModelpressError, match="closed"):
        session.generate(PROMPTS[0])
    with pytest.raises(ModelpressError, match="rows=1"):
        DecodeSession(target, settings("static"), draft=draft, rows=2)
    with pytest.raises(ModelpressError, match="at least one row"):
        DecodeSession(target, rows=0)
    texts = DecodeSession(target, settings("static"), encode=lambda text: [ord(c) % 300 for c in text])
    assert texts.generate("abc").tokens == generate(target, [97, 98, 99], settings("static")).tokens
    held = texts.held
    del texts   # dropped unclosed: closed on collection, the model no longer held
    assert not any(m in IN_SESSION for m in held)


@pytest.mark.gpu
def test_graph_session_captures_once_and_undoes_the_fusions_on_close(cuda, monkeypatch):
    """On CUDA (graphs, decode-time fusions, int4 layers re-laid): the second call replays the first call's graphs
    (no capture), the tokens are a fresh generate's, and close() restores the model's modules and weights."""
    from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
    from modelpress.formats.scheme import WeightScheme
    from modelpress.nn import triton_backend

    monkeypatch.setattr(triton_backend, "MMA_MIN_TILES_PER_SM", 0)  # a tiny model's layers, re-laid all the same
    model = build_tiny_llama(0, **{**TINY, "hidden_size": 256, "intermediate_size": 512, "num_key_value_heads": 4})
    quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse("int4/g64")))
    model = model.to("cuda", torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    greedy = settings("auto", 16)
    # a fresh generation over the session's 256 positions (the split-cache attention's sums depend on the length)
    expected = [generate(model, p, settings("auto", 256 - len(p))).tokens[:16] for p in PROMPTS[:2]]
    draft = copy.deepcopy(model)
    with DecodeSession(model, greedy) as session:
        # on CUDA a generation outside the session would fuse the fused model again: refused until it closes
        with pytest.raises(ModelpressError, match="open DecodeSession"):
            generate(model, PROMPTS[0], greedy)
        with pytest.raises(ModelpressError, match="open DecodeSession"):
            DecodeSession(model, greedy)
        first, second = (session.generate(p) for p in PROMPTS[:2])
        assert first.decode_path == second.decode_path == "graph"
        assert first.capture_seconds > 0 and second.capture_seconds == 0
        assert [first.tokens, second.tokens] == expected
        assert "tensor-core GEMV" in second.fusions
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    with DecodeSession(model, greedy) as session:   # a conversation's next turn: only its new part runs
        first = session.generate(PROMPTS[2])
        turn = PROMPTS[2] + first.tokens + [7, 8, 9]
        second = session.generate(turn)
        assert second.reused_prompt_tokens == len(PROMPTS[2]) + 15 and second.decode_path == "graph"
        assert len(second.tokens) == 16 and second.capture_seconds == 0
    with DecodeSession(model, greedy, draft=draft, speculative=SpeculativeConfig(3)) as session:
        runs = [session.generate(p) for p in PROMPTS[:2]]
        assert runs[0].capture_seconds > 0 and runs[1].capture_seconds == 0
        assert [r.decode_path for r in runs] == ["graph", "graph"] and all(r.shared_kv_cache for r in runs)
