"""The reference's distributions computed once (eval/reference.py): exact parity with evaluate_quality, the
top-k form a close lower bound of the exact KL, prefixes equal to the reference on shorter windows."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_llama

from modelpress.algorithms.quantize import RTNConfig, quantize_rtn
from modelpress.eval.quality import evaluate_quality
from modelpress.eval.reference import (
    ReferenceCache,
    compute_reference,
    model_fingerprint,
    reference_perplexity,
    score_against,
)


@pytest.fixture(scope="module")
def models():
    reference = build_tiny_llama()
    compressed = copy.deepcopy(reference)
    quantize_rtn(compressed, RTNConfig("int3/g32"))
    windows = torch.randint(0, 320, (3, 48), generator=torch.Generator().manual_seed(1))
    return reference, compressed, windows


@pytest.mark.parametrize("score", ["all", "second-half"])
def test_exact_reference_scores_as_evaluate_quality(models, score):
    reference, compressed, windows = models
    expected = evaluate_quality({"c": compressed, "r": reference}, windows, reference=reference, score=score)
    cached = compute_reference(reference, windows)
    got = score_against(compressed, cached, score)
    assert got.perplexity == pytest.approx(expected["c"].perplexity, rel=1e-6)
    assert got.kl_divergence == pytest.approx(expected["c"].kl_divergence, rel=1e-5)
    assert got.top1_agreement == expected["c"].top1_agreement
    assert got.scored_tokens == expected["c"].scored_tokens
    assert reference_perplexity(cached, score) == pytest.approx(expected["r"].perplexity, rel=1e-6)
    assert score_against(reference, cached, score).kl_divergence == pytest.approx(0.0, abs=1e-6)


def test_top_k_kl_is_a_lower_bound_that_grows_to_the_exact_kl(models):
    reference, compressed, windows = models
    exact = score_against(compressed, compute_reference(reference, windows)).kl_divergence
    bounds = [score_against(compressed, compute_reference(reference, windows, k)).kl_divergence
              for k in (4, 64, 256, 320)]
    assert all(a <= b + 1e-7 for a, b in zip(bounds, bounds[1:]))   # merging fewer outcomes never lowers a KL
    assert bounds[-2] <= exact + 1e-7 and bounds[0] > 0
    assert bounds[-1] == pytest.approx(exact, rel=1e-5)              # k = V is exact


def test_a_prefix_is_the_reference_of_shorter_windows(models):
    reference, _, windows = models
    full = compute_reference(reference, windows, 16)
    short = compute_reference(reference, windows[:2, :20], 16)
    cut = full.prefix(2, 20)
    assert torch.equal(cut.windows, short.windows) and torch.equal(cut.indices, short.indices)
    torch.testing.assert_close(cut.logprobs, short.logprobs, rtol=1e-5, atol=1e-5)


def test_the_cache_runs_the_reference_once_per_model_and_windows(models, tmp_path):
    reference, compressed, windows = models
    calls = []
    handle = reference.register_forward_hook(lambda *args: calls.append(1))
    try:
        fingerprint = model_fingerprint(reference)
        cache = ReferenceCache(tmp_path)
        first = cache.get(reference, fingerprint, windows, 8)
        assert cache.get(reference, fingerprint, windows, 8) is first and len(calls) == windows.shape[0]
        again = ReferenceCache(tmp_path).get(reference, fingerprint, windows, 8)      # from disk, no forward
        assert len(calls) == windows.shape[0] and torch.equal(again.logprobs, first.logprobs)
        ReferenceCache(tmp_path).get(reference, fingerprint, windows[:1], 8)           # other windows: computed
        assert len(calls) == windows.shape[0] + 1
    finally:
        handle.remove()
    assert model_fingerprint(compressed) != fingerprint
