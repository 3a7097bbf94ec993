"""Benchmark: the planner's forecast against the real run on the default model (or MODEL).

1. `modelpress plan`'s work in this process: load, measure, plan, forecast (bytes, KL, seconds, peak memory).
2. The plan run in a fresh process (so its peak memory is its own): load, quantize with the plan's config,
   time the quantization, read the process's peak RSS, save to --workdir.
3. The result evaluated against the float model (KL, on the usual evaluation windows).

    .venv/bin/python bench/plan_check.py --max-bits 4.5 --runtime modelpress --json bench/results/plan.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import json, sys, time
import modelpress
from modelpress.algorithms.quantize import config_for_method
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
plan = json.load(open(sys.argv[1]))
model = modelpress.load(plan["source_spec"])
config = config_for_method(plan["method"], max(set(plan["schemes"].values()), key=list(plan["schemes"].values()).count),
                           skip=tuple(plan["skip"]),
                           schemes={k: WeightScheme.parse(v) for k, v in plan["schemes"].items()})
start = time.perf_counter()
modelpress.quantize(model, config)
seconds = time.perf_counter() - start
# VmHWM, this process's own peak: ru_maxrss would include the parent's resident set at fork time (Linux keeps it
# across exec), which made an earlier check report the planning process's 5.3 GB as the run's peak
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
modelpress.save(model, sys.argv[2])
size = measure_size(model.model).weight_bytes
print(json.dumps({"seconds": seconds, "peak_memory_bytes": peak, "weight_bytes": size}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-gb", type=float)
    budget.add_argument("--max-bits", type=float)
    budget.add_argument("--max-kl", type=float)
    parser.add_argument("--runtime", default="modelpress")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows for the real KL")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import modelpress
    from modelpress.api import EvalSettings
    from modelpress.planner import Budget, plan_model

    start = time.perf_counter()
    float_model = modelpress.load(args.model)
    plan = plan_model(float_model, Budget(args.max_gb, args.max_bits, args.max_kl), args.runtime, args.method)
    plan_seconds = time.perf_counter() - start
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="plan-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan_file = workdir / "plan.json"
    plan_file.write_text(json.dumps({**plan.to_json(), "source_spec": args.model}))
    out = workdir / "planned"
    run = subprocess.run([sys.executable, "-c", RUN, str(plan_file), str(out)], capture_output=True, text=True)
    if run.returncode:
        print(run.stderr, file=sys.stderr)
        return 1
    real = json.loads(run.stdout.strip().splitlines()[-1])
    report = modelpress.evaluate(modelpress.load(str(out)), reference=float_model,
                                 settings=EvalSettings(windows=args.windows, speed=False))
    f = plan.forecast
    rows = {
        "weight_bytes": (f.weight_bytes, real["weight_bytes"]),
        "kl_divergence": (f.kl_divergence, report.kl_divergence),
        "seconds": (f.seconds, real["seconds"]),
        "peak_memory_bytes": (f.peak_memory_bytes, real["peak_memory_bytes"]),
    }
    counts = {spec: list(plan.schemes.values()).count(spec) for spec in sorted(set(plan.schemes.values()))}
    print(f"plan ({args.runtime}, {plan.method}, {Budget(args.max_gb, args.max_bits, args.max_kl).describe()}) "
          f"in {plan_seconds:.1f} s; schemes: {counts}")
    print(f"{'quantity':<18} {'forecast':>16} {'real':>16} {'real/forecast':>14}")
    for key, (forecast, measured) in rows.items():
        print(f"{key:<18} {forecast:>16.6g} {measured:>16.6g} {measured / forecast:>14.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": plan.model, "runtime": args.runtime, "method": plan.method,
                                               "budget": plan.budget, "plan_seconds": plan_seconds,
                                               "forecast": f.to_json(), "real": {**real, "kl_divergence":
                                                                                report.kl_divergence,
                                                                                "perplexity": report.perplexity},
                                               "eval_windows": args.windows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
