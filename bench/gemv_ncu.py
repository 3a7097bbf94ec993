"""Hardware counters of the M = 1 GEMV kernels beside cuBLAS bf16 (issue 13 item 3), read by Nsight Compute.

Where the kernel time goes cannot be told from timings alone: this script calls each layer once per shape
so that `ncu` can profile exactly those launches, and prints a compact table from ncu's CSV. Run it under
ncu itself (the script re-executes itself under ncu when `--ncu` is given):

    PYTHONPATH=src python bench/gemv_ncu.py --ncu --csv ncu.csv

Needs CUDA and Nsight Compute (`ncu` on PATH). The weights are random (codes uniform, scales positive), the
activations random bf16; ncu flushes the caches before every profiled kernel, so each launch reads its
weights from DRAM.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import random_packed  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (22016, 4096)]
SPECS = ["int4/g128", "nf4/g64"]
KERNELS = "regex:gemv|nvjet|gemm|sm90"
METRICS = {
    "gpu__time_duration.sum": "time_us",
    "dram__bytes_read.sum": "dram_read_MB",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
    "launch__grid_size": "grid",
    "launch__registers_per_thread": "regs",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "stall_long_sb",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": "stall_wait",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio": "stall_math",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "stall_barrier",
    "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio": "stall_lg",
    "smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio": "stall_notsel",
    "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio": "stall_selected",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio": "stall_short_sb",
    "smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio": "stall_noinst",
    "smsp__inst_executed.sum": "warp_insts",
}


def workload() -> list[str]:
    """Calls each layer (warm-up first, outside the profiled range) and returns the profiled order."""
    from modelpress.nn import QuantLinear

    labels = []
    dev = torch.device("cuda")
    for n, k in SHAPES:
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        layers = [(spec, QuantLinear(random_packed(spec, n, k))) for spec in SPECS]
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        for _, layer in layers:
            layer(x)
        F.linear(x, w)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for spec, layer in layers:
            layer(x)
            labels.append(f"{spec} {n}x{k}")
        F.linear(x, w)
        labels.append(f"bf16 {n}x{k}")
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        del layers, w
    return labels


def parse(text: str) -> list[dict]:
    """ncu --csv --page raw: one row per kernel, a units row after the header."""
    rows = list(csv.DictReader(io.StringIO(text[text.index('"ID"'):])))
    return [r for r in rows[1:] if r.get("Kernel Name")]


def table(rows: list[dict], labels: list[str]) -> str:
    keys = list(METRICS.values())
    out = ["| call | kernel | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    # A call may launch more than one kernel (cuBLAS split-K reduce): pair labels with the calls' first kernels.
    it = iter(labels)
    label = None
    for r in rows:
        name = r["Kernel Name"]
        if not name.startswith("void cublasLt::splitKreduce"):
            label = next(it, "?")
        vals = []
        for metric, key in METRICS.items():
            v = r.get(metric, "")
            try:
                f = float(v.replace(",", ""))
                if key == "dram_read_MB":
                    f /= 1e6
                if key == "time_us":
                    f /= 1e3
                vals.append(f"{f:.3g}" if abs(f) < 1e4 else f"{f:.0f}")
            except ValueError:
                vals.append(v)
        out.append(f"| {label} | {name[:28]} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ncu", action="store_true", help="run this script under ncu and print the table")
    p.add_argument("--csv", type=Path, help="keep ncu's raw CSV here")
    args = p.parse_args(argv)
    if not args.ncu:
        print("\n".join(workload()))
        return
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--kernel-name", KERNELS,
           "--metrics", ",".join(METRICS), "--csv", "--page", "raw", sys.executable, __file__]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode or '"ID"' not in proc.stdout:
        print(f"ncu with the metric list failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{proc.stdout[-3000:]}")
        # Fall back to ncu's own sections, printed as it prints them.
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--kernel-name", KERNELS,
               "--section", "SpeedOfLight", "--section", "WarpStateStats", "--section", "Occupancy",
               sys.executable, __file__]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if args.csv:
            args.csv.write_text(proc.stdout + proc.stderr)
        sys.exit(proc.returncode or 1)
    text = proc.stdout
    if args.csv:
        args.csv.write_text(text)
    labels = [line for line in text.splitlines() if " " in line and line.split()[0] in SPECS + ["bf16"]]
    print(table(parse(text), labels))


if __name__ == "__main__":
    main()
