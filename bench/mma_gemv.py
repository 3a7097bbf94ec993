"""The tensor-core M = 1 GEMV (nn/gluon_mma_gemv.py, weights re-laid for the MMA) against the CUDA-core Gluon
GEMV that decode runs now, bf16 cuBLAS and PyTorch's int4 kernel, on the Llama-2-7B decode shapes.

For each shape: the error of both GEMVs against float64 dequantize-then-matmul, then graph-replay µs per call
of every MMA configuration (rows per thread, chunks per step, warps along rows and K; split-K too for the
shapes whose row tiles do not fill the GPU) beside the baselines,
with weight copies rotating past the L2 cache; then the 7B stack at M = 1 (32 blocks of the fused decode
shapes: q/k/v, o, gate/up, down), each shape with its best configuration. PDL on for both GEMVs.

    PYTHONPATH=src python bench/mma_gemv.py --json bench/results/mma_gemv_h100.json
    PYTHONPATH=src python bench/mma_gemv.py --specs int4/g128 --configs 1 --shapes 22016x4096 --act   # the epilogue

`--rows M ...` times the rows mode instead (2..8 activation rows, row r in column r of the MMAs' B; ROWS_CONFIGS
adds plans of more row tiles a warp, which share each x row read among more weights): for each re-laid
shape and M, the rows mode's configurations beside what such a layer ran before it (its weight decoded from the
re-laid codes, then cuBLAS), the stored layout's own kernels at M (`current`, as a layer not re-laid runs) and bf16
cuBLAS; then the 7B stack at each M with the re-laid shapes (q/k/v, gate/up) on their best rows-mode plan.

    PYTHONPATH=src python bench/mma_gemv.py --specs int4/g128,nf4/g64 --rows 2 4 8 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.kernels import (DEVICE, LAYERS, LLAMA2_7B_FUSED, bf16_linear, nbytes, ours, random_packed,
                           read_bandwidth_tbs, time_impl, time_sequence, torch_int4)

from modelpress.nn import gluon_mma_gemv, triton_backend
from modelpress.nn.mma_ptx import fragment_order, mma_layout

SHAPES = [(4096, 4096), (12288, 4096), (11008, 4096), (22016, 4096), (4096, 11008)]
CONFIGS = [dict(rows_per_thread=rt, chunks_per_step=cs, warps_rows=wr, warps_k=wk)  # (RT, CS, WR, WK)
           for rt, cs, wr, wk in ((1, 2, 1, 4), (1, 1, 1, 4), (1, 4, 1, 4), (1, 2, 1, 8), (1, 4, 1, 8), (2, 2, 1, 4),
                                  (2, 1, 1, 4), (2, 2, 2, 2), (1, 2, 2, 4), (2, 4, 1, 4), (1, 1, 1, 8), (2, 2, 1, 8))]
# the rows mode's: more row tiles a warp read each x row once for all of them (x rows are 4 KB apart: a lane's
# 8-byte loads of 8 rows touch 8 lines)
ROWS_CONFIGS = CONFIGS + [dict(rows_per_thread=rt, chunks_per_step=cs, warps_rows=wr, warps_k=wk)
                          for rt, cs, wr, wk in ((4, 1, 1, 4), (4, 2, 1, 4), (4, 1, 1, 2), (2, 1, 1, 2), (2, 2, 1, 2),
                                                 (4, 1, 1, 8), (4, 2, 1, 2), (2, 1, 2, 4))]
# for shapes with fewer row tiles than triton_backend.MMA_MIN_TILES_PER_SM per multiprocessor: K split across programs
SPLIT_CONFIGS = [dict(rows_per_thread=rt, chunks_per_step=cs, warps_rows=wr, warps_k=wk, split=split)
                 for rt, cs, wr, wk, split in ((1, 2, 1, 4, 2), (1, 2, 1, 4, 3), (1, 2, 1, 4, 4), (1, 4, 1, 4, 2),
                                               (1, 4, 1, 4, 3), (1, 2, 1, 8, 2), (1, 2, 1, 8, 3), (1, 1, 1, 4, 4),
                                               (1, 4, 1, 8, 2), (1, 2, 2, 4, 3))]


def plan_list(text: str) -> list[dict]:
    """--plans "1,2,1,4;2,2,1,4,2" -> configurations (rows per thread, chunks per step, warps along rows and K[,
    split])."""
    names = ("rows_per_thread", "chunks_per_step", "warps_rows", "warps_k", "split")
    return [dict(zip(names, (int(v) for v in item.split(",")))) for item in text.split(";") if item]


def with_depths(configs: list[dict], depths: list[int]) -> list[dict]:
    """Each configuration at each depth (loop steps of weights in flight; 1 is the kernel's default, left out)."""
    return [dict(config, depth=depth) if depth != 1 else config for config in configs for depth in depths]


def mma_impl(spec: str, config: dict, laid: bool = False):
    """laid (rows mode): x read from mma_ptx.fragment_order(x), made once per x outside the timed calls (the
    kernel alone)."""
    orders: dict = {}

    def build(n, k):
        packed = random_packed(spec, n, k)
        return packed, mma_layout(packed.qdata, n, k, triton_backend.mma_order(packed))

    def call(state, x):
        packed, words = state
        if laid and x.data_ptr() not in orders:
            orders[x.data_ptr()] = fragment_order(x)
        return gluon_mma_gemv.mma_gemv(x, words, packed.scale, packed.offset, packed.shape[0],
                                       packed.scheme.group_length(packed.shape[1]), triton_backend.mma_zero(packed),
                                       pdl=True, laid=orders.get(x.data_ptr()) if laid else None,
                                       **config)

    return build, call


def act_impls(spec: str, config: dict) -> dict:
    """For a [gate | up] weight: the GEMV then silu_mul (the activation's own kernel), and the GEMV on rows
    interleaved with the activation in its epilogue (interleave=True, act=True). Timing only: the codes are laid out
    without the interleaving permutation (random weights either way)."""
    from modelpress.nn.triton_act import silu_mul

    build, call = mma_impl(spec, config)
    return {"gemv_then_silu_mul": (build, lambda state, x: silu_mul(call(state, x))),
            "act_in_epilogue": mma_impl(spec, dict(config, interleave=True, act=True))}


def dequantize_impl(spec: str):
    """A re-laid layer's call of more rows than the GEMV took: its weight decoded from the re-laid codes, then
    cuBLAS."""
    build, _ = mma_impl(spec, CONFIGS[0])

    def call(state, x):
        packed, words = state
        return torch.nn.functional.linear(x, triton_backend.mma_dequantize(words, packed, x.dtype))

    return build, call


def time_stacks(spec: str, m: int, plans: dict, name: str, bf16: bool) -> list[dict]:
    """The 7B stack (32 blocks of the fused decode shapes) at m rows, ms: on the stored layout's kernels
    ("current"), with the shapes in `plans` ((N, K) -> configuration) on the tensor-core GEMV (`name`), and in bf16
    if asked; one row each."""
    weights = [(n, k) for _ in range(LAYERS) for n, k in LLAMA2_7B_FUSED]
    impls = {"current": {(n, k): ours(spec) for n, k in LLAMA2_7B_FUSED},
             name: {(n, k): mma_impl(spec, plans[(n, k)]) if (n, k) in plans else ours(spec)
                    for n, k in LLAMA2_7B_FUSED}}
    if bf16:
        impls["bf16"] = {(n, k): bf16_linear() for n, k in LLAMA2_7B_FUSED}
    xs = {k: torch.randn(m, k, device=DEVICE).to(torch.bfloat16) for k in (4096, 11008)}
    rows = []
    for impl, by_shape in impls.items():
        states = [(by_shape[(n, k)][0](n, k), by_shape[(n, k)][1], k) for n, k in weights]
        t = time_sequence([lambda s=s, c=c, k=k: c(s, xs[k]) for s, c, k in states], repeats=10)
        rows.append({"spec": spec, "M": m, "impl": impl, "stack_ms": t["graph_us"] * len(states) / 1e3})
        print(json.dumps(rows[-1]), flush=True)
        del states
        torch.cuda.empty_cache()
    return rows


def rows_main(args, specs: list[str]) -> dict:
    """--rows: the rows mode against the paths a layer takes at M rows otherwise (module docstring)."""
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "read_tbs": read_bandwidth_tbs(),
              "rows": [], "stack": []}
    print(json.dumps({k: result[k] for k in ("device", "torch", "read_tbs")}), flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else \
        [(12288, 4096), (22016, 4096)]
    for spec in specs:
        best: dict = {}
        for m in args.rows:
            for n, k in shapes:
                row = {"spec": spec, "M": m, "N": n, "K": k}
                row["current_us"] = time_impl(ours(spec), n, k, m)["graph_us"]
                row["dequantize_cublas_us"] = time_impl(dequantize_impl(spec), n, k, m, packed_bytes)["graph_us"]
                row["bf16_us"] = time_impl(bf16_linear(), n, k, m)["graph_us"]
                sweep = {}
                for config in with_depths(args.plans or ROWS_CONFIGS[:args.configs], args.depths):
                    for laid in (False, True) if args.laid else (False,):
                        name = json.dumps(dict(config, laid=laid) if laid else config)
                        try:
                            sweep[name] = time_impl(mma_impl(spec, config, laid), n, k, m, packed_bytes)["graph_us"]
                        except Exception as exc:  # a configuration that does not compile or fit is reported
                            sweep[name] = f"{type(exc).__name__}: {exc}"[:160]
                nf4 = spec.startswith("nf4")
                plan = json.dumps(triton_backend.MMA_NF4_CONFIG if nf4 else triton_backend.MMA_CONFIG)
                if plan not in sweep:
                    sweep[plan] = time_impl(mma_impl(spec, json.loads(plan)), n, k, m, packed_bytes)["graph_us"]
                times = {c: t for c, t in sweep.items() if isinstance(t, float)}
                choice = min(times, key=times.get)
                best[(m, n, k)] = {key: v for key, v in json.loads(choice).items() if key != "laid"}
                row.update(rows_mode_us=times[choice], rows_mode_plan_us=sweep[plan], best=json.loads(choice),
                           sweep=sweep)
                result["rows"].append(row)
                print(json.dumps({key: v for key, v in row.items() if key != "sweep"}), flush=True)
                torch.cuda.empty_cache()
            plans = {(n, k): plan for (rows, n, k), plan in best.items() if rows == m}
            result["stack"] += time_stacks(spec, m, plans, "rows_mode", spec == specs[0])
    print(f"\n{result['device']}, read bandwidth {result['read_tbs']:.2f} TB/s")
    print("| spec | M | N x K | rows mode, best (µs) | rows mode, decode's plan | decode + cuBLAS (before) "
          "| stored layout's kernels | bf16 cuBLAS | best plan |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        print(f"| {r['spec']} | {r['M']} | {r['N']}x{r['K']} | {r['rows_mode_us']:.2f} | {r['rows_mode_plan_us']:.2f} "
              f"| {r['dequantize_cublas_us']:.2f} | {r['current_us']:.2f} | {r['bf16_us']:.2f} | {r['best']} |")
    for r in result["stack"]:
        print(f"stack {r['spec']} M={r['M']} {r['impl']}: {r['stack_ms']:.3f} ms")
    return result


def packed_bytes(state) -> int:
    """A (packed, words) state's weight bytes: the packed weight's (words hold the same codes again)."""
    return nbytes(state[0])


def errors(spec: str, n: int, k: int) -> dict:
    packed = random_packed(spec, n, k)
    x = torch.randn(1, k, device=DEVICE).to(torch.bfloat16)
    ref = x.double() @ packed.dequantize(torch.float64).T
    from modelpress.nn import QuantLinear

    current = QuantLinear(packed)(x)
    mma = mma_impl(spec, CONFIGS[0])[1]((packed, mma_layout(packed.qdata, n, k, triton_backend.mma_order(packed))), x)

    def rel(y):
        return ((y.double() - ref).norm() / ref.norm()).item()

    return {"error_current": rel(current), "error_mma": rel(mma)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("mma_gemv.json"))
    parser.add_argument("--specs", default="int4/g128,int4-asym/g128")
    parser.add_argument("--configs", type=int, default=None, help="the first N configurations only (default: all)")
    parser.add_argument("--act", action="store_true", help="also time the MLP's activation in the [gate | up] "
                        "GEMV's epilogue against the GEMV then silu_mul, on the 22016x4096 shape")
    parser.add_argument("--no-split", action="store_true", help="no split-K configurations for the 4096-row shapes")
    parser.add_argument("--shapes", default=None, help="N x K pairs, e.g. 12288x4096,22016x4096 (default: all five)")
    parser.add_argument("--plans", type=plan_list, default=None, help="these plans instead of the lists': "
                        "RT,CS,WR,WK[,SPLIT] separated by ';'")
    parser.add_argument("--depths", type=int, nargs="+", default=[1], help="each plan with these loop steps of "
                        "weights in flight (gluon_mma_gemv's depth: 1 or 2)")
    parser.add_argument("--laid", action="store_true", help="--rows: each plan also with x laid out in fragment "
                        "order (mma_ptx.fragment_order, made outside the timed calls)")
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="time the rows mode at these row counts (2..8) instead (module docstring)")
    args = parser.parse_args()
    torch.manual_seed(0)
    specs = args.specs.split(",")
    if args.rows:
        args.json.write_text(json.dumps(rows_main(args, specs), indent=1))
        return
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "read_tbs": read_bandwidth_tbs(),
              "shapes": [], "stack": []}
    print(json.dumps({k: result[k] for k in ("device", "torch", "read_tbs")}), flush=True)
    best: dict = {}
    for spec in specs:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
        for n, k in shapes:
            row = {"spec": spec, "N": n, "K": k, **errors(spec, n, k)}
            current = time_impl(ours(spec), n, k, 1)
            row["current_us"], row["weight_bytes"] = current["graph_us"], current["weight_bytes"]
            if spec == specs[0]:
                row["bf16_us"] = time_impl(bf16_linear(), n, k, 1)["graph_us"]
                row["torch_int4_us"] = time_impl(torch_int4(), n, k, 1)["graph_us"]
            sweep = {}
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            short = n // 16 < triton_backend.MMA_MIN_TILES_PER_SM * sms
            plans = args.plans or CONFIGS[:args.configs] + (SPLIT_CONFIGS if short and not args.no_split else [])
            for config in with_depths(plans, args.depths):
                try:
                    sweep[json.dumps(config)] = time_impl(mma_impl(spec, config), n, k, 1, packed_bytes)["graph_us"]
                except Exception as exc:  # a configuration that does not compile or fit is reported
                    sweep[json.dumps(config)] = f"{type(exc).__name__}: {exc}"[:160]
            times = {c: t for c, t in sweep.items() if isinstance(t, float)}
            choice = min(times, key=times.get)
            best[(spec, n, k)] = json.loads(choice)
            row.update(mma_best_us=times[choice], mma_best=json.loads(choice), sweep=sweep)
            result["shapes"].append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "sweep"}), flush=True)
            torch.cuda.empty_cache()
        if args.act:
            config = best.get((spec, 22016, 4096), CONFIGS[0])
            row = {"spec": spec, "N": 22016, "K": 4096, "config": config}
            row.update({name: time_impl(impl, 22016, 4096, 1, packed_bytes)["graph_us"]
                        for name, impl in act_impls(spec, config).items()})
            result.setdefault("act", []).append(row)
            print(json.dumps(row), flush=True)
        # the stack as decode runs it: each shape on the GEMV that is faster for it
        plans = {(n, k): plan for (name, n, k), plan in best.items() if name == spec}
        result["stack"] += time_stacks(spec, 1, plans, "mma", spec == specs[0])
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, read bandwidth {result['read_tbs']:.2f} TB/s")
    print("| spec | N x K | current µs | MMA best µs (% of read bandwidth) | MMA / current | bf16 µs "
          "| error current "
          "| error MMA | best config |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in result["shapes"]:
        print(f"| {r['spec']} | {r['N']}x{r['K']} | {r['current_us']:.2f} | {r['mma_best_us']:.2f} | "
              f"{r['mma_best_us'] / r['current_us']:.2f} | {r.get('bf16_us', float('nan')):.2f} | "
              f"{r['error_current']:.1e} | {r['error_mma']:.1e} | {r['mma_best']} |")
    for r in result["stack"]:
        print(f"stack {r['spec']} {r['impl']}: {r['stack_ms']:.3f} ms")
    for r in result.get("act", []):
        print(f"{r['spec']} 22016x4096: GEMV then silu_mul {r['gemv_then_silu_mul']:.2f} µs, activation in the "
              f"epilogue {r['act_in_epilogue']:.2f} µs")


if __name__ == "__main__":
    main()
