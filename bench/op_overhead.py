"""Host time of one eager QuantLinear call at decode size (M = 1): QuantLinear.forward (on CUDA: the prepared
launcher, triton_backend.prepared_linear), the operator (torch.ops.modelpress.quant_linear, what
torch.compile traces and what CPU calls run) and the backend chain called directly, under no_grad and
inference_mode.

    PYTHONPATH=src python bench/op_overhead.py [--device cuda] [--spec int4/g128] [--calls 2000]

The wall time of many back-to-back calls (synchronized once at the end) is the host time per call as long
as the kernel is shorter than that: use a small layer (--features 256) on a GPU, where a 4096 x 4096 kernel
takes several microseconds itself. Best of `--repeats` runs, in microseconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from modelpress.formats import WeightScheme, quantize_weight
from modelpress.nn import QuantLinear
from modelpress.nn.backends import linear_forward


def per_call_us(fn, calls: int, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - began) / calls * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--spec", default="int4/g128")
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    n = k = args.features
    weight = torch.randn(n, k, device=device) * 0.02
    layer = QuantLinear(quantize_weight(weight, WeightScheme.parse(args.spec))).to(device)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    dense = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    calls = {"F.linear, bf16 weight (the host's own floor)": lambda: torch.nn.functional.linear(x, dense),
             "QuantLinear.forward": lambda: layer(x),
             "operator": lambda: layer._operator(x),
             "backend chain directly": lambda: linear_forward(x, layer.packed, layer.bias)}
    print(f"{args.spec} {n}x{k}, M = 1, bf16, {device}: host microseconds per eager call")
    print("| call | no_grad | inference_mode |\n| --- | ---: | ---: |")
    for name, fn in calls.items():
        row = []
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                per_call_us(fn, 50, 1, device)  # warm-up (kernel compilation, prepared CPU weights)
                row.append(per_call_us(fn, args.calls, args.repeats, device))
        print(f"| {name} | {row[0]:.1f} | {row[1]:.1f} |")


if __name__ == "__main__":
    main()
