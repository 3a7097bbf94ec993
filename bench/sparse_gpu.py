"""Benchmark: 2:4 sparse layers on a CUDA GPU (PyTorch semi-structured sparse tensors: cuSPARSELt, or
CUTLASS where cuSPARSELt is missing) against the same layers dense, float16.

Two parts:
1. single matrices: y = x Wᵀ for the weight shapes of SmolLM2-135M and of a 7B-class Llama, at M = 1
   (decode), 16, 256, 512, 2048 and 8192 rows of x (prefill; --m picks), dense F.linear against SparseLinear's 2:4 path;
2. whole models built from configs (SmolLM2-135M's shapes, and a 1B-class Llama), random weights (speed
   does not depend on the values), every decoder linear layer pruned 2:4 by magnitude: prefill of 1 x 512,
   1 x 256, 1 x 2048, 8 x 512 and 16 x 2048 tokens, and greedy decode (one token per step with a KV cache).
3. W8A8 with 2:4 weights (--parts int8-matrices int8-models): DynamicInt8Linear layers whose int8 weights are
   2:4, multiplied by torch._int_mm (dense) and by cuSPARSELt (`use_semi_structured`, same int32 result),
   next to fp16; whole 1B- and 7B-shaped models (the latter 8 blocks) for prefill and decode.
Times are medians of CUDA-event timings after warm-up, eager (what a caller of the layer gets, host-side
dispatch included); for single matrices also replayed from a CUDA graph (the GPU work alone). Nothing here needs the default model or a network,
so it runs unchanged on a bare GPU machine:

    PYTHONPATH=src python3 bench/sparse_gpu.py [--json bench/results/sparse_gpu_h100.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from modelpress.algorithms.prune import MagnitudeConfig, prune
from modelpress.algorithms.prune.masks import NMPattern, nm_mask
from modelpress.nn import dynamic
from modelpress.nn.dynamic import DynamicInt8Config, DynamicInt8Linear, int8_matmul, int8_weight, quantize_dynamic
from modelpress.nn.sparse_linear import SparseLinear

MATRICES = {  # name -> (out_features, in_features)
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "7b q/o 4096x4096": (4096, 4096),
    "7b gate/up 11008x4096": (11008, 4096),
    "7b down 4096x11008": (4096, 11008),
}
ROWS = (1, 16, 256, 512, 2048, 8192)
MODELS = {
    "llama-7b-shape": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 8,
                       "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128},
    "smollm2-135m-shape": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64},
    "llama-1b-shape": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
}


_GRAPHS = {"ok": True}  # a failed capture can leave the stream unusable for capture: stop trying after one


def graph_time(fn, repeats: int) -> float | None:
    """Like cuda_time, but replaying a CUDA graph of fn: the host-side cost of each call is gone, so this
    is the GPU work alone. None where capture fails (and, after one failure, for the rest of the run)."""
    if not _GRAPHS["ok"]:
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return cuda_time(graph.replay, repeats)
    except (RuntimeError, NotImplementedError) as err:
        _GRAPHS["ok"] = False
        torch.cuda.synchronize()
        print(f"  (CUDA graph capture failed, graphs off from here: {str(err).splitlines()[0]})", flush=True)
        return None


def cuda_time(fn, repeats: int = 20, warmup: int = 5) -> float:
    """Median seconds of fn() over `repeats` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


@torch.no_grad()
def matrix_rows(rows: tuple[int, ...], repeats: int) -> list[dict]:
    results = []
    for name, (n, k) in MATRICES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
        mask = nm_mask(weight.abs().float(), NMPattern(2, 4))
        dense = weight * mask
        layer = SparseLinear.from_dense(dense, mask, None, (2, 4)).cuda()
        layer.use_semi_structured = True  # opt-in: the point of this benchmark
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            y_sparse = layer(x)
            used = layer.use_semi_structured
            error = float((y_sparse.float() - F.linear(x, dense).float()).abs().max())
            run_dense = functools.partial(F.linear, x, dense)
            run_sparse = functools.partial(layer, x)
            t_dense, t_sparse = cuda_time(run_dense, repeats), cuda_time(run_sparse, repeats)
            g_dense = graph_time(run_dense, repeats)
            g_sparse = graph_time(run_sparse, repeats) if used else None
            kernel_speedup = g_dense / g_sparse if g_dense and g_sparse else None
            results.append({"matrix": name, "M": m, "dense_us": t_dense * 1e6, "sparse_us": t_sparse * 1e6,
                            "speedup": t_dense / t_sparse, "graph_dense_us": g_dense and g_dense * 1e6,
                            "graph_sparse_us": g_sparse and g_sparse * 1e6, "graph_speedup": kernel_speedup,
                            "kernel": layer.semi_structured_backend if used else "dense fallback",
                            "max_abs_error": error})
            graph = f"graphs x{kernel_speedup:5.2f}" if kernel_speedup else "graphs n/a"
            print(f"{name:26s} M={m:5d}  dense {t_dense * 1e6:9.1f} us  2:4 {t_sparse * 1e6:9.1f} us  "
                  f"eager x{t_dense / t_sparse:5.2f}  {graph}  {results[-1]['kernel']}", flush=True)
    return results


def two_four(weight: torch.Tensor) -> torch.Tensor:
    return weight * nm_mask(weight.abs().float(), NMPattern(2, 4)).to(weight.dtype)


def set_sparse(model, on: bool) -> int:
    layers = [m for m in model.modules() if isinstance(m, DynamicInt8Linear)]
    for layer in layers:
        layer.use_semi_structured = on
    return len(layers)


@torch.no_grad()
def int8_matrix_rows(rows: tuple[int, ...], repeats: int) -> list[dict]:
    """W8A8 (int8 weights per row, int8 activations per token): the same 2:4 int8 layer through
    torch._int_mm (dense) and through cuSPARSELt (sparse), next to the fp16 layer, under CUDA graphs."""
    results = []
    for name, (n, k) in MATRICES.items():
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
        linear.weight.copy_(two_four(torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5))
        layer = DynamicInt8Linear.from_linear(linear, DynamicInt8Config().scheme)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            layer.use_semi_structured = False
            y_dense = layer(x)
            g_fp16 = graph_time(functools.partial(F.linear, x, linear.weight), repeats)
            dynamic.FUSED_CUDA = False  # plain PyTorch quantize / rescale around the same matmul
            g_unfused = graph_time(functools.partial(layer, x), repeats)
            dynamic.FUSED_CUDA = True
            g_int8 = graph_time(functools.partial(layer, x), repeats)
            layer.use_semi_structured = True
            y_sparse = layer(x)
            on_kernel = layer.__dict__["_semi"][1] is not None
            g_sparse = graph_time(functools.partial(layer, x), repeats)
            eager = cuda_time(functools.partial(layer, x), max(3, repeats // 4), warmup=2)
            codes = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)  # the matmul alone
            weight = int8_weight(layer.packed)
            g_mm = graph_time(functools.partial(int8_matmul, codes, weight), repeats)
            g_cslt = graph_time(functools.partial(layer.__dict__["_semi"][1], codes), repeats) if on_kernel else None
            row = {"matrix": name, "M": m, "fp16_us": g_fp16 and g_fp16 * 1e6, "w8a8_dense_us": g_int8 and g_int8 * 1e6,
                   "w8a8_dense_unfused_us": g_unfused and g_unfused * 1e6,
                   "w8a8_2_4_us": g_sparse and g_sparse * 1e6, "w8a8_2_4_eager_us": eager * 1e6,
                   "int_mm_us": g_mm and g_mm * 1e6, "cslt_int8_us": g_cslt and g_cslt * 1e6,
                   "sparse_kernel": on_kernel, "identical_to_dense_int8": bool(torch.equal(y_dense, y_sparse))}
            if g_fp16 and g_int8 and g_sparse:
                row.update(speedup_vs_int8=g_int8 / g_sparse, speedup_vs_fp16=g_fp16 / g_sparse)
            if g_mm and g_cslt:
                row["kernel_speedup"] = g_mm / g_cslt
            results.append(row)
            ratio = (f"2:4 vs int8 x{row['speedup_vs_int8']:5.2f}  vs fp16 x{row['speedup_vs_fp16']:5.2f}"
                     if "speedup_vs_int8" in row else "graphs n/a")
            print(f"W8A8 {name:26s} M={m:5d}  fp16 {row['fp16_us'] or 0:8.1f} us  int8 unfused "
                  f"{row['w8a8_dense_unfused_us'] or 0:8.1f} us  int8 {row['w8a8_dense_us'] or 0:8.1f} us"
                  f"  int8 2:4 {row['w8a8_2_4_us'] or 0:8.1f} us  {ratio}  eager 2:4 {eager * 1e6:8.1f} us"
                  f"  matmul alone x{row.get('kernel_speedup', float('nan')):5.2f}"
                  f"  identical={row['identical_to_dense_int8']}", flush=True)
    return results


@torch.no_grad()
def int8_model_rows(repeats: int, decode_steps: int, names: tuple[str, ...]) -> list[dict]:
    """Whole models, every decoder linear layer 2:4 (magnitude) then W8A8: prefill under a CUDA graph (the
    GPU work) and eager, dense int8 matmul vs cuSPARSELt, next to the fp16 model with the same 2:4 weights;
    decode M=1 eager with the KV cache."""
    results = []
    for name in names:
        fp16 = build_model(MODELS[name])
        for module_name, module in fp16.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name != "lm_head":
                module.weight.copy_(two_four(module.weight))
        w8a8 = quantize_dynamic(copy.deepcopy(fp16), DynamicInt8Config(skip=("lm_head",), lstm=False))
        vocab = MODELS[name]["vocab_size"]
        variants = (("fp16", fp16, False), ("w8a8", w8a8, False), ("w8a8 2:4", w8a8, True))
        for batch, tokens in ((1, 2048), (8, 2048)):
            ids = torch.randint(0, vocab, (batch, tokens), device="cuda")
            times = {}
            for label, model, sparse in variants:
                layers = set_sparse(model, sparse)
                fn = functools.partial(model, input_ids=ids, use_cache=False)
                _GRAPHS["ok"] = True
                times[label] = (graph_time(fn, repeats), cuda_time(fn, max(3, repeats // 4), warmup=2))
            row = {"model": name, "phase": f"prefill {batch}x{tokens}", "w8a8_layers": layers,
                   **{f"{k} graph_ms": v[0] and v[0] * 1e3 for k, v in times.items()},
                   **{f"{k} eager_ms": v[1] * 1e3 for k, v in times.items()}}
            results.append(row)
            print(f"{name:20s} {row['phase']:16s} " + "  ".join(
                f"{k} {(v[0] or float('nan')) * 1e3:8.2f} ms (eager {v[1] * 1e3:8.2f})" for k, v in times.items()), flush=True)
        prompt = torch.randint(0, vocab, (1, 64), device="cuda")
        decode = {}
        for label, model, sparse in variants:
            set_sparse(model, sparse)
            decode[label] = decode_seconds_per_token(model, prompt, decode_steps)
        results.append({"model": name, "phase": "decode M=1 eager", **{f"{k} ms": v * 1e3 for k, v in decode.items()}})
        print(f"{name:20s} decode M=1 eager " + "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in decode.items()), flush=True)
        del fp16, w8a8, variants
        torch.cuda.empty_cache()
    return results


def build_model(fields: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=True, **fields)
    return LlamaForCausalLM(config).to("cuda", torch.float16).eval()


@torch.no_grad()
def decode_seconds_per_token(model, prompt: torch.Tensor, steps: int) -> float:
    """Greedy decode, one token per forward with the KV cache; median seconds per step."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        end.record()
        torch.cuda.synchronize()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times[3:] or times)


@torch.no_grad()
def model_rows(repeats: int, decode_steps: int) -> list[dict]:
    results = []
    for name in ("smollm2-135m-shape", "llama-1b-shape"):
        fields = MODELS[name]
        dense = build_model(fields)
        sparse = copy.deepcopy(dense)
        prune(sparse, MagnitudeConfig(pattern="2:4"))
        layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
        for layer in layers:
            layer.use_semi_structured = True
        vocab = fields["vocab_size"]
        for batch, tokens in ((1, 256), (1, 512), (1, 2048), (8, 512), (16, 2048)):
            ids = torch.randint(0, vocab, (batch, tokens), device="cuda")
            t_dense = cuda_time(functools.partial(dense, input_ids=ids, use_cache=False), repeats)
            t_sparse = cuda_time(functools.partial(sparse, input_ids=ids, use_cache=False), repeats)
            on_kernel = sum(m.use_semi_structured for m in layers)
            kernels = sorted({str(m.semi_structured_backend) for m in layers})
            results.append({"model": name, "phase": f"prefill {batch}x{tokens}", "dense_ms": t_dense * 1e3,
                            "sparse_ms": t_sparse * 1e3, "speedup": t_dense / t_sparse,
                            "layers_on_sparse_kernel": f"{on_kernel}/{len(layers)}", "kernel": kernels})
        prompt = torch.randint(0, vocab, (1, 64), device="cuda")
        t_dense = decode_seconds_per_token(dense, prompt, decode_steps)
        t_sparse = decode_seconds_per_token(sparse, prompt, decode_steps)
        results.append({"model": name, "phase": "decode M=1", "dense_ms": t_dense * 1e3, "sparse_ms": t_sparse * 1e3,
                        "speedup": t_dense / t_sparse,
                        "layers_on_sparse_kernel": f"{sum(m.use_semi_structured for m in layers)}/{len(layers)}"})
        for row in results[-4:]:
            print(f"{row['model']:20s} {row['phase']:16s} dense {row['dense_ms']:8.2f} ms  2:4 {row['sparse_ms']:8.2f} ms"
                  f"  x{row['speedup']:5.2f}  sparse kernel in {row['layers_on_sparse_kernel']} layers", flush=True)
        del dense, sparse
        torch.cuda.empty_cache()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes")
    parser.add_argument("--m", type=int, nargs="+", default=None, help=f"rows of x for single matrices (default {ROWS})")
    parser.add_argument("--parts", nargs="+", default=["matrices", "models", "int8-matrices", "int8-models"],
                        choices=["matrices", "models", "int8-matrices", "int8-models"],
                        help="fp16 2:4 (SparseLinear) and W8A8 2:4 (DynamicInt8Linear) parts to run")
    parser.add_argument("--int8-models", nargs="+", default=["llama-1b-shape", "llama-7b-shape"],
                        choices=list(MODELS), help="models for int8-models")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/sparse_gpu.py needs a CUDA GPU (2:4 sparse tensor cores); nothing to measure here.")
        return 1
    from torch.sparse import SparseSemiStructuredTensor

    backend = "CUTLASS" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cuSPARSELt (CUTLASS if missing)"
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, semi-structured backend: {backend}", flush=True)
    repeats = 5 if args.quick else 20
    rows = tuple(args.m) if args.m else ROWS[::2] if args.quick else ROWS
    steps = 10 if args.quick else 40
    matrices = matrix_rows(rows, repeats) if "matrices" in args.parts else []
    models = model_rows(repeats, steps) if "models" in args.parts else []
    int8_matrices = int8_matrix_rows(rows, repeats) if "int8-matrices" in args.parts else []
    int8_models = int8_model_rows(repeats, steps, tuple(args.int8_models)) if "int8-models" in args.parts else []
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "device": device, "torch": torch.__version__, "backend": backend, "platform": platform.platform(),
            "matrices": matrices, "models": models, "int8_matrices": int8_matrices,
            "int8_models": int8_models}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
