"""Prefill-sized matmuls on CUDA (issue 13, item 4): the quantized paths against bf16 cuBLAS at M >= 256.

    PYTHONPATH=src python bench/prefill.py --json prefill.json            # the table
    PYTHONPATH=src python bench/prefill.py --sweep --json sweep.json      # tiles of the new kernels first
    PYTHONPATH=src python bench/prefill.py --ms 256 --model --json m.json  # and a 7B-shaped model's prefill

Rows, each timed as a model calls it (activation quantization included where the path quantizes them):
- bf16: F.linear on a bf16 weight (cuBLAS).
- int4/g128 dequant: QuantLinear's plan before this bench (dequantize kernel, then cuBLAS).
- w8a8 int_mm (before): DynamicInt8Linear's path before (per-token quantization kernel, a signed copy of the
  codes, torch._int_mm, rescale kernel).
- w8a8 layer: DynamicInt8Linear now (per-token quantization, triton_int8.scaled_matmul on the stored codes).
- fp8 weight-only: QuantLinear fp8-e4m3/channel (dequantize, then cuBLAS; activations stay bf16).
- fp8 dynamic scaled_mm: fp8 per-token activations, torch._scaled_mm with row-wise scales (CUTLASS).
- fp8 dynamic layer: DynamicFp8Linear (fp8 per-token activations, triton_int8.scaled_matmul).
With --sweep, the layers run the tiles the sweep found best per M (triton_int8.gemm_tile is replaced).
Timing as bench/kernels.py: CUDA-graph replay over weight copies larger than L2, random data, medians, µs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kernels import DEVICE, SHAPES, bf16_linear, random_packed, run_shapes, time_impl  # noqa: E402

from modelpress.nn import QuantLinear  # noqa: E402

MS = [256, 512, 1024, 2048]


def quant_layer(spec: str):
    return (lambda n, k: QuantLinear(random_packed(spec, n, k))), (lambda layer, x: layer(x))


def w8a8(kernel: str, tile=None, flip: bool = True):
    """kernel "layer": DynamicInt8Linear as a model calls it; "int_mm": the path before (quantization kernel,
    torch._int_mm on a signed copy of the codes, rescale kernel); "fused": scaled_matmul with `tile`."""
    from modelpress.nn import triton_int8
    from modelpress.nn.dynamic import DynamicInt8Linear, int8_matmul, int8_weight

    def build(n, k):
        packed = random_packed("int8/channel", n, k)
        if kernel == "layer":
            return DynamicInt8Linear(packed)
        return packed if flip else (int8_weight(packed).contiguous(), packed.scale)

    def call(state, x):
        if kernel == "layer":
            return state(x)
        codes, sx = triton_int8.quantize_rows(x)
        if kernel == "int_mm":
            return triton_int8.rescale(int8_matmul(codes, int8_weight(state)), sx, state.scale, None, x.dtype)
        if not flip:   # a signed copy of the codes made at build time: what a re-layout at load would give
            return triton_int8.scaled_matmul(codes, sx, state[0], state[1], None, x.dtype, tile=tile)
        return triton_int8.scaled_matmul(codes, sx, state.qdata, state.scale, None, x.dtype, flip=True, tile=tile)

    return build, call


def fp8_dynamic(kernel: str, tile=None, fast_accum: bool = False):
    """kernel "layer": DynamicFp8Linear; "scaled_mm": torch._scaled_mm with row-wise scales; "fused":
    scaled_matmul with `tile`."""
    from modelpress.nn import triton_int8
    from modelpress.nn.dynamic_fp8 import DynamicFp8Linear

    def build(n, k):
        packed = random_packed("fp8-e4m3/channel", n, k)
        if kernel == "layer":
            return DynamicFp8Linear(packed)
        codes = packed.qdata[:, :k].view(torch.float8_e4m3fn)
        return codes, packed.scale, packed.scale.float().reshape(1, -1).contiguous()

    def call(state, x):
        if kernel == "layer":
            return state(x)
        codes, sx = triton_int8.quantize_rows(x, fp8=True)
        if kernel == "scaled_mm":
            return torch._scaled_mm(codes, state[0].t(), scale_a=sx, scale_b=state[2], out_dtype=x.dtype)
        return triton_int8.scaled_matmul(codes, sx, state[0], state[1], None, x.dtype, tile=tile,
                                         fast_accum=fast_accum)

    return build, call


# ---------------------------------------------------------------------------------------------- sweeps
GEMM_TILES = [  # (BM, BN, BK, GROUP_M, warps, stages)
    (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 128, 128, 8, 4, 4),
    (128, 64, 128, 8, 4, 4), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4), (128, 256, 64, 8, 8, 4),
    (64, 64, 256, 8, 4, 4), (16, 64, 256, 1, 4, 4), (16, 128, 128, 1, 4, 4), (32, 64, 256, 1, 4, 4),
    (128, 128, 128, 8, 8, 4), (256, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3),
]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


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
                for name, impl in (("w8a8 fused", w8a8("fused", tile)), ("w8a8 signed", w8a8("fused", tile, flip=False)),
                                   ("fp8 fused", fp8_dynamic("fused", tile)),
                                   ("fp8 fused fast", fp8_dynamic("fused", tile, fast_accum=True))):
                    row = {"impl": name, "N": n, "K": k, "M": m, "tile": [bm, bn, bk, group, warps, stages]}
                    try:
                        if name.startswith("w8a8"):
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


SWEPT: dict = {}


def use_swept_tiles(rows: list[dict], ms: list[int]) -> None:
    """Per swept M, the tile with the least total time over shapes: of w8a8 and fp8 (precise) together up to
    64 rows, of w8a8 alone above (DynamicFp8Linear takes torch._scaled_mm there); the layers then use the tile
    of the largest swept M not above theirs."""
    from modelpress.nn import triton_int8

    for m in ms:
        totals: dict = {}
        for r in rows:
            kinds = ("w8a8 fused", "fp8 fused") if m <= 64 else ("w8a8 fused",)
            if r["M"] == m and "graph_us" in r and r["impl"] in kinds:
                totals.setdefault(tuple(r["tile"]), []).append(r["graph_us"])
        full = {t: sum(v) for t, v in totals.items() if len(v) == max(len(v) for v in totals.values())}
        if full:
            bm, bn, bk, group, warps, stages = min(full, key=full.get)
            SWEPT[m] = triton_int8.GemmTile(BM=bm, BN=bn, BK=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
    if SWEPT:
        def swept(m: int, n: int):
            below = [s for s in SWEPT if s <= m]
            return SWEPT[max(below) if below else min(SWEPT)]

        triton_int8.gemm_tile = swept


def best(rows: list[dict], key) -> dict:
    """Per key(row), the row with the least graph time."""
    out: dict = {}
    for row in rows:
        if "graph_us" in row and (key(row) not in out or row["graph_us"] < out[key(row)]["graph_us"]):
            out[key(row)] = row
    return out


# ---------------------------------------------------------------------------------------------- table
def table(shapes, ms) -> list[dict]:
    impls = {"bf16": bf16_linear(), "int4/g128 dequant": quant_layer("int4/g128"),
             "w8a8 int_mm (before)": w8a8("int_mm"), "w8a8 layer": w8a8("layer"),
             "fp8 weight-only": quant_layer("fp8-e4m3/channel"), "fp8 dynamic scaled_mm": fp8_dynamic("scaled_mm"),
             "fp8 dynamic layer": fp8_dynamic("layer")}
    return run_shapes(impls, ms, shapes)


# ---------------------------------------------------------------------------------------------- a model
LLAMA_7B_8_BLOCKS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                         num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096)


@torch.no_grad()
def model_rows(shapes: list[tuple[int, int]], repeats: int = 10) -> list[dict]:
    """Prefill of a random Llama-2-7B-shaped model (8 blocks, bf16, the head left float) through transformers'
    forward, per way of storing its linear layers: median ms per forward over `repeats` after two warm-ups,
    CUDA events, eager (no graph: a prefill runs once per prompt)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelpress.algorithms.quantize import Fp8DynamicConfig, RTNConfig, quantize_fp8_dynamic, quantize_rtn
    from modelpress.nn.dynamic import DynamicInt8Config, quantize_dynamic

    ways = {"bf16": None, "int4/g128": lambda m: quantize_rtn(m, RTNConfig("int4/g128")),
            "w8a8": lambda m: quantize_dynamic(m, DynamicInt8Config(skip=("lm_head",))), "fp8-dynamic": lambda m: quantize_fp8_dynamic(m, Fp8DynamicConfig())}
    rows = []
    for name, make in ways.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B_8_BLOCKS)).to(DEVICE, torch.bfloat16).eval()
        if make is not None:
            make(model)
        for batch, tokens in shapes:
            ids = torch.randint(0, 32000, (batch, tokens), device=DEVICE)
            for _ in range(2):
                model(input_ids=ids, use_cache=False)
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(input_ids=ids, use_cache=False)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            row = {"model": name, "batch": batch, "tokens": tokens, "ms": sorted(times)[len(times) // 2]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("prefill.json"))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--sweep", action="store_true", help="sweep the new kernels' tiles first")
    parser.add_argument("--sweep-ms", default="16,256,1024,2048")
    parser.add_argument("--model", action="store_true",
                        help="also time prefill of a 7B-shaped model (8 blocks) stored each way, 1 x 2048 and 8 x 512")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/prefill.py times CUDA kernels: no CUDA device here, nothing to measure.")
        return 1
    torch.manual_seed(0)
    shapes = SHAPES[:3]
    ms = [int(v) for v in args.ms.split(",")]
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.sweep:
        sweep_ms = [int(v) for v in args.sweep_ms.split(",")]
        result["gemm_sweep"] = gemm_sweep(shapes, sweep_ms)
        args.json.write_text(json.dumps(result, indent=1))
        use_swept_tiles(result["gemm_sweep"], sweep_ms)
        result["gemm_tile_choice"] = {str(m): list(t.__dict__.values()) for m, t in SWEPT.items()}
        for key, row in sorted(best(result["gemm_sweep"], lambda r: (r["impl"], r["N"], r["K"], r["M"])).items()):
            print("best", key, row["tile"], f"{row['graph_us']:.1f} us", flush=True)
    result["table"] = table(shapes, ms)
    args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result["table"]))
    if args.model:
        result["model"] = model_rows([(1, 2048), (8, 512), (1, 256)])
        args.json.write_text(json.dumps(result, indent=1))
        base = {(r["batch"], r["tokens"]): r["ms"] for r in result["model"] if r["model"] == "bf16"}
        for r in result["model"]:
            print(f"{r['model']:12s} {r['batch']} x {r['tokens']:5d}: {r['ms']:8.2f} ms "
                  f"({r['ms'] / base[(r['batch'], r['tokens'])]:.2f}x bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
