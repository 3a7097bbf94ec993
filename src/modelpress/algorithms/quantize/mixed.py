"""Mixed precision: choose one scheme per layer to meet an average bits-per-weight budget at least loss.

Inputs are per-layer scores (estimated KL contribution of quantizing that layer alone under each scheme,
eval/sensitivity.py) and the true stored bits of each choice. Treating the losses as additive, the choice
is a multiple-choice knapsack:

    minimise Σ_l score[l][s_l]   subject to   Σ_l bits[l][s_l] <= target_bits · Σ_l parameters_l.

It is solved by Lagrangian relaxation (each layer independently minimises score + λ·bits; λ found by
bisection, so the solution lies on the lower convex hull of every layer's trade-off) followed by a greedy
pass that spends what budget is left on the upgrades with the best loss saved per extra bit. Budgets
count the quantized layers only (scales and offsets included), like `bits_per_weight` in reports.

The chosen map (full layer name -> WeightScheme) goes to the quantizers as their config's `schemes`
override; `layer_scheme` below is the one rule they all resolve a layer's scheme by.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme


@dataclass(frozen=True)
class MixedChoice:
    schemes: dict[str, str]          # layer -> scheme spec
    bits_per_weight: float           # achieved, over the layers chosen for
    estimated_kl: float              # Σ of the chosen layers' scores
    target_bits: float


def _pick(scores: dict[str, float], bits: dict[str, int], lam: float) -> str:
    return min(scores, key=lambda spec: (scores[spec] + lam * bits[spec], bits[spec]))


def choose_schemes(scores: dict[str, dict[str, float]], bits: dict[str, dict[str, int]],
                   parameters: dict[str, int], target_bits: float) -> MixedChoice:
    layers = list(scores)
    if not layers:
        raise ModelpressError("no layers to choose formats for")
    total_params = sum(parameters[layer] for layer in layers)
    budget = target_bits * total_params
    smallest = sum(min(bits[layer].values()) for layer in layers)
    if smallest > budget:
        raise ModelpressError(
            f"--target-bits {target_bits} is below the smallest candidate mix "
            f"({smallest / total_params:.3f} bits/weight); add narrower formats or raise the target")

    def total_bits(choice: dict[str, str]) -> int:
        return sum(bits[layer][choice[layer]] for layer in layers)

    low, high = 0.0, 1.0
    while total_bits({l: _pick(scores[l], bits[l], high) for l in layers}) > budget:
        high *= 4
        if high > 1e30:
            break
    for _ in range(100):
        mid = (low + high) / 2
        if total_bits({l: _pick(scores[l], bits[l], mid) for l in layers}) > budget:
            low = mid
        else:
            high = mid
    choice = {l: _pick(scores[l], bits[l], high) for l in layers}
    choice = _spend_leftover(choice, scores, bits, budget - total_bits(choice))
    used = total_bits(choice)
    return MixedChoice(
        schemes=choice,
        bits_per_weight=used / total_params,
        estimated_kl=sum(scores[l][choice[l]] for l in layers),
        target_bits=target_bits,
    )


def _spend_leftover(choice: dict[str, str], scores, bits, leftover: float) -> dict[str, str]:
    """Greedy upgrades, best loss saved per extra bit first, while they fit in the budget."""
    choice = dict(choice)
    while True:
        best = None
        for layer, current in choice.items():
            for spec, score in scores[layer].items():
                extra = bits[layer][spec] - bits[layer][current]
                saved = scores[layer][current] - score
                if extra <= 0 or saved <= 0 or extra > leftover:
                    continue
                if best is None or saved / extra > best[0]:
                    best = (saved / extra, layer, spec, extra)
        if best is None:
            return choice
        _, layer, spec, extra = best
        choice[layer] = spec
        leftover -= extra


def check_layer_schemes(schemes: Mapping[str, WeightScheme] | None) -> None:
    """A per-layer scheme override maps full layer names to WeightSchemes."""
    for name, scheme in (schemes or {}).items():
        if not isinstance(scheme, WeightScheme):
            raise ModelpressError(f"the scheme for layer {name!r} must be a WeightScheme, got {scheme!r}")


def layer_scheme(default: WeightScheme, schemes: Mapping[str, WeightScheme] | None, name: str) -> WeightScheme:
    """The scheme of layer `name` (its full name in the model): its override, else the default."""
    return default if schemes is None else schemes.get(name, default)
