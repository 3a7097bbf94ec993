"""Weight-only quantized matmul on CUDA: modelpress's Triton kernels against bf16 cuBLAS, PyTorch's int4
kernel (_weight_int4pack_mm) and FP8 cuBLAS (torch._scaled_mm), per shape and for a Llama-2-7B-shaped
stack of linear layers. Prints a table and writes JSON.

    PYTHONPATH=src python bench/kernels.py --json out.json [--quick]

Timing: CUDA events, warm-up first, median over repeats. Every call in a timed sequence reads its own copy
of the weights (copies together larger than L2), with random data. "graph" times replay a CUDA graph of
the sequence (what a captured decode step pays); "eager" times are the same calls from Python, host
overhead included. Times are per call (per matmul) in microseconds, or per token for the stack.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from modelpress.formats import WeightScheme
from modelpress.formats.packed import PackedWeight
from modelpress.formats.packing import packed_row_bytes
from modelpress.nn.triton_backend import triton_linear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (28672, 8192)]  # (N, K)
LLAMA2_7B_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
# the same layer with its sibling projections fused along N: q/k/v in one weight, gate/up in one (4 launches, not 7)
LLAMA2_7B_FUSED = [(3 * 4096, 4096), (4096, 4096), (2 * 11008, 4096), (4096, 11008)]
LAYERS = 32
READ_CEILING_TBS = 4.2  # the issue's anchor for the H200's read bandwidth (H100: 3.08)
ROTATE_BYTES = 256 << 20  # weight copies per timed sequence add up to at least this (L2 is 50 MB)
DEVICE = torch.device("cuda")


# ---------------------------------------------------------------------------------------------- weights
def random_packed(spec: str, n: int, k: int) -> PackedWeight:
    """A packed weight with random codes and positive random scales, built on the GPU."""
    scheme = WeightScheme.parse(spec)
    g = scheme.group_length(k)
    groups = (1, 1) if scheme.granularity == "tensor" else (n, -(-k // g))
    if scheme.format.startswith("fp8"):
        dtype = torch.float8_e4m3fn if "e4m3" in scheme.format else torch.float8_e5m2
        qdata = torch.zeros(n, packed_row_bytes(k, 8), dtype=torch.uint8, device=DEVICE)
        qdata[:, :k] = torch.randn(n, k, device=DEVICE).to(dtype).view(torch.uint8)
    else:
        qdata = torch.randint(0, 256, (n, packed_row_bytes(k, scheme.bits)), dtype=torch.uint8, device=DEVICE)
    scale = (torch.rand(groups, device=DEVICE) + 0.5).mul(0.01).half()
    offset = -(torch.rand(groups, device=DEVICE) * 0.1).half() if scheme.qformat.affine else None
    return PackedWeight(scheme=scheme, shape=(n, k), qdata=qdata, scale=scale, offset=offset)


def ours(spec: str, half: bool = True):
    """A QuantLinear layer, called as a model calls it (on CUDA in eager mode: its prepared launcher). half=False:
    the Gluon GEMV's float32 products instead of float16 pairs (fixed when the layer prepares its launcher)."""
    from modelpress.nn import QuantLinear, triton_backend

    def build(n, k):
        return QuantLinear(random_packed(spec, n, k))

    def call(layer, x):
        if half:
            return layer(x)
        triton_backend.HALF_PRODUCTS = False
        try:
            return layer(x)
        finally:
            triton_backend.HALF_PRODUCTS = True

    return build, call


def bf16_linear():
    return (lambda n, k: torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)), (lambda w, x: F.linear(x, w))


def torch_int4(group: int = 128, inner_k_tiles: int = 8):
    """PyTorch's tinygemm int4 kernel: weight packed by _convert_weight_to_int4pack (uint8 (N, K/2) input
    on torch >= 2.5), scales and zeros as (K/g, N, 2) bf16."""
    def build(n, k):
        raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
        packed = torch.ops.aten._convert_weight_to_int4pack(raw, inner_k_tiles)
        scales_zeros = (torch.rand(k // group, n, 2, device=DEVICE) * 0.01).to(torch.bfloat16)
        return packed, scales_zeros

    def call(state, x):
        return torch.ops.aten._weight_int4pack_mm(x, state[0], group, state[1])

    return build, call


def fp8_scaled_mm():
    """FP8 e4m3 weights and activations through cuBLAS (activation quantization not timed)."""
    def build(n, k):
        return torch.randn(n, k, device=DEVICE).to(torch.float8_e4m3fn), torch.ones((), device=DEVICE)

    def call(state, x):
        x8 = _fp8_input(x)
        return torch._scaled_mm(x8, state[0].t(), scale_a=state[1], scale_b=state[1], out_dtype=torch.bfloat16)

    return build, call


_FP8_INPUTS: dict = {}


def _fp8_input(x: torch.Tensor) -> torch.Tensor:
    key = (x.data_ptr(), tuple(x.shape))
    if key not in _FP8_INPUTS:
        _FP8_INPUTS[key] = x.to(torch.float8_e4m3fn)
    return _FP8_INPUTS[key]


def nbytes(state) -> int:
    if isinstance(state, PackedWeight):
        return state.nbytes
    if isinstance(state, torch.nn.Module):
        return state.weight_nbytes
    if isinstance(state, tuple):
        return sum(nbytes(s) for s in state)
    return state.numel() * state.element_size()


# ---------------------------------------------------------------------------------------------- timing
def time_sequence(calls, repeats: int = 15) -> dict:
    """Median per-call time (µs) of running `calls` (zero-argument callables) back to back, eagerly
    and replayed from a CUDA graph."""
    for fn in calls:  # warm-up: compilation, cuBLAS handles, allocator
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    eager = []
    for _ in range(max(3, repeats // 3)):
        start.record()
        for fn in calls:
            fn()
        end.record()
        torch.cuda.synchronize()
        eager.append(start.elapsed_time(end) * 1e3 / len(calls))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    replays = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        replays.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return {"eager_us": statistics.median(eager), "graph_us": statistics.median(replays)}


def time_impl(impl, n: int, k: int, m: int, size_of=None) -> dict:
    """Graph-replay and eager µs of impl at (M, N, K), weight copies rotating past L2; size_of(state): the bytes a
    state's weight counts for (default nbytes)."""
    build, call = impl
    first = build(n, k)
    size = (size_of or nbytes)(first)
    states = [first] + [build(n, k) for _ in range(max(0, math.ceil(ROTATE_BYTES / size) - 1))]
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    result = time_sequence([lambda s=s: call(s, x) for s in states])
    result["weight_bytes"] = size
    return result


def read_bandwidth_tbs() -> float:
    """Device read bandwidth from a large reduction (bytes read / time)."""
    data = torch.randn(1 << 30, device=DEVICE, dtype=torch.bfloat16)
    timing = time_sequence([lambda: data.sum(dtype=torch.float32)], repeats=10)
    return data.numel() * 2 / (timing["graph_us"] * 1e-6) / 1e12


def host_overhead_us(calls: int = 2000) -> dict:
    """Wall-clock time per eager call on a tiny layer (GPU work negligible): the Python + launch cost."""
    import time

    from modelpress.nn import QuantLinear

    packed = random_packed("int4/g128", 256, 256)
    layer = QuantLinear(packed)
    x = torch.randn(1, 256, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(256, 256, device=DEVICE, dtype=torch.bfloat16)
    int4_build, int4_call = torch_int4()
    int4_state = int4_build(256, 256)
    cases = {"QuantLinear (int4/g128)": lambda: layer(x), "triton_linear": lambda: triton_linear(x, packed, None),
             "F.linear bf16": lambda: F.linear(x, weight), "torch-int4": lambda: int4_call(int4_state, x)}
    result = {}
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        result[name] = (time.perf_counter() - start) / calls * 1e6
    return result


# ---------------------------------------------------------------------------------------------- runs
def run_shapes(impls: dict, ms: list[int], shapes=SHAPES) -> list[dict]:
    rows = []
    for n, k in shapes:
        for m in ms:
            for name, impl in impls.items():
                try:
                    row = {"impl": name, "N": n, "K": k, "M": m, **time_impl(impl, n, k, m)}
                except Exception as exc:  # a baseline missing on this torch is reported, not fatal
                    row = {"impl": name, "N": n, "K": k, "M": m, "error": f"{type(exc).__name__}: {exc}"[:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    return rows


def run_stack(impls: dict, ms: list[int], layer=LLAMA2_7B_LAYER) -> list[dict]:
    """Per-token time of the 7B stack: 32 layers x (q, k, v, o, gate, up, down), each weight distinct (or the
    layer given, e.g. LLAMA2_7B_FUSED)."""
    rows = []
    for name, (build, call) in impls.items():
        try:
            weights = [(build(n, k), k) for _ in range(LAYERS) for n, k in layer]
        except Exception as exc:
            rows.append({"impl": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        for m in ms:
            xs = {k: torch.randn(m, k, device=DEVICE).to(torch.bfloat16) for k in (4096, 11008)}
            try:
                t = time_sequence([lambda s=s, k=k: call(s, xs[k]) for s, k in weights], repeats=10)
                row = {"impl": name, "M": m, "layers": "fused" if layer is LLAMA2_7B_FUSED else "7 per block",
                       "eager_ms": t["eager_us"] * len(weights) / 1e3,
                       "graph_ms": t["graph_us"] * len(weights) / 1e3,
                       "weight_gb": sum(nbytes(s) for s, _ in weights) / 1e9}
            except Exception as exc:
                row = {"impl": name, "M": m, "error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    return rows


def format_tables(result: dict) -> str:
    lines = [f"GPU: {result['device']}, torch {result['torch']}, triton {result['triton']}; "
             f"measured read bandwidth {result['read_tbs']:.2f} TB/s (anchor {READ_CEILING_TBS} TB/s)", ""]
    by = {(r["impl"], r["N"], r["K"], r["M"]): r for r in result["shapes"]}
    names = list(dict.fromkeys(r["impl"] for r in result["shapes"]))
    lines.append("| N x K | M | " + " | ".join(names) + " | ours eager | ours % of read ceiling |")
    lines.append("|---|---|" + "---|" * (len(names) + 2))
    for n, k in SHAPES:
        for m in sorted({r["M"] for r in result["shapes"]}):
            cells = []
            for name in names:
                r = by.get((name, n, k, m), {})
                cells.append(f"{r['graph_us']:.1f}" if "graph_us" in r else "n/a")
            main = by.get(("int4/g128", n, k, m), {})
            eager = f"{main['eager_us']:.1f}" if "eager_us" in main else "n/a"
            pct = (f"{100 * main['weight_bytes'] / (main['graph_us'] * 1e-6) / (READ_CEILING_TBS * 1e12):.0f}%"
                   if "graph_us" in main else "n/a")
            lines.append(f"| {n}x{k} | {m} | " + " | ".join(cells) + f" | {eager} | {pct} |")
    lines += ["", "Host time per eager call on a tiny layer (µs): " + ", ".join(
        f"{k} {v:.1f}" for k, v in result.get("host_overhead_us", {}).items())]
    lines += ["", "Llama-2-7B stack (224 matmuls, or 128 with siblings fused), per token, ms:", "",
              "| impl | layers | M | graph | eager | weights GB |", "|---|---|---|---|---|---|"]
    for r in result["stack"]:
        if "graph_ms" in r:
            lines.append(f"| {r['impl']} | {r['layers']} | {r['M']} | {r['graph_ms']:.3f} | {r['eager_ms']:.3f} "
                         f"| {r['weight_gb']:.2f} |")
        else:
            lines.append(f"| {r['impl']} | | {r.get('M', '')} | {r['error']} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("kernels.json"))
    parser.add_argument("--quick", action="store_true", help="the three 7B shapes only")
    parser.add_argument("--ms", default="1,16,256,2048")
    parser.add_argument("--stack-only", action="store_true", help="skip the per-shape tables")
    parser.add_argument("--fused", action="store_true",
                        help="also time the stack with q/k/v and gate/up fused into one weight each (4 matmuls a block)")
    parser.add_argument("--float32-products", action="store_true",
                        help="also time the Gluon GEMV with float32 products (half=False) for int4/g128 and int4-asym/g128")
    args = parser.parse_args(argv)
    import triton

    torch.manual_seed(0)
    ms = [int(v) for v in args.ms.split(",")]
    impls = {"bf16": bf16_linear(), "torch-int4": torch_int4(), "fp8-cublas": fp8_scaled_mm(),
             "int4/g128": ours("int4/g128")}
    formats = {spec: ours(spec) for spec in ("int4-asym/g128", "int4/g32", "nf4/g64", "int8/channel",
                                            "fp8-e4m3/channel")}
    if args.float32_products:  # the Gluon GEMV's earlier inner product, beside the float16-pair one
        formats |= {f"{spec} f32": ours(spec, half=False) for spec in ("int4/g128", "int4-asym/g128")}
    shapes = SHAPES[:3] if args.quick else SHAPES  # --quick: the three Llama-2-7B shapes
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "read_tbs": read_bandwidth_tbs(), "host_overhead_us": host_overhead_us()}
    print(json.dumps(result), flush=True)
    result["shapes"] = [] if args.stack_only else run_shapes(impls, ms, shapes) + run_shapes(formats, [1, 16], shapes)
    stack = {k: impls[k] for k in ("bf16", "torch-int4", "fp8-cublas", "int4/g128")} | {"nf4/g64": formats["nf4/g64"]}
    if args.float32_products:
        stack |= {k: formats[k] for k in ("int4/g128 f32",)}
    result["stack"] = run_stack(stack, [1, 16])
    if args.fused:
        result["stack"] += run_stack(stack, [1, 16], LLAMA2_7B_FUSED)
    args.json.write_text(json.dumps(result, indent=1))
    print(format_tables(result))


if __name__ == "__main__":
    main()
