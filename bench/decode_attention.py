"""Decode attention over a static KV cache: transformers' SDPA function (what the static and graph decode paths
ran) against the split-cache kernels of nn/triton_attention.py, µs per layer call, CUDA-graph replay.

Each row is one shape: `--batch` sequences (default 1), H query heads over HKV key/value heads of head size D, T
query tokens (1: a decode step; 5: a speculative verification of 4 drafts), a static cache of S positions of which
the first `filled` are written (the rest masked, as StaticDecoder masks them). Calls go round LAYERS distinct
caches, more bytes than the L2 cache holds, inside one captured graph; median of several replays, CUDA events. Every
BLOCK_S,warps,waves plan given with --plans is timed beside split_plan's default (waves: programs per
multiprocessor, which sets how many splits of the cache), and the error of each against float64 attention is
printed beside SDPA's own. With --codes the kernels read an int8 KV cache's codes and per-token scales
(kv_cache.py's `int8` mode), SDPA the same states dequantized, which is what its callers would hand it.

    PYTHONPATH=src python bench/decode_attention.py --json $OUT/decode_attention.json
    PYTHONPATH=src python bench/decode_attention.py --batch 16 --codes --shapes 0 3 --plans 64,4,8 128,4,8 \
      [--vector never]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from modelpress.inference.kv_cache import KVCacheConfig  # noqa: E402
from modelpress.nn import triton_attention  # noqa: E402
from modelpress.nn.triton_attention import _multiprocessors, decode_attention, split_plan  # noqa: E402

# (name, H, HKV, D, T, S, filled)
SHAPES = [
    ("llama2-7b, 512+128", 32, 32, 128, 1, 640, 600),
    ("llama2-7b, 2048 cache, 600 filled", 32, 32, 128, 1, 2048, 600),
    ("llama2-7b, 4096 full", 32, 32, 128, 1, 4096, 4096),
    ("llama3-8b (GQA 4), 640", 32, 8, 128, 1, 640, 600),
    ("llama3-8b (GQA 4), 8192 full", 32, 8, 128, 1, 8192, 8192),
    ("llama2-7b verify T=5, 640", 32, 32, 128, 5, 640, 600),
    ("gemma-7b (16 heads of 256), 640", 16, 16, 256, 1, 640, 600),
]
LAYERS = 16
CALLS_PER_GRAPH = 32


def sdpa_call(h: int, hkv: int):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    stub = nn.Module()
    stub.num_key_value_groups, stub.is_causal = h // hkv, True
    return lambda q, k, v, mask, scale: sdpa_attention_forward(stub, q, k, v, mask, scaling=scale)[0]


def time_graph(run, device: torch.device, repeats: int = 15) -> float:
    """Median µs per call of `run(i)` (i: the call's index), CALLS_PER_GRAPH calls in one captured graph."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(3):
            run(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            run(i)
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS_PER_GRAPH)
    return statistics.median(times)


def reference(q, k, v, mask, scale) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    return ((q.double() @ k.transpose(-1, -2) * scale + mask.double()).softmax(-1) @ v).transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", nargs="*", default=["32,4,2", "64,4,2", "64,8,1", "64,8,4", "128,8,2", "32,4,4",
                                                   "64,4,4", "128,4,2"],
                   help="BLOCK_S,num_warps,waves plans to time beside split_plan's default")
    p.add_argument("--batch", type=int, default=1, help="sequences, each with its own cache")
    p.add_argument("--codes", action="store_true", help="the kernels read int8 codes and per-token scales")
    p.add_argument("--vector", choices=["auto", "always", "never"], default="auto",
                   help="the one-row kernels for one query row a key/value head: where they fill the GPU (auto, "
                        "the default), always or never (triton_attention.VECTOR_ROWS, VECTOR_MIN_WAVES[_CODES])")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="with --codes: the kernels decode the codes to bfloat16, not apply the scales to scores "
                        "and probabilities (triton_attention.FOLD_CODE_SCALES off)")
    p.add_argument("--contiguous", action="store_true",
                   help="the one-row kernels' splits of the cache as contiguous runs of blocks "
                        "(triton_attention.INTERLEAVED_SPLITS off)")
    p.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default: all)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="the query's and states' dtype")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    plans = [(int(b), int(w), float(x)) for b, w, x in (plan.split(",") for plan in args.plans)]
    sms = _multiprocessors(device)
    name = torch.cuda.get_device_name(device)
    batch = args.batch
    triton_attention.VECTOR_ROWS = args.vector != "never"
    triton_attention.FOLD_CODE_SCALES = args.fold
    triton_attention.INTERLEAVED_SPLITS = not args.contiguous
    if args.vector == "always":
        triton_attention.VECTOR_MIN_WAVES = triton_attention.VECTOR_MIN_WAVES_CODES = 0.0
    codec = KVCacheConfig("int8").codecs()[0] if args.codes else None
    print(f"{name}, torch {torch.__version__}; µs per layer call, graph replay over {LAYERS} caches; {args.dtype}, "
          f"batch {batch}"
          + ((", int8 codes, " + ("scales folded" if args.fold else "decoded")) if codec else "")
          + f", one-row kernels: {args.vector}" + (", contiguous splits" if args.contiguous else ""))
    rows = []
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    for label, h, hkv, d, t, s, filled in shapes:
        generator = torch.Generator(device).manual_seed(0)
        q = torch.randn(batch, h, t, d, device=device, dtype=dtype, generator=generator)
        caches = [(torch.randn(batch, hkv, s, d, device=device, dtype=dtype, generator=generator),
                   torch.randn(batch, hkv, s, d, device=device, dtype=dtype, generator=generator))
                  for _ in range(LAYERS)]
        stored = exact = None
        if codec:  # the kernels' operands: (codes, codes, key scales, value scales); SDPA's: the dequantized states
            stored = [tuple(codec.quantize(x) for x in pair) for pair in caches]
            exact = tuple(codec.dequantize(x, torch.float64) for x in stored[0])  # errors: against the codes' states
            caches = [tuple(codec.dequantize(x, dtype) for x in pair) for pair in stored]
            stored = [(k.qdata, v.qdata, k.scale, v.scale) for k, v in stored]
        positions = torch.arange(filled - t, filled, device=device)
        allowed = torch.arange(s, device=device)[None, :] <= positions[:, None]
        mask = torch.zeros(1, 1, t, s, device=device, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        scale = d ** -0.5
        sdpa = sdpa_call(h, hkv)
        want = reference(q, *(exact if codec else caches[0]), mask, scale)
        one_row = triton_attention.one_row_kernels(h // hkv * t, batch * hkv, sms, bool(codec))
        default = split_plan(s, batch * hkv, sms, one_row=one_row, codes=bool(codec))
        row = {"shape": label, "batch": batch, "codes": bool(codec), "one_row": one_row, "heads": h,
               "kv_heads": hkv, "head_dim": d, "tokens": t, "cache": s, "filled": filled,
               "default_plan": list(default)}
        row["sdpa_us"] = time_graph(lambda i: sdpa(q, *caches[i % LAYERS], mask, scale), device)
        row["sdpa_err"] = (sdpa(q, *caches[0], mask, scale).double() - want).abs().max().item()
        timed = {}
        candidates = {"default": default} | {f"{b},{w},{x:g}": split_plan(s, batch * hkv, sms, b, w, x)
                                             for b, w, x in plans}

        def kernels(i, plan):
            if stored is None:
                return decode_attention(q, *caches[i % LAYERS], mask, scale, plan=plan)
            k, v, k_scale, v_scale = stored[i % LAYERS]
            return decode_attention(q, k, v, mask, scale, plan=plan, key_scale=k_scale, value_scale=v_scale)

        for key, plan in candidates.items():
            err = (kernels(0, plan).double() - want).abs().max().item()
            us = time_graph(lambda i, plan=plan: kernels(i, plan), device)
            timed[key] = {"us": us, "err": err, "plan": list(plan)}
        row["plans"] = timed
        best = min(timed, key=lambda k: timed[k]["us"])
        default = "default"
        print(f"{label:36s} sdpa {row['sdpa_us']:7.1f} (err {row['sdpa_err']:.1e})  split {timed[default]['us']:7.1f}"
              f" {list(candidates[default])} (err {timed[default]['err']:.1e}, {row['sdpa_us'] / timed[default]['us']:.2f}x)  "
              f"best {timed[best]['us']:7.1f} [{best}]", flush=True)
        rows.append(row)
        caches = stored = exact = None  # freed before the next shape's
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": batch,
                                         "dtype": args.dtype, "codes": args.codes, "vector": args.vector,
                                         "fold": args.fold, "interleaved": not args.contiguous,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
