"""The planner: from measured per-layer sensitivity, a method and one scheme per layer that meet a budget on a
runtime, with a forecast of the run (bytes, KL, seconds, peak memory) before anything heavy runs.

    plan = modelpress.plan(model, Budget(max_gb=0.1), runtime="llamacpp")    # docs/planner.md
    print(plan.forecast)                       # exact bytes, estimated KL, seconds and peak memory here
    modelpress.planner.apply_plan(model, plan) # runs it: the method's config with the per-layer map
    plan.write_recipe("plan.yaml")             # or as a recipe for `modelpress compress`

The measuring is mixed precision's (eval/sensitivity.py: every layer packed under every candidate by
round-to-nearest, Fisher-weighted output change on a few calibration windows); the choice is its knapsack
(planner/budget.py); the runtime decides the candidates (planner/runtimes.py); the run is an ordinary
quantizer from the registry with the map as its per-layer `schemes`: no second engine.

The KL forecast is measured: the Fisher scores rank the choices, then the RTN mix (its candidates are already
packed in memory) is run against the float model on the sensitivity windows; a KL budget is held to that
measured KL (planner._solve_checked).

How the method is picked: RTN, whose KL the check measures, unless a `max_kl` bound cannot be met by RTN
with the runtime's formats; then GPTQ, whose per-layer error is lower than RTN's (its forecast KL is then the
RTN mix's, an upper bound). `method=` names one instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modelpress.errors import ModelpressError
from modelpress.planner import forecast as fc
from modelpress.planner.budget import Budget, LayerCosts, solve
from modelpress.planner.runtimes import RUNTIMES, Runtime, runtime

__all__ = ["RUNTIMES", "Budget", "Plan", "apply_plan", "plan_model"]

SENSITIVITY_WINDOWS = 8       # calibration windows scored (MixedConfig.sensitivity_samples' default)
SENSITIVITY_POSITIONS = 128   # token positions per window where the output change is formed
SENSITIVITY_BATCH = 2
KL_CHECK_ROUNDS = 3           # re-solves of a KL budget against the measured KL


@dataclass(frozen=True)
class Plan:
    model: str                        # where the model came from
    runtime: str
    method: str                       # a registered per-layer quantization method (rtn, gptq, ...)
    budget: dict                      # the Budget's fields
    skip: tuple[str, ...]
    schemes: dict[str, str]           # layer -> scheme spec
    estimated_kl: dict[str, float]    # layer -> its score under its scheme
    forecast: fc.Forecast
    calibration: dict                 # text, samples, seq_len of the windows the method will calibrate on
    sensitivity: dict                 # windows, positions, seconds
    notes: list[str] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        """The most common scheme: the config's default for any layer outside the map."""
        specs = list(self.schemes.values())
        return max(sorted(set(specs)), key=specs.count)

    def config(self):
        """The quantizer config that runs this plan (the registry's config for `method`, with the map)."""
        from modelpress.algorithms.quantize import config_for_method
        from modelpress.formats.scheme import WeightScheme

        schemes = {name: WeightScheme.parse(spec) for name, spec in self.schemes.items()}
        return config_for_method(self.method, self.scheme, skip=self.skip, schemes=schemes)

    def to_json(self) -> dict:
        data = asdict(self)
        data["skip"] = list(self.skip)
        return data

    def write_recipe(self, path: str | Path) -> Path:
        from modelpress.planner.recipe import write_recipe

        return write_recipe(self, path)


def plan_model(model, budget: Budget, runtime_name: str = "modelpress", method: str = "auto",
               calibration=None, tokenizer=None) -> Plan:
    """Measure `model` (a LoadedModel or an HF model, in float) and plan its quantization for `budget` on
    `runtime_name` (modelpress, llamacpp, transformers). `calibration` as for modelpress.quantize: its first
    8 windows are scored; a calibrated method then runs on all of them (default: the embedded corpus)."""
    from modelpress.algorithms.quantize import per_layer_methods
    from modelpress.api import calibration_ids
    from modelpress.python_api import as_loaded

    target = runtime(runtime_name)
    if method != "auto" and method not in per_layer_methods():
        raise ModelpressError(f"the planner runs methods that take a per-layer map ({', '.join(per_layer_methods())}) "
                              f"or 'auto', got {method!r}")
    loaded = as_loaded(model, tokenizer)
    resident = fc.resident_bytes()
    ids, info = calibration_ids(loaded.tokenizer, calibration, loaded.model)
    costs, measured = measure(loaded.model, target, ids[:SENSITIVITY_WINDOWS], budget)
    notes = list(measured.pop("notes"))
    chosen_method = "rtn" if method == "auto" else method
    windows = ids[:SENSITIVITY_WINDOWS]
    try:
        choice, ratio, measured_kl = _solve_checked(loaded.model, budget, costs, measured, windows)
    except ModelpressError:
        if method != "auto" or budget.max_kl is None:
            raise
        choice, ratio, measured_kl = _solve_checked(loaded.model, Budget(max_bits=costs.bits_range()[1]), costs,
                                                    measured, windows)
        chosen_method = "gptq"
        notes.append(f"RTN misses --max-kl {budget.max_kl} even with the widest formats (KL {measured_kl:.4f} "
                     f"measured): GPTQ with them; its KL is below RTN's, by how much is not forecast")
    measured["kl_check"] = {"fisher_estimate": choice.estimated_kl, "measured_rtn": measured_kl, "ratio": ratio}
    forecast = _forecast(loaded.model, costs, choice.schemes, chosen_method, ids, measured, resident)
    return Plan(model=loaded.source, runtime=target.name, method=chosen_method, budget=asdict(budget),
                skip=measured["skip"], schemes=dict(choice.schemes),
                estimated_kl={name: costs.scores[name][spec] for name, spec in choice.schemes.items()},
                forecast=forecast, calibration=info,
                sensitivity={k: measured[k] for k in ("windows", "positions", "seconds", "kl_check")}, notes=notes)


def measure(model, target: Runtime, windows: torch.Tensor, budget: Budget) -> tuple[LayerCosts, dict]:
    """Per layer and candidate the runtime holds: estimated KL, stored bits; plus the timings a forecast needs.
    A size budget no mix can meet is refused before the sensitivity pass, the one costly step."""
    from modelpress.eval.sensitivity import LayerCandidates, fisher_sensitivity, rtn_candidates
    from modelpress.eval.size import measure_size
    from modelpress.formats.scheme import WeightScheme
    from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers

    modules = find_linear_layers(model, DEFAULT_SKIP)
    if not modules:
        raise ModelpressError("the model has no linear layers to quantize")
    per_scheme: dict[str, list[LayerCandidates]] = {}
    seconds: dict[str, float] = {}
    for spec in target.candidates:
        start = time.perf_counter()
        per_scheme[spec] = rtn_candidates(model, [WeightScheme.parse(spec)], DEFAULT_SKIP)
        seconds[spec] = time.perf_counter() - start
    candidates, notes = [], []
    for index, name in enumerate(modules):
        held = {spec: per_scheme[spec][index] for spec in target.candidates
                if target.holds(per_scheme[spec][index].packed[spec])}
        if not held:
            raise ModelpressError(f"layer {name}: none of {target.name}'s formats ({', '.join(target.candidates)}) "
                                  f"holds it exactly; plan it for --runtime modelpress")
        if len(held) < len(target.candidates):
            notes.append(f"{name}: {', '.join(s for s in target.candidates if s not in held)} not exact on "
                         f"{target.name}, left out")
        candidates.append(LayerCandidates(name, next(iter(held.values())).parameters,
                                          {s: c.packed[s] for s, c in held.items()},
                                          {s: c.bits[s] for s, c in held.items()}))
    del per_scheme
    rest = measure_size(model).weight_bytes - sum(fc.float_weight_bytes(m) for m in modules.values())
    bits = {c.name: dict(c.bits) for c in candidates}
    parameters = {c.name: c.parameters for c in candidates}
    if budget.max_kl is None:                 # feasibility does not depend on the scores
        solve(budget, LayerCosts({name: dict.fromkeys(b, 0.0) for name, b in bits.items()}, bits, parameters, rest))
    start = time.perf_counter()
    scores = fisher_sensitivity(model, candidates, windows, batch_size=SENSITIVITY_BATCH,
                                positions=SENSITIVITY_POSITIONS)
    packed_bytes = {c.name: {s: p.nbytes for s, p in c.packed.items()} for c in candidates}
    costs = LayerCosts(scores, bits, parameters, rest)
    return costs, {"rtn_seconds": seconds, "packed_bytes": packed_bytes, "modules": modules, "skip": DEFAULT_SKIP,
                   "candidates": {c.name: c for c in candidates},
                   "windows": int(windows.shape[0]), "positions": SENSITIVITY_POSITIONS,
                   "seconds": round(time.perf_counter() - start, 3), "notes": notes}


def _forecast(model, costs: LayerCosts, chosen: dict[str, str], method: str, ids: torch.Tensor, measured: dict,
              resident: int) -> fc.Forecast:
    from modelpress.algorithms.quantize import config_for_method
    from modelpress.engine.blocks import find_blocks

    modules = measured["modules"]
    packed = sum(measured["packed_bytes"][name][spec] for name, spec in chosen.items())
    largest = max(fc.float_weight_bytes(m) for m in modules.values())
    quantized_bits = sum(costs.bits[name][spec] for name, spec in chosen.items())
    if method == "rtn":
        seconds = fc.rtn_seconds(costs.parameters, chosen, measured["rtn_seconds"])
        peak = fc.peak_bytes(resident, packed, largest, None)
    else:
        per_window = fc.forward_seconds(model, ids[:SENSITIVITY_BATCH])
        seconds = fc.gptq_seconds(modules, chosen, int(ids.shape[0]), per_window,
                                  lambda spec: config_for_method(method, spec))
        stack = find_blocks(model)
        hessians = max(sum(4 * fc.linear_in(m) ** 2 for m in block.modules() if m in modules.values())
                       for block in stack.blocks)
        hidden = model.get_input_embeddings().weight.shape[1]
        peak = fc.peak_bytes(resident, packed, largest, (int(ids.shape[0]), int(ids.shape[1]), hidden), hessians)
    basis = f"RTN mix measured on the {measured['windows']} sensitivity windows"
    if method != "rtn":
        basis += f" (an upper bound for {method})"
    return fc.Forecast(weight_bytes=costs.rest_bytes + packed,
                       bits_per_weight=round(quantized_bits / costs.total_parameters, 6),
                       kl_divergence=measured["kl_check"]["measured_rtn"],
                       kl_basis=basis, seconds=round(seconds, 3), peak_memory_bytes=int(peak))


def _solve_checked(model, budget: Budget, costs: LayerCosts, measured: dict, windows: torch.Tensor):
    """The knapsack's choice, its real KL measured once (RTN, on the sensitivity windows) and the ratio of
    that KL to the Fisher estimate. A KL bound is met on the measured KL: the Fisher scores rank the choices,
    and the bound they are held to is divided by the measured ratio until the measured KL meets it."""
    choice = solve(budget, costs)
    kl = measured_mix_kl(model, measured, choice.schemes, windows)
    ratio = kl / choice.estimated_kl if choice.estimated_kl > 0 else 1.0
    for _ in range(KL_CHECK_ROUNDS if budget.max_kl is not None else 0):
        if kl <= budget.max_kl:
            break
        choice = solve(Budget(max_kl=budget.max_kl * choice.estimated_kl / kl), costs)
        kl = measured_mix_kl(model, measured, choice.schemes, windows)
        ratio = kl / choice.estimated_kl if choice.estimated_kl > 0 else ratio
    else:
        if budget.max_kl is not None and kl > budget.max_kl:
            raise ModelpressError(f"--max-kl {budget.max_kl}: the closest plan measures KL {kl:.4f}")
    return choice, ratio, kl


@torch.no_grad()
def measured_mix_kl(model, measured: dict, chosen: dict[str, str], windows: torch.Tensor) -> float:
    """KL (nats/token) of the model with every chosen layer swapped for its RTN candidate, against the float
    model, on `windows`: the packed candidates are already in memory, so this costs two forwards per window.
    The float layers are put back afterwards."""
    import torch.nn.functional as F

    from modelpress.nn.layers import replace_module
    from modelpress.nn.quant_linear import QuantLinear

    modules = measured["modules"]
    quantized = {name: QuantLinear(measured["candidates"][name].packed[spec], getattr(modules[name], "bias", None))
                 for name, spec in chosen.items()}
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for window in windows.split(1):
            window = window.to(device)
            ref = F.log_softmax(model(window, use_cache=False).logits[:, :-1].float(), -1)
            for name, layer in quantized.items():
                replace_module(model, name, layer.to(device))
            try:
                got = F.log_softmax(model(window, use_cache=False).logits[:, :-1].float(), -1)
            finally:
                for name in quantized:
                    replace_module(model, name, modules[name])
            total += float((ref.exp() * (ref - got)).sum())
            tokens += ref.shape[1]
    finally:
        model.train(was_training)
    return total / tokens


def apply_plan(model, plan: Plan, calibration=None, tokenizer=None):
    """Run `plan` on `model` (in place): its method's config with the per-layer map. Returns a QuantizeReport."""
    from modelpress.python_api import quantize

    return quantize(model, plan.config(), calibration=calibration, tokenizer=tokenizer)
