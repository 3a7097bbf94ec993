"""Prefill-sized matmuls on CUDA (issue 13, item 4): the quantized paths against bf16 cuBLAS at M >= 256.

    PYTHONPATH=src python bench/prefill.py --json prefill.json            # the table
    PYTHONPATH=src python bench/prefill.py --sweep --json sweep.json      # tiles of the new kernels first

Rows, each timed as a model calls it (activation quantization included where the path quantizes them):
- bf16: F.linear on a bf16 weight (cuBLAS).
- int4/g128 dequant: QuantLinear's plan before this bench (dequantize kernel, then cuBLAS).
- int4/g128 weight-first: triton_kernels.quant_matmul_t_kernel (decoded weight as the first MMA operand).
- w8a8 int_mm: DynamicInt8Linear as it was (per-token quantization kernel, torch._int_mm, rescale kernel).
- w8a8 fused: per-token quantization, then triton_int8.scaled_matmul reading the stored offset-binary codes.
- fp8 weight-only: QuantLinear fp8-e4m3/channel (dequantize, then cuBLAS; activations stay bf16).
- fp8 dynamic scaled_mm: fp8 per-token activations, torch._scaled_mm with row-wise scales (CUTLASS).
- fp8 dynamic fused: fp8 per-token activations, triton_int8.scaled_matmul.
Timing as bench/kernels.py: CUDA-graph replay over weight copies larger than L2, random data, medians, µs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kernels import DEVICE, SHAPES, bf16_linear, random_packed, time_impl  # noqa: E402

from modelpress.nn import QuantLinear  # noqa: E402
from modelpress.nn.triton_backend import KernelConfig, dequantize, fused_matmul  # noqa: E402

MS = [256, 512, 1024, 2048]


def quant_layer(spec: str, config: KernelConfig | None = None):
    def build(n, k):
        return QuantLinear(random_packed(spec, n, k)) if config is None else random_packed(spec, n, k)

    def call(state, x):
        return state(x) if config is None else fused_matmul(x, state, None, config)

    return build, call


def w8a8(kernel: str, tile=None):
    from modelpress.nn import triton_int8
    from modelpress.nn.dynamic import DynamicInt8Linear

    def build(n, k):
        packed = random_packed("int8/channel", n, k)
        return DynamicInt8Linear(packed) if kernel == "int_mm" else packed

    def call(state, x):
        if kernel == "int_mm":
            return state(x)
        codes, sx = triton_int8.quantize_rows(x)
        return triton_int8.scaled_matmul(codes, sx, state.qdata, state.scale, None, x.dtype, flip=True, tile=tile)

    return build, call


def fp8_dynamic(kernel: str, tile=None, fast_accum: bool = False):
    from modelpress.nn import triton_int8

    def build(n, k):
        packed = random_packed("fp8-e4m3/channel", n, k)
        codes = packed.qdata[:, :k].view(torch.float8_e4m3fn)
        return codes, packed.scale, packed.scale.float().reshape(1, -1).contiguous()

    def call(state, x):
        codes, sx = triton_int8.quantize_rows(x, fp8=True)
        if kernel == "scaled_mm":
            return torch._scaled_mm(codes, state[0].t(), scale_a=sx, scale_b=state[2], out_dtype=x.dtype)
        return triton_int8.scaled_matmul(codes, sx, state[0], state[1], None, x.dtype, tile=tile,
                                         fast_accum=fast_accum)

    return build, call


# ---------------------------------------------------------------------------------------------- sweeps
WEIGHT_FIRST = [  # (BN weight rows, BM tokens, BKG, warps, stages)
    (128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (128, 64, 128, 4, 3), (64, 128, 128, 4, 4), (256, 64, 128, 8, 3),
]
GEMM_TILES = [  # (BM, BN, BK, GROUP_M, warps, stages)
    (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 128, 128, 8, 4, 4),
    (128, 64, 128, 8, 4, 4), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4), (128, 256, 64, 8, 8, 4),
    (64, 64, 256, 8, 4, 4), (16, 64, 256, 1, 4, 4), (16, 128, 128, 1, 4, 4), (32, 64, 256, 1, 4, 4),
]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def weight_first_sweep(spec: str, shapes, ms) -> list[dict]:
    rows = []
    for n, k in shapes:
        packed = random_packed(spec, n, k)
        for m in ms:
            x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
            ref = F.linear(x.float(), dequantize(packed, torch.float32))
            for bn, bm, bkg, warps, stages in WEIGHT_FIRST:
                for interleave in (True, False):
                    config = KernelConfig(BM=bm, BN=bn, BKG=bkg, num_warps=warps, num_stages=stages,
                                          weight_first=True, interleave=interleave)
                    row = {"spec": spec, "N": n, "K": k, "M": m, "config": [bn, bm, bkg, warps, stages, interleave]}
                    try:
                        row["rel_err"] = _rel_err(fused_matmul(x, packed, None, config), ref)
                        row |= time_impl(quant_layer(spec, config), n, k, m)
                    except Exception as exc:  # a config that does not compile is reported
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def gemm_sweep(shapes, ms) -> list[dict]:
    from modelpress.nn import triton_int8
    from modelpress.nn.dynamic import int8_weight

    rows = []
    for n, k in shapes:
        int8 = random_packed("int8/channel", n, k)
        fp8 = random_packed("fp8-e4m3/channel", n, k)
        w8 = fp8.qdata[:, :k].view(torch.float8_e4m3fn)
        for m in ms:
            x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
            codes, sx = triton_int8.quantize_rows(x)
            ref_int = triton_int8.rescale(torch._int_mm(codes, int8_weight(int8).t()), sx, int8.scale, None,
                                          torch.bfloat16) if m > 16 else None
            codes8, sx8 = triton_int8.quantize_rows(x, fp8=True)
            ref_fp8 = (codes8.float() @ w8.float().t()) * sx8 * fp8.scale.float().reshape(1, -1)
            for bm, bn, bk, group, warps, stages in GEMM_TILES:
                if bm > 2 * max(m, 16) or (m >= 256 and bm < 64):
                    continue
                tile = triton_int8.GemmTile(BM=bm, BN=bn, BK=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
                for name, impl in (("w8a8 fused", w8a8("fused", tile)), ("fp8 fused", fp8_dynamic("fused", tile)),
                                   ("fp8 fused fast", fp8_dynamic("fused", tile, fast_accum=True))):
                    row = {"impl": name, "N": n, "K": k, "M": m, "tile": [bm, bn, bk, group, warps, stages]}
                    try:
                        if name == "w8a8 fused":
                            got = triton_int8.scaled_matmul(codes, sx, int8.qdata, int8.scale, None, torch.bfloat16,
                                                            flip=True, tile=tile)
                            row["exact"] = None if ref_int is None else bool(torch.equal(got, ref_int))
                        else:
                            got = triton_int8.scaled_matmul(codes8, sx8, w8, fp8.scale, None, torch.bfloat16,
                                                            tile=tile, fast_accum=name.endswith("fast"))
                            row["rel_err"] = _rel_err(got, ref_fp8)
                        row |= time_impl(impl, n, k, m)
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def best(rows: list[dict], key) -> dict:
    """Per key(row), the row with the least graph time."""
    out: dict = {}
    for row in rows:
        if "graph_us" in row and (key(row) not in out or row["graph_us"] < out[key(row)]["graph_us"]):
            out[key(row)] = row
    return out


# ---------------------------------------------------------------------------------------------- table
def table(shapes, ms, weight_first: KernelConfig | None) -> list[dict]:
    impls = {"bf16": bf16_linear(), "int4/g128 dequant": quant_layer("int4/g128"),
             "w8a8 int_mm": w8a8("int_mm"), "w8a8 fused": w8a8("fused"),
             "fp8 weight-only": quant_layer("fp8-e4m3/channel"), "fp8 dynamic scaled_mm": fp8_dynamic("scaled_mm"),
             "fp8 dynamic fused": fp8_dynamic("fused")}
    if weight_first is not None:
        impls["int4/g128 weight-first"] = quant_layer("int4/g128", weight_first)
    rows = []
    for n, k in shapes:
        for m in ms:
            for name, impl in impls.items():
                try:
                    row = {"impl": name, "N": n, "K": k, "M": m, **time_impl(impl, n, k, m)}
                except Exception as exc:
                    row = {"impl": name, "N": n, "K": k, "M": m, "error": f"{type(exc).__name__}: {exc}"[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["| N x K | M | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    cells: dict = {}
    for r in rows:
        cells[(r["N"], r["K"], r["M"], r["impl"])] = r.get("graph_us")
    for n, k, m in dict.fromkeys((r["N"], r["K"], r["M"]) for r in rows):
        base = cells.get((n, k, m, "bf16"))
        out = []
        for name in names:
            t = cells.get((n, k, m, name))
            out.append("-" if t is None else (f"{t:.1f}" if name == "bf16" or not base else f"{t:.1f} ({t / base:.2f}x)"))
        lines.append(f"| {n}x{k} | {m} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("prefill.json"))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--sweep", action="store_true", help="sweep the new kernels' tiles first")
    parser.add_argument("--sweep-ms", default="16,256,1024,2048")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shapes = SHAPES[:3]
    ms = [int(v) for v in args.ms.split(",")]
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    weight_first = None
    if args.sweep:
        sweep_ms = [int(v) for v in args.sweep_ms.split(",")]
        result["weight_first_sweep"] = weight_first_sweep("int4/g128", shapes, [m for m in sweep_ms if m >= 256])
        result["gemm_sweep"] = gemm_sweep(shapes, sweep_ms)
        args.json.write_text(json.dumps(result, indent=1))
        wins = best(result["weight_first_sweep"], lambda r: tuple(r["config"]))
        totals = {}
        for cfg in wins:
            rows = [r for r in result["weight_first_sweep"] if tuple(r["config"]) == cfg and "graph_us" in r]
            totals[cfg] = sum(r["graph_us"] for r in rows) if len(rows) == 3 * len([m for m in sweep_ms if m >= 256]) else float("inf")
        if totals:
            bn, bm, bkg, warps, stages, inter = min(totals, key=totals.get)
            weight_first = KernelConfig(BM=bm, BN=bn, BKG=bkg, num_warps=warps, num_stages=stages,
                                        weight_first=True, interleave=inter)
            result["weight_first_choice"] = [bn, bm, bkg, warps, stages, inter]
        for key, row in sorted(best(result["gemm_sweep"], lambda r: (r["impl"], r["N"], r["K"], r["M"])).items()):
            print("best", key, row["tile"], f"{row['graph_us']:.1f} us", flush=True)
        for key, row in sorted(best(result["weight_first_sweep"], lambda r: (r["N"], r["K"], r["M"])).items()):
            print("best weight-first", key, row["config"], f"{row['graph_us']:.1f} us", flush=True)
    result["table"] = table(shapes, ms, weight_first)
    args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result["table"]))


if __name__ == "__main__":
    main()
