"""Distillation losses against their textbook formulas, written out directly in float64."""

import math

import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.train.losses import (
    IGNORE_INDEX,
    divergence,
    hard_loss,
    mixed_loss,
    soft_loss,
    topk_soft_loss,
    topk_targets,
)


def probs(logits, t):
    return torch.softmax(logits.double() / t, dim=-1)


def direct_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 50, generator=g) * 3, torch.randn(12, 50, generator=g) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_and_reverse_kl_match_formula_with_t_squared(logits, temperature):
    student, teacher = logits
    p_t, p_s = probs(teacher, temperature), probs(student, temperature)
    fkl = soft_loss(student, teacher, temperature, "fkl")
    rkl = soft_loss(student, teacher, temperature, "rkl")
    assert fkl.item() == pytest.approx(temperature**2 * direct_kl(p_t, p_s).mean().item(), rel=1e-5)
    assert rkl.item() == pytest.approx(temperature**2 * direct_kl(p_s, p_t).mean().item(), rel=1e-5)
    assert fkl.item() != pytest.approx(rkl.item(), rel=1e-3)


def test_generalized_jsd_matches_formula_is_symmetric_and_bounded(logits):
    student, teacher = logits
    p_t, p_s = probs(teacher, 1.0), probs(student, 1.0)
    for beta in (0.1, 0.5, 0.9):
        m = beta * p_t + (1 - beta) * p_s
        expected = (beta * direct_kl(p_t, m) + (1 - beta) * direct_kl(p_s, m)).mean().item()
        assert soft_loss(student, teacher, 1.0, "jsd", beta).item() == pytest.approx(expected, rel=1e-5)
    half = soft_loss(student, teacher, 1.0, "jsd", 0.5).item()
    assert soft_loss(teacher, student, 1.0, "jsd", 0.5).item() == pytest.approx(half, rel=1e-5)
    assert 0 < half < math.log(2)
    # nearly disjoint distributions approach the bound: the binary entropy of beta
    sharp_t = torch.full((1, 4), -1e4)
    sharp_t[0, 0] = 0
    sharp_s = torch.full((1, 4), -1e4)
    sharp_s[0, 1] = 0
    for beta in (0.2, 0.5):
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert soft_loss(sharp_s, sharp_t, 1.0, "jsd", beta).item() == pytest.approx(bound, rel=1e-4)
    assert soft_loss(student, student, 3.0, "jsd").item() == pytest.approx(0.0, abs=1e-6)


def test_topk_equals_full_when_k_is_the_vocabulary(logits):
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    for kind in ("fkl", "rkl", "jsd"):
        full = soft_loss(student, teacher, 2.0, kind)
        (g_full,) = torch.autograd.grad(full, student)
        top = topk_soft_loss(student, topk_targets(teacher, 50, 2.0), 2.0, kind)
        (g_top,) = torch.autograd.grad(top, student)
        assert top.item() == pytest.approx(full.item(), rel=1e-5)
        torch.testing.assert_close(g_top, g_full, rtol=1e-4, atol=1e-7)


def test_topk_bucketed_divergence_never_exceeds_full_and_keeps_exact_tail(logits):
    student, teacher = logits
    full = soft_loss(student, teacher, 1.0, "fkl").item()
    previous = 0.0
    for k in (1, 5, 20, 49):
        targets = topk_targets(teacher, k, 1.0)
        # top-k probabilities plus the tail make a whole distribution
        total = targets.logprobs.exp().sum(-1) + targets.tail.exp()
        torch.testing.assert_close(total, torch.ones(12), rtol=1e-5, atol=1e-6)
        value = topk_soft_loss(student, targets, 1.0, "fkl").item()
        assert 0 < value <= full + 1e-6
        assert value >= previous - 1e-6   # finer buckets see more of the difference
        previous = value


def test_mask_and_hard_labels():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    mask = torch.tensor([True, True, False, True, False, True])
    masked = soft_loss(student, teacher, 1.0, "fkl", mask=mask)
    assert masked.item() == pytest.approx(soft_loss(student[mask], teacher[mask], 1.0, "fkl").item(), rel=1e-6)
    labels = torch.tensor([1, 2, IGNORE_INDEX, 3, IGNORE_INDEX, 4])
    expected = torch.nn.functional.cross_entropy(student[mask], labels[mask])
    assert hard_loss(student, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    soft, hard = torch.tensor(2.0), torch.tensor(5.0)
    assert mixed_loss(soft, hard, 0.25).item() == pytest.approx(0.25 * 5 + 0.75 * 2)
    assert mixed_loss(soft, None, 0.0).item() == 2.0
    assert mixed_loss(None, hard, 1.0).item() == 5.0


def test_divergence_of_identical_rows_is_zero():
    logp = torch.log_softmax(torch.randn(3, 7), -1)
    for kind in ("fkl", "rkl", "jsd"):
        assert divergence(logp, logp, kind).abs().max().item() < 1e-6


@pytest.mark.parametrize("call, message", [
    (lambda s, t: soft_loss(s, t, 1.0, "kl"), "unknown distillation loss"),
    (lambda s, t: soft_loss(s, t, 1.0, "jsd", beta=1.0), "strictly between 0 and 1"),
    (lambda s, t: soft_loss(s, t, 0.0), "temperature"),
    (lambda s, t: soft_loss(s, t[:, :5]), "differ in shape"),
    (lambda s, t: topk_targets(t, 11), "top-k"),
    (lambda s, t: mixed_loss(None, torch.tensor(1.0), 0.5), "needs soft targets"),
    (lambda s, t: mixed_loss(torch.tensor(1.0), None, 1.5), "alpha"),
])
def test_bad_settings_fail_clearly(call, message):
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    with pytest.raises(ModelpressError, match=message):
        call(s, t)
