"""Tile-size sweep for the Triton quantized matmul (the data behind triton_backend.choose_plan).

    PYTHONPATH=src python bench/kernel_sweep.py --json sweep.json

For each shape and M, times every candidate KernelConfig (CUDA-graph replay over rotating weight copies,
see bench/kernels.py), checks each one's output against dequantize-then-matmul, and prints the best.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kernels import DEVICE, ROTATE_BYTES, SHAPES, random_packed, time_sequence

from modelpress.nn.triton_backend import KernelConfig, dequantize, fused_matmul, plan_for


def decode_candidates(k: int, m: int):
    splits = [s for s in (1, 2, 4, 8, 16) if k // (128 * s) >= 3]
    for warps, split in itertools.product((2, 4), splits):
        yield KernelConfig(BM=16, BN=64, BKG=128, SUB=1, SPLIT=split, num_warps=warps, num_stages=3), True


def prefill_candidates():
    for bm, bn, bkg, warps, stages in [(64, 128, 128, 4, 3), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3),
                                       (64, 256, 128, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3)]:
        yield KernelConfig(BM=bm, BN=bn, BKG=bkg, num_warps=warps, num_stages=stages), True
    yield KernelConfig(dequant=True), True


def run_config(packs, x, config, use_asm):
    if config.dequant:
        return lambda p: F.linear(x, dequantize(p, x.dtype))
    return lambda p: fused_matmul(x, p, None, config, use_asm=use_asm)


def sweep(spec: str, shapes, ms, dtype) -> list[dict]:
    rows = []
    for n, k in shapes:
        first = random_packed(spec, n, k)
        packs = [first] + [random_packed(spec, n, k) for _ in range(math.ceil(ROTATE_BYTES / first.nbytes) - 1)]
        for m in ms:
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            ref = F.linear(x.float(), first.dequantize(torch.float32))
            candidates = decode_candidates(k, m) if m <= 16 else prefill_candidates()
            best = None
            for config, use_asm in candidates:
                row = {"spec": spec, "N": n, "K": k, "M": m, "dtype": str(dtype), "config": config.__dict__,
                       "asm": use_asm}
                try:
                    fn = run_config(packs, x, config, use_asm)
                    err = ((fn(first).float() - ref).norm() / ref.norm()).item()
                    row.update(time_sequence([lambda p=p: fn(p) for p in packs], repeats=10), rel_err=err)
                    if err < 1e-2 and (best is None or row["graph_us"] < best["graph_us"]):
                        best = row
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
            auto = plan_for(m, first, DEVICE)
            auto_fn = run_config(packs, x, auto, None)
            auto_t = time_sequence([lambda p=p: auto_fn(p) for p in packs], repeats=10)
            print(f"{spec} {dtype} N={n} K={k} M={m}: best {best and round(best['graph_us'], 2)} us "
                  f"{best and best['config']} asm={best and best['asm']} | auto {auto_t['graph_us']:.2f} us {auto}",
                  flush=True)
            rows.append({"spec": spec, "N": n, "K": k, "M": m, "dtype": str(dtype), "auto": auto.__dict__, **auto_t})
        del packs, first
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=Path("sweep.json"))
    parser.add_argument("--spec", default="int4/g128")
    parser.add_argument("--ms", default="1,16")
    args = parser.parse_args()
    torch.manual_seed(0)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [s for s in SHAPES if s != (14336, 4096)]  # 11008x4096 stands for it
    rows = sweep(args.spec, shapes, ms, torch.bfloat16)
    args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
