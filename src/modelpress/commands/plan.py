"""modelpress plan MODEL (--max-gb X | --max-bits B | --max-kl Y) [--runtime modelpress|llamacpp|transformers]
[--method auto|rtn|gptq|...] [--json OUT] [--write-recipe FILE]

Measures per-layer sensitivity (a few calibration windows, seconds to a minute), picks a method and one scheme
per layer among those the runtime runs exactly, and prints the forecast: exact bytes, estimated KL, seconds
and peak memory of the run on this machine. Nothing is quantized; the recipe (or planner.apply_plan) runs it.
docs/planner.md has the details."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from modelpress.commands.common import (add_calibration_arguments, add_json_argument, add_model_argument,
                                        calibration_settings, check_output_paths, write_json)
from modelpress.errors import ModelpressError
from modelpress.planner import RUNTIMES, Budget, plan_model


def add_parser(sub) -> None:
    from modelpress.algorithms.quantize import per_layer_methods

    p = sub.add_parser("plan", help="plan a quantization for a size, bits or KL budget, with a forecast")
    add_model_argument(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-gb", type=float, metavar="X", help="all weight bytes of the result, in GB (10^9)")
    budget.add_argument("--max-bits", type=float, metavar="B",
                        help="average stored bits per quantized weight, scales included")
    budget.add_argument("--max-kl", type=float, metavar="Y", help="estimated KL divergence from the float model")
    p.add_argument("--runtime", default="modelpress", choices=list(RUNTIMES),
                   help="where the model will run: only schemes it holds exactly are used (default modelpress)")
    p.add_argument("--method", default="auto", choices=("auto", *per_layer_methods()),
                   help="quantization method (default auto: rtn, or gptq when rtn cannot meet --max-kl)")
    p.add_argument("--write-recipe", default=None, metavar="FILE", help="write the plan as a recipe YAML")
    add_calibration_arguments(p, "calibration (the first 8 windows are scored; gptq calibrates on all)",
                              "unused by plan (the recipe's run resumes)")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modelpress.io.model import load_model

    check_output_paths(args)
    if args.write_recipe is not None:
        check_output_paths(argparse.Namespace(json=args.write_recipe))
    if args.resume is not None:
        raise ModelpressError("plan runs nothing to resume; --resume belongs to the run (the recipe)")
    budget = Budget(max_gb=args.max_gb, max_bits=args.max_bits, max_kl=args.max_kl)
    start = time.perf_counter()
    loaded = load_model(args.model)
    load_seconds = time.perf_counter() - start
    plan = plan_model(loaded, budget, args.runtime, args.method, calibration_settings(args))
    f = plan.forecast
    for spec, count in sorted(Counter(plan.schemes.values()).items()):
        kl = sum(v for name, v in plan.estimated_kl.items() if plan.schemes[name] == spec)
        print(f"  {spec:<16} {count:4d} layers  estimated KL {kl:.4f}")
    print(f"plan for {plan.runtime} ({budget.describe()}): {plan.method} over {len(plan.schemes)} layers, "
          f"sensitivity {plan.sensitivity['seconds']:.1f} s on {plan.sensitivity['windows']} windows")
    print(f"forecast: {f.weight_bytes:,} weight bytes ({f.weight_bytes / 1e9:.4f} GB, {f.bits_per_weight:.3f} "
          f"bits/weight over quantized layers), KL {f.kl_divergence:.4f} ({f.kl_basis}), "
          f"{f.seconds:.1f} s to quantize (+{load_seconds:.1f} s to load), peak memory "
          f"{f.peak_memory_bytes / 2**20:.0f} MiB")
    for note in plan.notes[:10]:
        print(f"note: {note}", file=sys.stderr)
    if len(plan.notes) > 10:
        print(f"note: ... and {len(plan.notes) - 10} more (see --json)", file=sys.stderr)
    if args.write_recipe is not None:
        plan.write_recipe(args.write_recipe)
        print(f"recipe -> {args.write_recipe}")
    write_json(args.json, {**plan.to_json(), "load_seconds": round(load_seconds, 3)})
    return 0
