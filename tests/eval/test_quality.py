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
