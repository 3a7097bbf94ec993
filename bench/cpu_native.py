"""The native CPU kernels (nn/cpu_native.py) against PyTorch's packed CPU kernels (nn/cpu_backend.py), per call.

Two tables, one thread, random weights of the default model's shapes (SmolLM2-135M: 30 layers of q/k/v/o, gate,
up, down; K = 576 or 1536):
- one 1536 x 576 layer at M = 1, 2, 4, 8 activation rows (the rows up to which the backend sends a format to the
  native kernels is read off this: `cpu_backend.native_rows`);
- the 210 linear layers of one decode step at M = 1 (weights together larger than the caches, as in decode),
  with the bytes each path holds: the packed weight only (native) or PyTorch's prepared layout beside it.
Times are medians over repeats; the per-call cost of each Python path is included, as a model pays it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_native.py --json bench/results/cpu_native_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from modelpress.formats import WeightScheme, quantize_weight
from modelpress.nn import cpu_native
from modelpress.nn.cpu_backend import Int4Prepared, int4_matmul, int8_matmul, prepare, prepared_nbytes

SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (N, K)
LAYERS = 30
SPECS = ("int4/g32", "int4/g128", "int4-asym/g128", "int8/g32", "int8/channel", "fp4/g32", "nf4/g64", "fp8-e4m3/channel")


def median_us(fn, repeats: int, inner: int = 1) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times) * 1e6


def torch_call(prep):
    return int4_matmul if isinstance(prep, Int4Prepared) else int8_matmul


def per_layer(spec: str, repeats: int) -> list[dict]:
    packed = quantize_weight(torch.randn(1536, 576), WeightScheme.parse(spec))
    plan, prep = cpu_native.plan_for(packed), prepare(packed)
    rows = []
    for m in (1, 2, 4, 8):
        x = torch.randn(m, 576)
        native = median_us(lambda: cpu_native.native_matmul(x, plan), repeats, 50)
        ours = median_us(lambda: torch_call(prep)(x, prep), repeats, 50)
        rows.append({"spec": spec, "M": m, "native_us": native, "pytorch_us": ours})
    return rows


def decode_step(spec: str, repeats: int) -> dict:
    scheme = WeightScheme.parse(spec)
    layers = [quantize_weight(torch.randn(n, k), scheme) for _ in range(LAYERS) for n, k in SMOLLM2_LAYER]
    plans = [cpu_native.plan_for(p) for p in layers]
    preps = [prepare(p) for p in layers]
    xs = {k: torch.randn(1, k) for k in (576, 1536)}

    def native():
        for p, plan in zip(layers, plans):
            cpu_native.native_matmul(xs[p.shape[1]], plan)

    def pytorch():
        for p, prep in zip(layers, preps):
            torch_call(prep)(xs[p.shape[1]], prep)

    return {"spec": spec, "native_ms": median_us(native, repeats) / 1e3, "pytorch_ms": median_us(pytorch, repeats) / 1e3,
            "packed_mb": sum(p.nbytes for p in layers) / 1e6,
            "prepared_mb": sum(prepared_nbytes(p) for p in preps) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if not cpu_native.available():
        sys.exit("the native kernels are not built on this machine (no C compiler, or no AVX2 / AVX-512)")
    result = {"threads": torch.get_num_threads(), "isa": cpu_native.isa(), "torch": torch.__version__,
              "layer": [row for spec in args.specs for row in per_layer(spec, args.repeats)],
              "step": [decode_step(spec, args.repeats) for spec in args.specs]}
    lines = ["One 1536 x 576 layer, µs per call (native / PyTorch's kernels):", "",
             "| format | M = 1 | M = 2 | M = 4 | M = 8 |", "|---|---:|---:|---:|---:|"]
    for spec in args.specs:
        cells = [f"{r['native_us']:.0f} / {r['pytorch_us']:.0f}" for r in result["layer"] if r["spec"] == spec]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    lines += ["", "The 210 linear layers of one decode step at M = 1:", "",
              "| format | native ms | PyTorch's kernels ms | speedup | packed MB | PyTorch's layout MB (besides) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["step"]:
        lines.append(f"| {r['spec']} | {r['native_ms']:.2f} | {r['pytorch_ms']:.2f} | "
                     f"{r['pytorch_ms'] / r['native_ms']:.2f}x | {r['packed_mb']:.1f} | {r['prepared_mb']:.1f} |")
    print(f"threads {result['threads']}, native build {result['isa']}")
    print("\n".join(lines))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
