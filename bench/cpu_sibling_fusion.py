"""What fusing sibling projections would save in a CPU decode step: the default model's seven linear layers of
one decoder layer at batch 1 (q, k, v, o, gate, up, down) against four fused ones (qkv, o, gate+up, down), each a
QuantLinear on the CPU backend's kernels, random int4/g32 weights, one thread. Not built yet; this measures
whether it is worth building (the per-call cost the fused layers would save).

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_sibling_fusion.py --json bench/results/cpu_sibling_fusion.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modelpress.formats import WeightScheme, quantize_weight  # noqa: E402
from modelpress.nn import QuantLinear  # noqa: E402
from modelpress.nn.cpu_backend import fast_cpu  # noqa: E402

HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30  # SmolLM2-135M


def layer(n: int, k: int, scheme: WeightScheme) -> QuantLinear:
    return QuantLinear(quantize_weight(torch.randn(n, k) * 0.02, scheme))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="int4/g32")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    scheme = WeightScheme.parse(args.scheme)
    separate = [layer(HIDDEN, HIDDEN, scheme), layer(KV, HIDDEN, scheme), layer(KV, HIDDEN, scheme),
                layer(HIDDEN, HIDDEN, scheme), layer(INTERMEDIATE, HIDDEN, scheme),
                layer(INTERMEDIATE, HIDDEN, scheme), layer(HIDDEN, INTERMEDIATE, scheme)]
    fused = [layer(HIDDEN + 2 * KV, HIDDEN, scheme), layer(HIDDEN, HIDDEN, scheme),
             layer(2 * INTERMEDIATE, HIDDEN, scheme), layer(HIDDEN, INTERMEDIATE, scheme)]
    x, x_wide = torch.randn(1, 1, HIDDEN), torch.randn(1, 1, INTERMEDIATE)

    def run(layers: list[QuantLinear]) -> None:
        for module in layers:
            module(x_wide if module.in_features == INTERMEDIATE else x)

    times: dict[str, list[float]] = {"separate": [], "fused": []}
    with torch.no_grad(), fast_cpu():
        for _ in range(3):  # prepares the kernels' layouts
            run(separate)
            run(fused)
        for _ in range(args.repeats):  # interleaved
            for name, layers in (("separate", separate), ("fused", fused)):
                began = time.perf_counter()
                run(layers)
                times[name].append(time.perf_counter() - began)
    us = {name: 1e6 * statistics.median(t) for name, t in times.items()}
    saved_ms = LAYERS * (us["separate"] - us["fused"]) / 1e3
    print(f"| {args.scheme}, 1 thread | one decoder layer, 7 calls | fused, 4 calls | saved per token ({LAYERS} layers) |")
    print("|---|---:|---:|---:|")
    print(f"| median of {args.repeats} | {us['separate']:.0f} µs | {us['fused']:.0f} µs | {saved_ms:.2f} ms |")
    if args.json is not None:
        args.json.write_text(json.dumps({"scheme": args.scheme, "threads": 1, "torch": torch.__version__,
                                         "layer_us": us, "saved_ms_per_token": saved_ms}, indent=1))


if __name__ == "__main__":
    main()
