"""Tile-size sweep for the Triton quantized matmul (the data behind triton_backend.choose_plan).

    PYTHONPATH=src python bench/kernel_sweep.py --json sweep.json
    PYTHONPATH=src python bench/kernel_sweep.py --gemv --spec int4/g128,nf4/g64 --json gemv.json  # M = 1 GEMV

For each shape and M, times every candidate KernelConfig (CUDA-graph replay over rotating weight copies,
see bench/kernels.py), checks each one's output against dequantize-then-matmul, and prints the best.
--gemv sweeps the GEMV kernels' BN / SUB / warps / split-K at M = 1 on the three 7B shapes beside the
tensor-core plan, then times the Llama-2-7B stack under a few GEMV heuristics, for each --spec.
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

from kernels import (
    DEVICE,
    LAYERS,
    LLAMA2_7B_LAYER,
    READ_CEILING_TBS,
    ROTATE_BYTES,
    SHAPES,
    random_packed,
    time_sequence,
)

from modelpress.formats import WeightScheme
from modelpress.nn.triton_backend import (
    KernelConfig,
    choose_plan,
    dequantize,
    fused_matmul,
    gemv_plan,
    group_tile,
    plan_for,
    quantized_matmul,
)


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


GEMV_FAMILIES = {4: [(16, 8, 4), (64, 2, 4), (128, 2, 8), (128, 1, 4), (256, 1, 8)],  # (BN, SUB, num_warps)
                 8: [(16, 2, 4), (32, 2, 4), (16, 4, 8), (64, 1, 4)]}
GEMV_HEURISTICS = {"default": {}, "p4": {"programs_per_sm": 4.0}, "p16": {"programs_per_sm": 16.0}}


def gemv_sweep(spec: str, shapes, dtype, sms: int) -> list[dict]:
    """M = 1: every GEMV tile family at splits 1..32 per shape; prints best, auto plan, tensor-core plan."""
    rows = []
    bits = WeightScheme.parse(spec).bits
    for n, k in shapes:
        first = random_packed(spec, n, k)
        packs = [first] + [random_packed(spec, n, k) for _ in range(math.ceil(ROTATE_BYTES / first.nbytes) - 1)]
        ceiling_us = first.nbytes / (READ_CEILING_TBS * 1e12) * 1e6
        x = torch.randn(1, k, device=DEVICE).to(dtype)
        ref = F.linear(x.float(), first.dequantize(torch.float32))
        bkg = group_tile(first)
        results = []
        for (bn, sub, warps), split in itertools.product(GEMV_FAMILIES[bits], (1, 2, 4, 8, 16, 32)):
            programs = -(-n // bn) * split
            if k // (bkg * sub * split) < 1 or not sms <= programs <= 32 * sms:
                continue
            config = KernelConfig(BM=1, BN=bn, BKG=bkg, SUB=sub, SPLIT=split, num_warps=warps, num_stages=1,
                                  gemv=True)
            row = {"spec": spec, "N": n, "K": k, "M": 1, "kernel": "gemv", "config": config.__dict__}
            try:
                err = ((fused_matmul(x, first, None, config).float() - ref).norm() / ref.norm()).item()
                row.update(time_sequence([lambda p=p, c=config: fused_matmul(x, p, None, c) for p in packs],
                                         repeats=10), rel_err=err)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            results.append(row)
        good = [r for r in results if "graph_us" in r and r["rel_err"] < 1e-2]
        best = min(good, key=lambda r: r["graph_us"]) if good else None
        auto = plan_for(1, first, DEVICE)
        auto_t = time_sequence([lambda p=p: fused_matmul(x, p, None, auto) for p in packs], repeats=10)
        tc = choose_plan(1, n, k, bkg, sms, False)
        tc_t = time_sequence([lambda p=p: fused_matmul(x, p, None, tc) for p in packs], repeats=10)
        rows.append({"spec": spec, "N": n, "K": k, "M": 1, "summary": True, "best": best, "auto": auto.__dict__,
                     "auto_us": auto_t["graph_us"], "tensor_core_us": tc_t["graph_us"], "ceiling_us": ceiling_us})
        errors = [r["error"] for r in results if "error" in r]
        best_text = "none" if best is None else (
            f"{best['graph_us']:.2f}us BN{best['config']['BN']} SUB{best['config']['SUB']} "
            f"w{best['config']['num_warps']} s{best['config']['SPLIT']} ({100 * ceiling_us / best['graph_us']:.0f}%)")
        print(f"{spec} {n}x{k} M=1: best {best_text} | auto {auto_t['graph_us']:.2f} "
              f"({100 * ceiling_us / auto_t['graph_us']:.0f}%) s{auto.SPLIT} | tensor-core {tc_t['graph_us']:.2f}"
              + (f" | {len(errors)} errors: {errors[0][:200]}" if errors else ""), flush=True)
        del packs, first
        torch.cuda.empty_cache()
    return rows


def gemv_stack(spec: str, dtype, sms: int) -> list[dict]:
    """Per-token time of the 7B stack at M = 1 under each GEMV heuristic (and the tensor-core plan)."""
    rows = []
    weights = [(random_packed(spec, n, k), n, k) for _ in range(LAYERS) for n, k in LLAMA2_7B_LAYER]
    bkg = group_tile(weights[0][0])
    floor_ms = sum(p.nbytes for p, _, _ in weights) / (READ_CEILING_TBS * 1e12) * 1e3
    xs = {k: torch.randn(1, k, device=DEVICE).to(dtype) for k in (4096, 11008)}
    kind = {"int4": 0, "int4-asym": 0, "nf4": 1}.get(weights[0][0].scheme.format, 2)
    plans = {name: {(n, k): gemv_plan(n, k, bkg, kind, sms, **kw) for _, n, k in weights}
             for name, kw in GEMV_HEURISTICS.items()}
    plans["tensor-core"] = {(n, k): choose_plan(1, n, k, bkg, sms, False) for _, n, k in weights}
    for name, plan in plans.items():
        calls = [lambda p=p, c=plan[(n, k)], xx=xs[k]: quantized_matmul(xx, p, None, c) for p, n, k in weights]
        t = time_sequence(calls, repeats=10)
        row = {"spec": spec, "M": 1, "plan": name, "graph_ms": t["graph_us"] * len(calls) / 1e3,
               "eager_ms": t["eager_us"] * len(calls) / 1e3, "floor_ms": floor_ms}
        rows.append(row)
        print(f"stack {spec} {name}: graph {row['graph_ms']:.3f} ms ({100 * floor_ms / row['graph_ms']:.0f}% of "
              f"the {floor_ms:.3f} ms floor), eager {row['eager_ms']:.3f} ms", flush=True)
    del weights
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=Path("sweep.json"))
    parser.add_argument("--spec", default="int4/g128", help="comma-separated specs (--gemv)")
    parser.add_argument("--ms", default="1,16")
    parser.add_argument("--gemv", action="store_true", help="sweep the small-M GEMV kernel")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.gemv:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        rows = []
        for spec in args.spec.split(","):
            rows += gemv_sweep(spec, SHAPES[:3], torch.bfloat16, sms)
            rows += gemv_stack(spec, torch.bfloat16, sms)
        args.json.write_text(json.dumps(rows))
        return
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [s for s in SHAPES if s != (14336, 4096)]  # 11008x4096 stands for it
    rows = sweep(args.spec, shapes, ms, torch.bfloat16)
    args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
