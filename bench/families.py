"""The engine on the families users bring (tiny random models from configs, tests/engine/tiny_models.py):
for each family and method (RTN, GPTQ, AWQ, SmoothQuant), whether it ran, how many layers fell back (and
why), and int4/g32 KL against the float model for RTN and GPTQ. Prints a table, writes JSON.

    PYTHONPATH=src python bench/families.py --json bench/results/families.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))

from tiny_models import FAMILIES, METHODS, build_family, fallbacks, quantize_family, token_ids  # noqa: E402

from modelpress.eval.quality import evaluate_quality  # noqa: E402


def measure(family: str, calibration: torch.Tensor, evaluation: torch.Tensor, scheme: str) -> dict:
    reference = build_family(family)
    row: dict = {"family": family, "parameters": sum(p.numel() for p in reference.parameters())}
    for method in METHODS:
        model = copy.deepcopy(reference)
        try:
            summary = quantize_family(model, method, calibration, scheme)
        except Exception as err:     # a family a method cannot handle is a result here, not a crash
            row[method] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            continue
        fell_back = fallbacks(method, summary)
        kl = evaluate_quality({"m": model}, evaluation, reference=reference, batch_size=4)["m"].kl_divergence
        row[method] = {"status": "fell back" if fell_back else "ran", "kl": kl, "fallback_layers": len(fell_back),
                       "reasons": dict(Counter(_short(r) for r in fell_back.values()))}
    return row


def _short(reason: str) -> str:
    return reason.split(":")[0] if reason.startswith("no exact fold") else reason


def cell(result: dict) -> str:
    if result["status"] == "failed":
        return "FAILED"
    return "ran" if result["status"] == "ran" else f"ran, {result['fallback_layers']} fell back"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--scheme", default="int4/g32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    calibration = token_ids(256, args.samples, args.seq_len, seed=0)
    evaluation = token_ids(256, 8, args.seq_len, seed=1)
    rows = [measure(family, calibration, evaluation, args.scheme) for family in FAMILIES]
    print(f"| family | {' | '.join(METHODS)} | RTN KL | GPTQ KL | GPTQ/RTN |")
    print("|" + " --- |" * (len(METHODS) + 4))
    for row in rows:
        rtn, gptq = row["rtn"].get("kl"), row["gptq"].get("kl")
        ratio = f"{gptq / rtn:.2f}" if rtn and gptq else "-"
        kls = " | ".join("-" if v is None else f"{v:.3g}" for v in (rtn, gptq))
        print(f"| {row['family']} | {' | '.join(cell(row[m]) for m in METHODS)} | {kls} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"scheme": args.scheme, "calibration": list(calibration.shape),
                                               "evaluation": list(evaluation.shape), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
