"""Benchmark: evaluation time of a packed model on the CPU against the float model's (issue 13 item 6).

Evaluation (`evaluate_quality`, the loop behind `modelpress eval`, the gate and every report) runs float32
activations through the reference path: dequantize, then F.linear. Inside an evaluation, packed weights are
decoded once and kept (`nn.backends.decoded_once`, up to 4 GiB), so a packed model evaluates at about the
float model's speed; "per forward" is the same model decoding on every forward (the behaviour before). The
numbers are bit for bit the same either way (checked here on every row).

Models are timed round-robin in one process (one repeat of each per round) and reported as medians over
rounds, so load from other work hits all rows alike: compare the ratios.

    .venv/bin/python bench/cpu_eval.py --json bench/results/cpu_eval.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn  # noqa: E402
from modelpress.eval.quality import evaluate_quality  # noqa: E402
from modelpress.formats.scheme import WeightScheme  # noqa: E402
from modelpress.io.model import load_model  # noqa: E402
from modelpress.io.text import load_text, make_windows  # noqa: E402
from modelpress.nn import backends  # noqa: E402


@contextlib.contextmanager
def per_forward():
    """Decode on every forward, as before decoded_once existed."""
    saved = backends._decoded
    backends._decoded = lambda packed, dtype: packed.dequantize(dtype)
    try:
        yield
    finally:
        backends._decoded = saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["int4/g32", "int8/channel"])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None)
    windows = make_windows(loaded.tokenizer, load_text(None), seq_len=args.seq_len, eval_windows=args.windows).eval
    rows = {"float32": (loaded.model, contextlib.nullcontext)}
    for spec in args.schemes:
        model = copy.deepcopy(loaded.model)
        quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
        rows[spec] = (model, contextlib.nullcontext)
        rows[f"{spec} per forward"] = (model, per_forward)
    times: dict[str, list[float]] = {name: [] for name in rows}
    results: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (model, context) in rows.items():
            with context():
                start = time.perf_counter()
                out = evaluate_quality({name: model}, windows)[name]
                times[name].append(time.perf_counter() - start)
            if results.setdefault(name, out.perplexity) != out.perplexity:
                raise SystemExit(f"{name}: perplexity changed between rounds")
    for spec in args.schemes:
        if results[spec] != results[f"{spec} per forward"]:
            raise SystemExit(f"{spec}: decoding once changed the result")
    float_s = statistics.median(times["float32"])
    table = [{"model": name, "seconds": round(statistics.median(t), 3),
              "vs_float": round(statistics.median(t) / float_s, 3), "perplexity": round(results[name], 4)}
             for name, t in times.items()]
    print(f"{args.windows} windows x {args.seq_len} tokens, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} rounds")
    print(f"{'model':<26} {'seconds':>8} {'vs float':>9} {'PPL':>9}")
    for row in table:
        print(f"{row['model']:<26} {row['seconds']:>8.2f} {row['vs_float']:>8.2f}x {row['perplexity']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": args.windows, "seq_len": args.seq_len,
                                               "threads": torch.get_num_threads(), "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
