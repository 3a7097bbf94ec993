"""Speculative decoding: greedy output identical to the target's own, and sampled tokens distributed as the
target's (chi-square against the exact target distribution, with a test that a wrong rule fails), on the eager
path (DynamicCache + crop) and the static-cache path (StaticDecoder + rewind; CUDA graphs on the GPU)."""

import copy
import logging

import pytest
import torch
from conftest import build_tiny_llama
from transformers.cache_utils import DynamicCache

from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.inference import speculative
from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.kv_cache import KVCacheConfig, make_kv_cache
from modelpress.inference.sampling import SamplingConfig, next_token_probs, sample
from modelpress.inference.speculative import SpeculativeConfig, low_bit_draft, speculative_generate, verify_draft
from modelpress.inference.static_decode import StaticDecoder
from modelpress.nn import cpu_native

ALPHA = 1e-3  # a correct sampler passes at this level; the wrong rules below land at p < 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's test of draws `tokens` against `probs`; bins expecting < 5 draws are pooled.
    A draw of a token with probability exactly 0 fails outright."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    probs = probs.double()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    counts, expected = counts[keep], expected[keep]
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def random_distributions(rows, vocab, seed, sampling):
    g = torch.Generator().manual_seed(seed)
    return next_token_probs(torch.randn(rows, vocab, generator=g) * 2.0, sampling)


def draw_with_rule(p, q, n, generator, rule="correct"):
    """n independent speculative steps on fixed per-position distributions p (k+1, V), q (k, V).
    Returns the first emitted token (n,) and, for rows whose first draft was kept, the second (m,)."""
    k = q.shape[0]
    drafts = torch.stack([sample(q[i].expand(n, -1), generator) for i in range(k)], dim=1)  # (n, k)
    if rule == "correct":
        accepted, next_token = verify_draft(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, generator)
    elif rule == "always_accept":
        accepted, next_token = torch.full((n,), k), sample(p[k].expand(n, -1), generator)
    elif rule == "resample_from_target":  # right acceptance test, wrong distribution after a rejection
        accepted, _ = verify_draft(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, generator)
        next_token = sample(p[accepted], generator)
    emitted = torch.cat([drafts, next_token.unsqueeze(1)], dim=1)
    # position j of the output is drafts[j] if j < accepted, else the next token (when j == accepted)
    first = torch.where(accepted > 0, emitted[:, 0], next_token)
    has_second = accepted >= 1
    second = torch.where(accepted[has_second] > 1, emitted[has_second, 1], next_token[has_second])
    return first, second


@pytest.mark.parametrize("sampling", [SamplingConfig(1.0), SamplingConfig(0.7, top_k=10),
                                      SamplingConfig(1.3, top_p=0.9)], ids=["t1", "topk", "topp"])
def test_accept_rule_reproduces_the_target_distribution(sampling):
    vocab, k, n = 24, 3, 20_000
    p = random_distributions(k + 1, vocab, seed=1, sampling=sampling)
    q = random_distributions(k, vocab, seed=2, sampling=sampling)
    first, second = draw_with_rule(p, q, n, torch.Generator().manual_seed(0))
    assert chi_square_p_value(first, p[0]) > ALPHA
    assert second.numel() > 2000
    assert chi_square_p_value(second, p[1]) > ALPHA


@pytest.mark.parametrize("rule", ["always_accept", "resample_from_target"])
def test_the_same_test_catches_a_wrong_rule(rule):
    vocab, k, n = 24, 3, 20_000
    sampling = SamplingConfig(1.0)
    p = random_distributions(k + 1, vocab, seed=1, sampling=sampling)
    q = random_distributions(k, vocab, seed=2, sampling=sampling)
    first, _ = draw_with_rule(p, q, n, torch.Generator().manual_seed(0), rule=rule)
    assert chi_square_p_value(first, p[0]) < 1e-12


def test_greedy_rule_accepts_exactly_the_target_argmax():
    p = torch.eye(5)[[2, 4, 1, 0]].unsqueeze(0)       # target argmax 2, 4, 1 then bonus 0
    q = torch.eye(5)[[2, 4, 3]].unsqueeze(0)
    accepted, token = verify_draft(p, q, torch.tensor([[2, 4, 3]]), torch.Generator().manual_seed(0))
    assert accepted.item() == 2 and token.item() == 1
    accepted, token = verify_draft(p, p[:, :3], torch.tensor([[2, 4, 1]]))
    assert accepted.item() == 3 and token.item() == 0


TINY = {"tie_word_embeddings": False, "initializer_range": 0.1}


def perturbed_copy(model, noise, seed):
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=g) * noise * param.std())
    return draft


@pytest.fixture(scope="module")
def models():
    target = build_tiny_llama(0, **TINY).double()  # float64: argmax ties from rounding cannot flip a token
    return target, {"independent": build_tiny_llama(1, **TINY).double(), "perturbed": perturbed_copy(target, 0.1, 7)}


@pytest.mark.parametrize("draft_name", ["independent", "perturbed"])
def test_greedy_speculative_output_equals_target_greedy_output(models, draft_name):
    target, drafts = models
    draft = drafts[draft_name]
    settings = GenerationSettings(max_new_tokens=16, sampling=SamplingConfig(temperature=0))
    g = torch.Generator().manual_seed(0)
    rates = []
    for length in (1, 6):
        prompt = torch.randint(3, 320, (1, length), generator=g)
        expected = target.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)[0, length:].tolist()
        assert generate(target, prompt, settings).tokens == expected
        for k in (1, 3, 5):
            result = speculative_generate(target, draft, prompt, settings, SpeculativeConfig(k))
            assert result.tokens == expected, (length, k)
            assert result.target_forwards == 1 + result.rounds - (length == 1)
            rates.append(result.acceptance_rate)
    if draft_name == "perturbed":
        assert 0.1 < sum(rates) / len(rates) < 0.95  # both accepted and rejected drafts were exercised
    else:
        assert max(rates) < 0.2


def test_greedy_speculative_output_with_an_int8_target_cache(models):
    target, drafts = models
    target = target.float()
    draft = drafts["perturbed"].float()
    settings = GenerationSettings(max_new_tokens=20, sampling=SamplingConfig(temperature=0))
    prompt = [5, 17, 99, 3]
    expected = generate(target, prompt, settings, cache=make_kv_cache(target, KVCacheConfig("int8"))).tokens
    result = speculative_generate(target, draft, prompt, settings, SpeculativeConfig(3),
                                  target_cache=make_kv_cache(target, KVCacheConfig("int8")))
    assert result.tokens == expected and result.rounds < 20
    target.double()
    draft.double()


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_settings_kv_cache_is_the_target_cache_of_speculation(models, decode):
    """GenerationSettings.kv_cache="int8" quantizes the target's cache on either path: greedy speculation equals
    the target's own greedy decode with that cache (and differs from the float cache's somewhere in the logits,
    checked by the KV cache tests), and the static path really ran."""
    target, drafts = models
    target, draft = target.float(), drafts["perturbed"].float()
    try:
        settings = GenerationSettings(max_new_tokens=20, sampling=SamplingConfig(temperature=0), decode=decode,
                                      kv_cache="int8")
        prompt = [5, 17, 99, 3]
        expected = generate(target, prompt, settings).tokens
        result = speculative_generate(target, draft, prompt, settings, SpeculativeConfig(3))
        assert result.tokens == expected and result.decode_path == decode
    finally:
        target.double()
        draft.double()


def test_a_windowed_kv_cache_is_named_as_approximate(models, caplog):
    target, drafts = models
    target, draft = target.float(), drafts["perturbed"].float()
    try:
        settings = GenerationSettings(max_new_tokens=4, sampling=SamplingConfig(temperature=0), decode="static",
                                      kv_cache="int4")
        with caplog.at_level(logging.WARNING):
            speculative_generate(target, draft, [5, 17, 99, 3], settings, SpeculativeConfig(2))
        assert "keeps a float window of 128 tokens" in caplog.text
    finally:
        target.double()
        draft.double()


def exact_two_token_distributions(model, prompt, sampling):
    """The target's exact distribution of the first new token and the marginal of the second."""
    with torch.no_grad():
        first = next_token_probs(model(torch.tensor([prompt])).logits[0, -1], sampling)
        vocab = first.numel()
        batch = torch.tensor([prompt + [t] for t in range(vocab)])
        second_given = next_token_probs(model(batch).logits[:, -1], sampling)       # (V, V)
    return first, first @ second_given


@pytest.mark.parametrize("decode, shared", [("eager", False), ("static", True), ("static", False)],
                         ids=["eager", "static-shared-cache", "static-own-caches"])
def test_end_to_end_sampled_tokens_follow_the_target_distribution(decode, shared):
    """On the static path the draft (an independent model of the target's architecture) reads the target's KV cache
    by default (shared), or keeps its own: exact either way."""
    config = {"vocab_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": False,
              "initializer_range": 0.15}
    target, draft = build_tiny_llama(0, **config), build_tiny_llama(3, **config)
    sampling = SamplingConfig(temperature=1.0)
    prompt = [3, 5, 7]
    first_p, second_p = exact_two_token_distributions(target, prompt, sampling)
    draft_first, _ = exact_two_token_distributions(draft, prompt, sampling)
    settings = GenerationSettings(max_new_tokens=2, sampling=sampling, decode=decode)
    g = torch.Generator().manual_seed(0)
    runs = [speculative_generate(target, draft, prompt, settings, SpeculativeConfig(3, share_kv_cache=shared),
                                 generator=g) for _ in range(300)]
    tokens = torch.tensor([r.tokens for r in runs])
    assert {(r.decode_path, r.shared_kv_cache) for r in runs} == {(decode, shared)}
    assert chi_square_p_value(tokens[:, 0], first_p) > ALPHA
    assert chi_square_p_value(tokens[:, 1], second_p) > ALPHA
    accepted = sum(r.accepted for r in runs) / sum(r.drafted for r in runs)
    assert 0.05 < accepted < 0.95
    # power: the draft's own distribution, which an always-accept bug would produce, fails at this size
    assert chi_square_p_value(sample(draft_first.expand(300, -1), g), first_p) < 1e-6


def test_self_speculative_draft_is_a_low_bit_copy(models):
    target = build_tiny_llama(0, **TINY)
    draft = low_bit_draft(target, WeightScheme.parse("int4/g32"))
    assert type(draft.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    assert type(target.model.layers[0].mlp.up_proj).__name__ == "Linear"  # the target is untouched
    settings = GenerationSettings(max_new_tokens=16, sampling=SamplingConfig(temperature=0))
    expected = generate(target, [4, 8, 15], settings).tokens
    result = speculative_generate(target, draft, [4, 8, 15], settings, SpeculativeConfig(4))
    assert result.tokens == expected and result.acceptance_rate > 0.5


def test_draft_with_another_vocabulary_is_refused(models):
    target, _ = models
    other = build_tiny_llama(0, vocab_size=400, **TINY)
    with pytest.raises(ModelpressError, match="draft model scores 400 tokens but the target scores 320"):
        speculative_generate(target, other, [1, 2], GenerationSettings(max_new_tokens=4))


def test_generation_stops_at_end_of_sequence(models):
    target, drafts = models
    settings = GenerationSettings(max_new_tokens=30, sampling=SamplingConfig(temperature=0))
    full = generate(target, [9, 10], settings).tokens
    eos = full[6]
    stop = GenerationSettings(max_new_tokens=30, sampling=SamplingConfig(temperature=0), eos_token_ids=(eos,))
    cut = full[: full.index(eos) + 1]
    assert generate(target, [9, 10], stop).tokens == cut
    assert speculative_generate(target, drafts["perturbed"], [9, 10], stop, SpeculativeConfig(4)).tokens == cut
    # a draft on the target's cache: its rounds are queued one ahead of the host's reads, so the round after the one
    # that made the end-of-sequence token has run too (and is dropped)
    static = GenerationSettings(max_new_tokens=30, sampling=SamplingConfig(temperature=0), eos_token_ids=(eos,),
                                decode="static")
    result = speculative_generate(target, drafts["perturbed"], [9, 10], static, SpeculativeConfig(4))
    assert result.shared_kv_cache and result.tokens == cut
    assert result.target_forwards == 1 + result.rounds + 1 and result.draft_forwards == 4 * (result.rounds + 1)



# ---- decode paths: the static cache (decode="static" on the CPU; "auto" takes CUDA graphs on the GPU) ----

def greedy(decode: str, tokens: int = 16) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=tokens, decode=decode, sampling=SamplingConfig(temperature=0))


@pytest.fixture(scope="module")
def float_models(models):
    target, drafts = models
    return copy.deepcopy(target).float(), {name: copy.deepcopy(d).float() for name, d in drafts.items()}


@pytest.fixture
def decoders(monkeypatch):
    """The StaticDecoders speculative_generate builds, in order: the target's, then the draft's."""
    made: list[StaticDecoder] = []

    class Recorded(StaticDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(speculative, "StaticDecoder", Recorded)
    return made


@pytest.mark.parametrize("draft_name", ["independent", "perturbed"])
def test_static_path_greedy_equals_the_eager_path_and_the_target(float_models, draft_name):
    """float32: the static path's verify pass (k+1 tokens at once) and the target's own steps agree on every
    argmax; with the draft on its own cache every decision of the round (drafted, accepted) is the eager path's, and
    with the draft reading the target's cache (the default for a draft of the target's architecture) the tokens are
    the same, with the draft's forwards exactly k a round (no prefill, no catch-up step)."""
    target, drafts = float_models
    g = torch.Generator().manual_seed(1)
    rates = []
    for length in (1, 6):
        prompt = torch.randint(3, 320, (1, length), generator=g)
        expected = generate(target, prompt, greedy("eager")).tokens
        for k in (1, 3, 5):
            own = speculative_generate(target, drafts[draft_name], prompt, greedy("static"),
                                       SpeculativeConfig(k, share_kv_cache=False))
            shared = speculative_generate(target, drafts[draft_name], prompt, greedy("static"), SpeculativeConfig(k))
            eager = speculative_generate(target, drafts[draft_name], prompt, greedy("eager"), SpeculativeConfig(k))
            assert (own.decode_path, shared.decode_path, eager.decode_path) == ("static", "static", "eager")
            assert (own.shared_kv_cache, shared.shared_kv_cache, eager.shared_kv_cache) == (False, True, False)
            assert own.tokens == shared.tokens == eager.tokens == expected, (length, k)
            assert (own.rounds, own.drafted, own.accepted, own.target_forwards) == \
                (eager.rounds, eager.drafted, eager.accepted, eager.target_forwards)
            assert shared.draft_forwards == k * shared.rounds
            assert own.draft_forwards >= k * own.rounds + (length > 1)  # its prefill, catch-ups after all-kept rounds
            rates.append(own.acceptance_rate)
    if draft_name == "independent":
        assert max(rates) < 0.2  # drafts rejected almost every round
    else:
        assert 0.1 < sum(rates) / len(rates) < 0.95


def shifted_head_copy(model):
    """The model with its output rows rolled by one: its argmax is always the model's argmax - 1 (mod V)."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        draft.lm_head.weight.copy_(torch.roll(model.lm_head.weight, -1, dims=0))
    return draft


@pytest.mark.parametrize("length", [1, 6])
@pytest.mark.parametrize("kind", ["always right", "always wrong"])
@pytest.mark.parametrize("shared", [False, True], ids=["own-caches", "shared-cache"])
def test_static_positions_follow_the_tokens(models, decoders, kind, length, shared):
    """After each round with n tokens so far: the target has seen all but the newest (n-1); the draft on its own
    cache n-1 after a rejection, n-2 after a round that kept all k drafts (it never fed the last). A draft on the
    target's cache starts each round where the target is, and its rounds are queued one ahead of the host's reads:
    there the host sees a round when the next may already have run, so only the end state is checked each round."""
    target, _ = models
    draft = target if kind == "always right" else shifted_head_copy(target)
    prompt = list(range(40, 40 + length))
    seen = []

    def record(new):
        verifier, drafter = decoders
        assert (drafter.cache is verifier.cache) == shared
        seen.append((len(new), verifier.position, drafter.position))

    result = speculative_generate(target, draft, prompt, greedy("static"), SpeculativeConfig(3, share_kv_cache=shared),
                                  on_tokens=record)
    assert len(decoders) == 2 and len(result.tokens) == 16
    verifier, drafter = decoders
    if kind == "always right":  # 4 rounds of 3 drafts + the bonus token
        assert result.accepted == result.drafted == 12
        if not shared:
            assert seen == [(4, length + 4 * r - 1, length + 4 * r - 2) for r in range(1, 5)]
    else:  # 16 rounds of one token, each drafting k (the last too: one verify length); the drafts that could
        # not be emitted (past the 16th token) are not counted
        assert result.accepted == 0 and result.drafted == 3 * 13 + 2 + 1
        if not shared:
            assert seen == [(1, length + r - 1, length + r - 1) for r in range(1, 17)]
    assert [n for n, *_ in seen] == ([4] * 4 if kind == "always right" else [1] * 16)
    assert verifier.position == int(verifier.pos) == length + len(result.tokens) - 1
    if shared:  # no round queued past the length limit: every verify pass and draft step was used
        assert result.target_forwards == result.rounds + (length > 1) and result.draft_forwards == 3 * result.rounds


def test_a_given_cache_takes_the_eager_path(float_models, caplog):
    target, drafts = float_models
    draft, prompt = drafts["perturbed"], [5, 17, 99, 3]
    expected = speculative_generate(target, draft, prompt, greedy("static", 12), SpeculativeConfig(3))
    assert expected.decode_path == "static"
    for given in ({"target_cache": DynamicCache(config=target.config)},
                  {"draft_cache": DynamicCache(config=draft.config)}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="modelpress.inference"):
            result = speculative_generate(target, draft, prompt, greedy("static", 12), SpeculativeConfig(3), **given)
        assert result.decode_path == "eager" and result.tokens == expected.tokens
        assert "a KV cache was given" in caplog.text and "runs both models eagerly" in caplog.text


def test_a_failed_static_prefill_falls_back_to_eager(float_models, monkeypatch, caplog):
    target, drafts = float_models
    expected = speculative_generate(target, drafts["perturbed"], [5, 17, 99], greedy("eager", 8)).tokens

    def broken(self, prompt, start=0):
        raise RuntimeError("no 4-D masks here")

    monkeypatch.setattr(StaticDecoder, "prefill", broken)
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.speculative"):
        result = speculative_generate(target, drafts["perturbed"], [5, 17, 99], greedy("static", 8))
    assert result.decode_path == "eager" and result.tokens == expected
    assert "static-cache prefill failed (RuntimeError: no 4-D masks here)" in caplog.text


def test_graph_on_cpu_runs_static_and_auto_runs_native(float_models):
    """auto on the CPU: the native step for both models where it serves them (native_decode.py), else eager."""
    target, drafts = float_models
    assert speculative_generate(target, drafts["perturbed"], [4, 5], greedy("graph", 4)).decode_path == "static"
    auto = "native" if cpu_native.available() else "eager"
    assert speculative_generate(target, drafts["perturbed"], [4, 5], greedy("auto", 4)).decode_path == auto


@pytest.mark.gpu
def test_graph_speculation_on_cuda_equals_eager_and_replays(cuda, decoders):
    """auto on CUDA captures one graph per model (the draft's single step; the target's k+1 tokens, in the last
    round too) and replays them: every verify pass and every draft step."""
    target = build_tiny_llama(0, **TINY).to(cuda)  # float32
    draft = perturbed_copy(build_tiny_llama(0, **TINY), 0.1, 7).to(cuda)
    prompt = [5, 17, 99, 3, 250, 41]
    expected = generate(target, prompt, greedy("eager", 24)).tokens
    for k in (1, 3, 5):
        decoders.clear()
        graph = speculative_generate(target, draft, prompt, greedy("auto", 24), SpeculativeConfig(k))
        eager = speculative_generate(target, draft, prompt, greedy("eager", 24), SpeculativeConfig(k))
        verifier, drafter = decoders
        assert verifier.graph_error is None and drafter.graph_error is None, (verifier.graph_error,
                                                                              drafter.graph_error)
        assert graph.decode_path == "graph" and eager.decode_path == "eager"
        assert graph.tokens == eager.tokens == expected, k
        assert 0 < graph.acceptance_rate < 1  # accepted and rejected drafts, so rewinds of both decoders
        assert verifier.captures == len(verifier.blocks) == 1 and verifier.replays == graph.rounds
        # the draft (the target's architecture) reads the target's cache: no prefill of its own, every forward replays
        assert graph.shared_kv_cache and drafter.cache is verifier.cache
        assert drafter.captures == 1 and drafter.replays == graph.draft_forwards == k * graph.rounds
        assert graph.capture_seconds > 0


@pytest.mark.gpu
def test_the_draft_steps_and_the_verify_passes_on_the_tensor_core_gemv(cuda, monkeypatch):
    """A draft's forwards after its prefill take one token, the target's verify passes k+1: both models' int4 layers
    are re-laid for the tensor-core GEMV for the generation (the target's for its rows mode, so its gated MLPs'
    rows are not interleaved: the activation in the GEMV's epilogue takes one row). Both models' bytes are as
    stored afterwards, and greedy output is the target's own."""
    from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
    from modelpress.nn import triton_backend

    monkeypatch.setattr(triton_backend, "MMA_MIN_TILES_PER_SM", 0)  # a tiny model's layers, re-laid all the same
    base = build_tiny_llama(0, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                            **TINY)
    layers, prompt = base.config.num_hidden_layers, [5, 17, 33, 2, 90]

    def int4(model):
        quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse("int4/g64")))
        return model.to(cuda)

    # both int4 in bfloat16: both re-laid, only the draft's MLPs interleaved
    target, draft = int4(copy.deepcopy(base).to(torch.bfloat16)), int4(copy.deepcopy(base).to(torch.bfloat16))
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (target, draft)]
    plain = generate(target, prompt, greedy("graph", 16))
    result = speculative_generate(target, draft, prompt, greedy("graph", 16), SpeculativeConfig(3))
    assert f" {4 * layers} 4-bit layers on the tensor-core GEMV" in plain.fusions  # plain decoding re-lays it
    assert f" {8 * layers} 4-bit layers on the tensor-core GEMV" in result.fusions  # the draft's and the target's
    assert f" {layers} MLP activations in the GEMV" in result.fusions  # the draft's
    assert result.decode_path == "graph" and result.acceptance_rate > 0.5  # the same codes: drafts mostly kept
    for model, state in zip((target, draft), states):
        after = model.state_dict()
        assert all(torch.equal(after[k], state[k]) for k in state)
    # a float32 target (verify passes exact to rounding) with the re-laid draft: the target's own greedy tokens
    target = base.to(cuda)
    result = speculative_generate(target, draft, prompt, greedy("graph", 16), SpeculativeConfig(3))
    assert f" {4 * layers} 4-bit layers on the tensor-core GEMV" in result.fusions
    assert result.tokens == generate(target, prompt, greedy("eager", 16)).tokens
    assert 0 < result.acceptance_rate


@pytest.mark.slow
def test_self_speculative_greedy_on_the_default_model_matches_plain_greedy(default_model):
    model, tokenizer = default_model.model, default_model.tokenizer
    prompt = tokenizer("The Python interpreter reads")["input_ids"]
    settings = GenerationSettings(max_new_tokens=12, sampling=SamplingConfig(temperature=0))
    expected = generate(model, prompt, settings).tokens
    draft = low_bit_draft(model, WeightScheme.parse("int8/channel"))
    result = speculative_generate(model, draft, prompt, settings, SpeculativeConfig(4))
    assert result.tokens == expected
    assert result.acceptance_rate > 0.5 and result.rounds < 12


def test_the_draft_shares_the_target_cache_only_where_it_can(float_models):
    """A draft of the target's architecture reads the target's cache (both static, or both native); another
    architecture, another dtype, a KV cache with a float window, or mixed paths each keep the draft's own cache, and
    say why."""
    target, drafts = float_models
    static = ("static", "static")
    assert speculative.shared_cache_obstacle(target, drafts["independent"], static, greedy("static")) is None
    int8 = GenerationSettings(max_new_tokens=8, decode="static", kv_cache=KVCacheConfig("int8"),
                              sampling=SamplingConfig(temperature=0))
    assert speculative.shared_cache_obstacle(target, drafts["perturbed"], static, int8) is None
    kivi = GenerationSettings(max_new_tokens=4, decode="static", kv_cache=KVCacheConfig("int4"))
    assert "float window" in speculative.shared_cache_obstacle(target, drafts["perturbed"], static, kivi)
    narrow = build_tiny_llama(0, num_key_value_heads=1, **TINY)
    assert "num_key_value_heads differ" in speculative.shared_cache_obstacle(target, narrow.float(), static,
                                                                              greedy("static"))
    half = copy.deepcopy(drafts["perturbed"]).to(torch.bfloat16)
    assert "computes in torch.bfloat16" in speculative.shared_cache_obstacle(target, half, static, greedy("static"))
    assert "static / native" in speculative.shared_cache_obstacle(target, drafts["perturbed"], ("static", "native"),
                                                                  greedy("static"))
    assert speculative.shared_cache_obstacle(target, drafts["perturbed"], ("native", "native"), greedy("static")) is None
    # with an int8 cache the shared path is exact too: the target's own greedy tokens on that cache
    prompt = [5, 17, 99, 3]
    expected = generate(target, prompt, int8).tokens
    result = speculative_generate(target, drafts["perturbed"], prompt, int8, SpeculativeConfig(3))
    assert result.shared_kv_cache and result.tokens == expected


@pytest.mark.skipif(not cpu_native.available(), reason="the native decode step is not built here")
@pytest.mark.parametrize("kv", ["float", "int8"])
def test_a_native_draft_reads_the_native_target_cache(float_models, kv):
    """On the CPU's native step too the draft (the target's architecture) reads the target's cache: the target's own
    greedy tokens on that cache, k draft steps a round, the same tokens as a draft on its own cache."""
    target, drafts = float_models
    prompt = [5, 17, 99, 3, 250, 41]
    settings = GenerationSettings(max_new_tokens=16, decode="native", kv_cache=KVCacheConfig(kv),
                                  sampling=SamplingConfig(temperature=0))
    expected = generate(target, prompt, settings)
    shared = speculative_generate(target, drafts["perturbed"], prompt, settings, SpeculativeConfig(3))
    own = speculative_generate(target, drafts["perturbed"], prompt, settings, SpeculativeConfig(3, share_kv_cache=False))
    assert expected.decode_path == shared.decode_path == own.decode_path == "native"
    assert (shared.shared_kv_cache, own.shared_kv_cache) == (True, False)
    assert shared.tokens == own.tokens == expected.tokens
    assert shared.draft_forwards == 3 * shared.rounds and own.draft_forwards > 3 * own.rounds
