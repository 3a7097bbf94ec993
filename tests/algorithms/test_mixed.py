import itertools

import pytest
import torch
from conftest import build_tiny_llama

from modelpress.algorithms.quantize.mixed import choose_schemes
from modelpress.errors import ModelpressError
from modelpress.eval.sensitivity import fisher_sensitivity, measured_layer_kl, rtn_candidates
from modelpress.formats.scheme import WeightScheme


def random_instance(seed, layers=6):
    gen = torch.Generator().manual_seed(seed)
    specs = ["a", "b", "c"]
    params = {f"l{i}": int(torch.randint(100, 1000, (1,), generator=gen)) for i in range(layers)}
    bits = {l: {"a": 2 * p, "b": 4 * p, "c": 8 * p} for l, p in params.items()}
    scores = {}
    for l in params:
        base = float(torch.rand(1, generator=gen)) * 10
        scores[l] = {"a": base * 16, "b": base, "c": base / 16}
    return specs, params, bits, scores


def brute_force(specs, params, bits, scores, target):
    layers, budget = list(params), target * sum(params.values())
    best = None
    for combo in itertools.product(specs, repeat=len(layers)):
        used = sum(bits[l][s] for l, s in zip(layers, combo))
        loss = sum(scores[l][s] for l, s in zip(layers, combo))
        if used <= budget and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [3.0, 4.5, 6.0])
def test_choice_meets_budget_and_is_near_the_exact_optimum(seed, target):
    specs, params, bits, scores = random_instance(seed)
    choice = choose_schemes(scores, bits, params, target)
    assert choice.bits_per_weight <= target + 1e-9
    optimum = brute_force(specs, params, bits, scores, target)
    assert choice.estimated_kl <= optimum * 1.25 + 1e-9
    uniform_b = sum(scores[l]["b"] for l in params)   # 4 bits/weight uniform: feasible at 4.5 and 6
    if target >= 4:
        assert choice.estimated_kl <= uniform_b


def test_impossible_budget_is_a_clear_error():
    _specs, params, bits, scores = random_instance(0)
    with pytest.raises(ModelpressError, match="below the smallest candidate mix"):
        choose_schemes(scores, bits, params, 1.0)


def test_fisher_estimate_tracks_the_measured_kl_of_each_layer():
    model = build_tiny_llama()
    schemes = [WeightScheme.parse("int2-asym/g32"), WeightScheme.parse("int4/g32")]
    candidates = rtn_candidates(model, schemes)
    windows = torch.randint(0, 320, (4, 48), generator=torch.Generator().manual_seed(0))
    scores = fisher_sensitivity(model, candidates, windows, samples_per_window=2)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
    measured = [measured_layer_kl(model, n, schemes[0], windows) for n in names]
    estimated = [scores[n]["int2-asym/g32"] for n in names]
    for est, real in zip(estimated, measured):
        assert 0.3 < est / real < 3.0
    # the ranking across layers is what the knapsack needs: v_proj > up_proj > q_proj here
    assert sorted(range(3), key=lambda i: estimated[i]) == sorted(range(3), key=lambda i: measured[i])
    # a narrower format always scores worse for the same layer
    assert all(scores[n]["int2-asym/g32"] > scores[n]["int4/g32"] for n in scores)


def test_fisher_on_a_subset_of_positions_estimates_the_full_score():
    model = build_tiny_llama()
    schemes = [WeightScheme.parse("int2-asym/g32")]
    candidates = rtn_candidates(model, schemes)
    windows = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(1))
    full = fisher_sensitivity(model, candidates, windows, batch_size=4)
    part = fisher_sensitivity(model, candidates, windows, batch_size=4, positions=24)
    names = sorted(full, key=lambda n: full[n]["int2-asym/g32"])
    for name in names:
        assert 0.5 < part[name]["int2-asym/g32"] / full[name]["int2-asym/g32"] < 2.0
    # the most and least sensitive layers stay apart
    assert part[names[-1]]["int2-asym/g32"] > 2 * part[names[0]]["int2-asym/g32"]
    with pytest.raises(ModelpressError, match="positions per window must be positive"):
        fisher_sensitivity(model, candidates, windows, positions=0)
