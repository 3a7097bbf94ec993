"""Greedy picks and draws (inference/sampling.py): the CPU's float32 shortcut through numpy gives torch's argmax; the
CPU's inverse-CDF draw follows the distribution."""

from __future__ import annotations

import pytest
import torch

from modelpress.inference.sampling import SamplingConfig, pick


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_greedy_pick_is_torch_argmax_ties_and_nans_included(dtype):
    """The first maximum wins a tie, and a NaN counts as the maximum (its first occurrence), as torch.argmax has
    it; on rows of a batch (views) too."""
    greedy = SamplingConfig(temperature=0.0)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 49152, generator=generator).to(dtype)
    logits[1, [7, 9000, 40000]] = 50.0            # a three-way tie
    logits[2, [123, 30000]] = float("nan")         # NaNs
    for row in logits:
        assert pick(row, greedy) == int(row.argmax())
    assert pick(logits[1], greedy) == 7
    assert pick(logits[2], greedy) == 123


def test_cpu_draws_follow_the_distribution_and_never_a_zero():
    """The CPU's inverse-CDF draw: frequencies within sampling error of the (unnormalized) probabilities, tokens of
    probability 0 never drawn (leading, inner and trailing zeros), rows independent; no mass is an error."""
    from modelpress.inference.sampling import sample

    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    draws = sample(weights.repeat(50_000, 1).view(50_000, 2, 6), torch.Generator().manual_seed(0))  # (50000, 2)
    counts = torch.bincount(draws[:, 0], minlength=6).double()
    expected = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0], dtype=torch.float64) * 50_000
    assert counts[expected == 0].sum() == 0
    assert torch.all((counts - expected).abs() <= 5 * (expected * (1 - expected / 50_000)).sqrt())  # 5 sigma
    assert torch.all(draws[:, 1] == 5)
    for bad in (torch.zeros(4), torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match="positive, finite probability mass"):
            sample(bad)
