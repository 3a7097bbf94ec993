"""Where a batched decode step's GPU time goes: kernel time per step by kind (matmuls, attention, norms, rotary,
KV writes, the rest) for a random 7B-shaped model (bench/decode.py's) in bf16 and quantized, at several batch
sizes, on the static cache with the decode-time fusions generate runs (each step called eagerly under the PyTorch
profiler: kernel times are the same as in the captured graph, host gaps are not counted).

On Hopper the step's kernels are programmatic dependent launches: each starts while the one before it runs and
waits inside for its results, so a kernel's span includes some of its predecessor's, and the kinds add up to more
than the step (the split-cache attention's merge kernel, which starts with its partial kernel, most of all). Read the
kinds as upper bounds and compare like with like.

    PYTHONPATH=src python bench/batch_profile.py --batches 1 16 --prompt 512 --formats bf16 int4/g128 \
      [--kv-cache float int8]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import llama_config, quantized_copy, random_llama  # noqa: E402

from modelpress.inference.decoding import GenerationSettings, kernel_context  # noqa: E402
from modelpress.inference.kv_cache import KVCacheConfig  # noqa: E402
from modelpress.inference.static_decode import StaticDecoder  # noqa: E402

# kernel name patterns, first match wins
KINDS = [("matmul", r"gemv|mma|gemm|matmul|cutlass|sm90_xmma|nvjet|linear|int4|dequant"),
         ("attention", r"attention|attn|flash|sdpa|softmax|fmha|_partial_kernel|_combine_kernel"),
         ("norm", r"norm"), ("rotary", r"rope|rotary"), ("kv write", r"write_kv|index_copy|scatter"),
         ("activation", r"silu|act")]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def profile_steps(model, batch: int, prompt: int, steps: int, vocab: int, kv_cache: str = "float") -> dict:
    settings = GenerationSettings(max_new_tokens=steps + 4)
    device = next(model.parameters()).device
    prompts = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad(), kernel_context(settings, model, rows=batch) as fusions:
        decoder = StaticDecoder(model, prompt + steps + 4, graph=False, fused_writes=True, batch=batch,
                                kv_cache=None if kv_cache == "float" else KVCacheConfig(kv_cache))
        logits = decoder.prefill_rows(prompts)
        tokens = logits.argmax(-1)
        for _ in range(2):  # warm-up: launchers prepared, kernels compiled
            tokens = decoder.step_rows(tokens).argmax(-1)
        torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tokens = decoder.step_rows(tokens).argmax(-1)
            torch.cuda.synchronize(device)
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if us and event.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(event.key)] += us / steps / 1e3
            by_name[event.key] += us / steps / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"batch": batch, "kv_cache": kv_cache, "fusions": fusions.summary(), "ms_per_step": dict(by_kind),
            "total_ms": sum(by_kind.values()), "top_kernels_ms": dict(top)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--formats", nargs="+", default=["bf16", "int4/g128"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--kv-cache", nargs="+", default=["float"], help="KV cache modes (float, int8, ...), each profiled")
    p.add_argument("--json", type=Path, default=Path("batch_profile.json"))
    args = p.parse_args()
    device = torch.device("cuda")
    config = llama_config(args.shape)
    torch.manual_seed(0)
    base = random_llama(config, device)
    rows = []
    for spec in args.formats:
        model = base if spec == "bf16" else quantized_copy(base, spec)
        for batch in args.batches:
            for kv in args.kv_cache:
                row = {"model": spec, **profile_steps(model, batch, args.prompt, args.steps, config.vocab_size, kv)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if model is not base:
            del model
            torch.cuda.empty_cache()
    kinds = [k for k, _ in KINDS] + ["other"]
    print(f"\n{torch.cuda.get_device_name()}, {args.shape} random weights, prompt {args.prompt}; GPU ms per step")
    print("| model | batch | KV cache | " + " | ".join(kinds) + " | total |")
    print("|---|---:|---|" + "---:|" * (len(kinds) + 1))
    for r in rows:
        kind_ms = " | ".join(f"{r['ms_per_step'].get(k, 0.0):.3f}" for k in kinds)
        print(f"| {r['model']} | {r['batch']} | {r['kv_cache']} | {kind_ms} | {r['total_ms']:.3f} |")
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "shape": args.shape, "prompt": args.prompt, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
