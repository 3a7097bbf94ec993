"""A budget (size, bits or KL) turned into one scheme per layer, from per-layer scores and stored bits.

Size budgets are the mixed-precision knapsack itself (algorithms/quantize/mixed.py: least estimated KL under
a bit budget): `--max-bits B` is its target directly, `--max-gb X` becomes the bits left for the quantized
layers once the float rest of the model (embeddings, norms, the output head) is paid for.

A KL budget is the dual problem, fewest bits whose estimated KL stays under the bound. The estimated KL of
the knapsack's answer falls as its bit budget grows, so the smallest budget that meets the bound is found
by bisection over the bit target, and the answer is the knapsack's choice at that target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from modelpress.algorithms.quantize.mixed import MixedChoice, choose_schemes
from modelpress.errors import ModelpressError

BISECTION_STEPS = 30


@dataclass(frozen=True)
class Budget:
    """Exactly one of: `max_gb` (all weight bytes of the result, 10^9 bytes per GB), `max_bits` (average stored
    bits per quantized weight, scales included), `max_kl` (estimated KL divergence from the float model,
    nats per token)."""

    max_gb: float | None = None
    max_bits: float | None = None
    max_kl: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in asdict(self).items() if v is not None}
        if len(given) != 1:
            raise ModelpressError(f"give exactly one budget: --max-gb, --max-bits or --max-kl (got {given or 'none'})")
        (key, value), = given.items()
        if not isinstance(value, (int, float)) or not value > 0:
            raise ModelpressError(f"--{key.replace('_', '-')} must be a positive number, got {value!r}")

    def describe(self) -> str:
        (key, value), = ((k, v) for k, v in asdict(self).items() if v is not None)
        return f"{key.replace('_', '-')} {value}"


@dataclass(frozen=True)
class LayerCosts:
    scores: dict[str, dict[str, float]]      # layer -> scheme spec -> estimated KL (nats/token)
    bits: dict[str, dict[str, int]]          # layer -> scheme spec -> stored bits
    parameters: dict[str, int]               # layer -> weights
    rest_bytes: int                          # bytes of everything that stays float

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    def bits_range(self) -> tuple[float, float]:
        """The smallest and largest average bits per weight any mix of the candidates reaches."""
        low = sum(min(b.values()) for b in self.bits.values()) / self.total_parameters
        high = sum(max(b.values()) for b in self.bits.values()) / self.total_parameters
        return low, high


def solve(budget: Budget, costs: LayerCosts) -> MixedChoice:
    if budget.max_bits is not None:
        return choose_schemes(costs.scores, costs.bits, costs.parameters, budget.max_bits)
    low, high = costs.bits_range()
    if budget.max_gb is not None:
        left = budget.max_gb * 1e9 - costs.rest_bytes
        target = 8 * left / costs.total_parameters
        if target < low:
            smallest = (costs.rest_bytes + low * costs.total_parameters / 8) / 1e9
            raise ModelpressError(f"--max-gb {budget.max_gb} is below the smallest mix of this runtime's formats "
                                  f"({smallest:.4f} GB, {costs.rest_bytes / 1e9:.4f} GB of it float layers)")
        return choose_schemes(costs.scores, costs.bits, costs.parameters, min(target, high))
    return _least_bits_under_kl(budget.max_kl, costs, low, high)


def _least_bits_under_kl(max_kl: float, costs: LayerCosts, low: float, high: float) -> MixedChoice:
    def choice(target: float) -> MixedChoice:
        return choose_schemes(costs.scores, costs.bits, costs.parameters, target)

    best = choice(high)
    if best.estimated_kl > max_kl:
        raise ModelpressError(f"--max-kl {max_kl}: even the widest formats of this runtime are estimated at KL "
                              f"{best.estimated_kl:.4f}; raise the bound or choose a runtime with wider formats")
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        found = choice(mid)
        if found.estimated_kl <= max_kl:
            high, best = mid, found
        else:
            low = mid
    return best
