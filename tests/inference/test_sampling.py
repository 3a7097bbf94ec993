"""Greedy picks (inference/sampling.py): the CPU's float32 shortcut through numpy gives torch's argmax."""

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
