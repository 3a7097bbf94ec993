"""Mixed precision, the plumbing: candidate ladder -> per-layer sensitivity -> knapsack -> per-layer scheme map,
and the report of what was really stored.

    plan_mixed(model, config, windows)   scores every layer under every candidate (eval/sensitivity.py),
                                         counts each candidate's stored bits as the method will store them,
                                         and picks one scheme per layer for the budget (mixed.py)
    quantize_mixed(model, config, ids)   plans, then runs the ordinary quantizer `config.method` (any
                                         registered method with `per_layer`) with the map as its per-layer
                                         override: one code path, no second engine
    mixed_report(model, plan)            per layer and in total, from the packed layers actually installed;
                                         refuses a result above the budget

Scores come from round-to-nearest deltas whatever the method. GPTQ/AWQ then lower each chosen layer's
error further, so the estimate is an upper bound of sorts; scoring each candidate with the method's own
delta would need a GPTQ solve per layer and candidate (the whole ladder quantized by GPTQ), several times
the cost of the quantization itself, for a choice that mostly ranks layers the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.algorithms.quantize.mixed import MixedChoice, choose_schemes
from modelpress.errors import ModelpressError
from modelpress.eval.sensitivity import LayerCandidates, fisher_sensitivity, rtn_candidates
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import DEFAULT_SKIP
from modelpress.nn.quant_linear import QuantLinear

# A ladder across formats, cheapest first, kept to the schemes that were on some layer's trade-off hull on
# SmolLM2-135M (Fisher scores, 2 windows): 3-bit grids, NF4 (which beat int4 and fp4 at every grouping;
# double-quantized scales cost nothing in KL), asymmetric int4 in groups of 64, and int8 per channel for
# the layers that need it. int4-asym/g32 is left out on purpose: it reproduces that model's Q4_1 GGUF
# weights exactly, which would flatter any measurement on it.
DEFAULT_CANDIDATES = ("int3/g128", "int3-asym/g64", "nf4/g128", "nf4/g64/dq", "int4-asym/g64", "nf4/g32",
                      "int8/channel")


def parse_candidates(specs: list[str | WeightScheme] | tuple[str | WeightScheme, ...]) -> tuple[WeightScheme, ...]:
    """Scheme specs (or schemes) -> schemes, with errors naming the bad spec; duplicates are an error."""
    if not specs:
        raise ModelpressError("mixed precision needs at least one candidate scheme, e.g. int4/g128 int8/channel")
    schemes = []
    for spec in specs:
        try:
            scheme = spec if isinstance(spec, WeightScheme) else WeightScheme.parse(spec)
        except ModelpressError as err:
            raise ModelpressError(f"bad candidate scheme {spec!r}: {err}") from err
        if scheme in schemes:
            raise ModelpressError(f"candidate scheme {scheme.spec!r} is given twice")
        schemes.append(scheme)
    return tuple(schemes)


@dataclass(frozen=True)
class MixedConfig:
    target_bits: float                         # average stored bits per quantized weight, scales included
    candidates: tuple[WeightScheme | str, ...] = DEFAULT_CANDIDATES   # schemes or their specs, cheapest first
    method: str = "rtn"                        # the quantizer that applies the chosen map (a registered name)
    sensitivity_samples: int = 8               # the first calibration windows, for the Fisher scores
    sensitivity_batch_size: int = 2            # windows per forward/backward
    sensitivity_positions: int | None = 128    # token positions per window where ΔY is formed (None: all)
    static_groups: bool = True                 # gptq, awq-gptq: GPTQ's group layout (GPTQConfig.static_groups)
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        from modelpress.algorithms.quantize.registry import join_names, methods_accepting, per_layer_methods

        if not self.target_bits > 0:
            raise ModelpressError(f"--target-bits must be a positive number of bits per weight, got {self.target_bits}")
        if not isinstance(self.candidates, (tuple, list)) or not all(isinstance(s, (WeightScheme, str))
                                                                     for s in self.candidates):
            raise ModelpressError("mixed precision candidates must be a non-empty tuple of WeightSchemes or specs")
        object.__setattr__(self, "candidates", parse_candidates(self.candidates))
        if self.method not in per_layer_methods():
            raise ModelpressError(f"mixed precision works with methods {join_names(per_layer_methods())}, "
                                  f"got {self.method!r}")
        if not self.static_groups and self.method not in methods_accepting(static_groups=False):
            raise ModelpressError(f"static_groups=False picks GPTQ's group layout; it applies to methods "
                                  f"{join_names(methods_accepting(static_groups=False))}, not {self.method!r}")
        if self.sensitivity_samples <= 0 or self.sensitivity_batch_size <= 0 or (self.sensitivity_positions or 1) <= 0:
            raise ModelpressError(f"sensitivity samples, batch size and positions must be positive, got "
                                  f"{self.sensitivity_samples}, {self.sensitivity_batch_size}, {self.sensitivity_positions}")

    def method_config(self, scheme: WeightScheme, schemes: dict[str, WeightScheme]) -> object:
        """The config of `method` that applies a per-layer map (`scheme` for layers outside it)."""
        from modelpress.algorithms.quantize.registry import config_for_method

        layout = {} if self.static_groups else {"static_groups": False}
        return config_for_method(self.method, scheme, skip=self.skip, schemes=schemes, **layout)


def method_bits(candidate: LayerCandidates, scheme: WeightScheme, permuted: bool = False) -> int:
    """Stored bits of one layer under `scheme` as the method stores it: the RTN packing, plus GPTQ's int32
    column permutation for grouped schemes in the permuted layout (`permuted`: act order without static groups)."""
    bits = candidate.bits[scheme.spec]
    if permuted and scheme.granularity == "group":
        in_features = candidate.packed[scheme.spec].shape[1]
        bits += 32 * in_features
    return bits


@dataclass(frozen=True)
class MixedPlan:
    choice: MixedChoice
    candidates: tuple[WeightScheme, ...]
    scores: dict[str, dict[str, float]]        # layer -> spec -> estimated KL (nats/token)
    bits: dict[str, dict[str, int]]            # layer -> spec -> stored bits under the method
    parameters: dict[str, int]
    sensitivity_seconds: float
    windows: int
    positions: int | None

    def schemes(self) -> dict[str, WeightScheme]:
        by_spec = {s.spec: s for s in self.candidates}
        return {layer: by_spec[spec] for layer, spec in self.choice.schemes.items()}

    def most_common(self) -> WeightScheme:
        spec = Counter(self.choice.schemes.values()).most_common(1)[0][0]
        return next(s for s in self.candidates if s.spec == spec)


def plan_mixed(model: nn.Module, config: MixedConfig, windows: torch.Tensor) -> MixedPlan:
    """Score every layer under every candidate on `windows` (n, seq_len) and choose the per-layer map."""
    start = time.perf_counter()
    candidates = rtn_candidates(model, list(config.candidates), config.skip)
    if not candidates:
        raise ModelpressError(f"no linear layers to quantize (skip patterns: {list(config.skip)})")
    scores = fisher_sensitivity(model, candidates, windows, batch_size=config.sensitivity_batch_size,
                                positions=config.sensitivity_positions)
    bits = {c.name: {s.spec: method_bits(c, s, not config.static_groups) for s in config.candidates}
            for c in candidates}
    parameters = {c.name: c.parameters for c in candidates}
    del candidates
    choice = choose_schemes(scores, bits, parameters, config.target_bits)
    return MixedPlan(choice, config.candidates, scores, bits, parameters, time.perf_counter() - start,
                     int(windows.shape[0]), config.sensitivity_positions)


def mixed_report(model: nn.Module, plan: MixedPlan) -> dict:
    """Per layer: planned scheme, the scheme and bits really stored, estimated KL; totals from packed bytes.
    Raises if the stored average exceeds the target (it must not: bits were counted as the method stores)."""
    modules = dict(model.named_modules())
    layers = {}
    for name, spec in plan.choice.schemes.items():
        module = modules.get(name)
        if not isinstance(module, QuantLinear):
            raise ModelpressError(f"layer {name} was planned as {spec} but is not quantized after the run")
        stored = 8 * module.weight_nbytes
        layers[name] = {"scheme": module.scheme.spec, "bits": stored,
                        "bits_per_weight": round(stored / plan.parameters[name], 4),
                        "estimated_kl": plan.scores[name][spec]}
    achieved = sum(v["bits"] for v in layers.values()) / sum(plan.parameters.values())
    size = measure_size(model)
    if achieved > plan.choice.target_bits + 1e-9:
        raise ModelpressError(f"mixed precision stored {achieved:.4f} bits/weight, above the target "
                              f"{plan.choice.target_bits}; this is a bug in how candidate bits are counted")
    return {
        "target_bits": plan.choice.target_bits,
        "achieved_bits_per_weight": achieved,
        "planned_bits_per_weight": plan.choice.bits_per_weight,
        "model_bits_per_weight": size.bits_per_weight,
        "estimated_kl": plan.choice.estimated_kl,
        "candidates": [s.spec for s in plan.candidates],
        "scheme_counts": dict(Counter(v["scheme"] for v in layers.values()).most_common()),
        "sensitivity": {"windows": plan.windows, "positions_per_window": plan.positions,
                        "seconds": round(plan.sensitivity_seconds, 3), "estimate": "fisher, round-to-nearest deltas"},
        "uniform_estimated_kl": {s.spec: sum(plan.scores[l][s.spec] for l in plan.scores) for s in plan.candidates},
        "uniform_bits_per_weight": {s.spec: sum(plan.bits[l][s.spec] for l in plan.bits) / sum(plan.parameters.values())
                                    for s in plan.candidates},
        "layers": layers,
    }


def quantize_mixed(model: nn.Module, config: MixedConfig, calibration_ids: torch.Tensor,
                   device: str | torch.device = "cpu", resume_dir: str | None = None, batch_size: int = 8):
    """Plan on the first `sensitivity_samples` calibration windows, then quantize with `config.method` and the
    chosen map (in place). Returns the method's QuantizeRun with scheme "mixed" and the map's report."""
    from modelpress.algorithms.quantize.registry import QuantizeRun, quantizer_for

    plan = plan_mixed(model, config, calibration_ids[: config.sensitivity_samples])
    method = config.method_config(plan.most_common(), plan.schemes())
    quantizer = quantizer_for(method)
    run = quantizer.run(model, method, calibration_ids if quantizer.calibrated else None, device, resume_dir,
                        batch_size)
    return QuantizeRun(run.layers, "mixed", {**run.details, "mixed": mixed_report(model, plan)}, config.method)
