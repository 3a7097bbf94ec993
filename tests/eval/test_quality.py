import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama

from modelpress.errors import ModelpressError
from modelpress.eval.quality import evaluate_quality
from modelpress.eval.size import measure_size


def test_perplexity_kl_and_agreement_match_a_direct_computation():
    model, other = build_tiny_llama(0), build_tiny_llama(1)
    windows = torch.randint(0, 320, (3, 24))
    result = evaluate_quality({"m": other, "ref": model}, windows, reference=model)
    with torch.no_grad():
        ref = F.log_softmax(model(windows).logits[:, :-1].double(), -1)
        got = F.log_softmax(other(windows).logits[:, :-1].double(), -1)
    nll = -got.gather(-1, windows[:, 1:, None]).mean()
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    agree = (ref.argmax(-1) == got.argmax(-1)).double().mean()
    assert result["m"].perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert result["m"].kl_divergence == pytest.approx(float(kl), rel=1e-3)
    assert result["m"].top1_agreement == pytest.approx(float(agree))
    assert result["ref"].kl_divergence == 0 and result["ref"].top1_agreement == 1
    assert result["m"].scored_tokens == 3 * 23


def test_empty_windows_are_refused():
    with pytest.raises(ModelpressError):
        evaluate_quality({"m": build_tiny_llama()}, torch.zeros(0, 8, dtype=torch.long))


def test_size_counts_tied_weights_once():
    model = build_tiny_llama()
    size = measure_size(model)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    assert size.weight_bytes == sum(unique.values())
    assert size.bits_per_weight is None


@pytest.mark.parametrize("seq_len", [24, 25])
def test_second_half_scoring_matches_llama_cpp_positions(seq_len):
    """llama.cpp scores predictions j = T//2 .. T-2 of each window (tokens T//2+1 .. T-1)."""
    model, other = build_tiny_llama(0), build_tiny_llama(1)
    windows = torch.randint(0, 320, (3, seq_len), generator=torch.Generator().manual_seed(2))
    result = evaluate_quality({"m": other}, windows, reference=model, score="second-half")["m"]
    first = seq_len // 2
    nll, kl, count = 0.0, 0.0, 0
    with torch.no_grad():
        ref = F.log_softmax(model(windows).logits.double(), -1)
        got = F.log_softmax(other(windows).logits.double(), -1)
    for w in range(3):
        for j in range(first, seq_len - 1):
            nll -= float(got[w, j, windows[w, j + 1]])
            kl += float((ref[w, j].exp() * (ref[w, j] - got[w, j])).sum())
            count += 1
    assert result.scored_tokens == count == 3 * (seq_len - 1 - first)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result.kl_divergence == pytest.approx(kl / count, rel=1e-3)


def test_unknown_scoring_is_refused():
    with pytest.raises(ModelpressError, match="second-half"):
        evaluate_quality({"m": build_tiny_llama()}, torch.zeros(1, 8, dtype=torch.long), score="half")
