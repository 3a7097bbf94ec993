"""Where a speculative round's time goes on the GPU: one profiled speculative call on a RANDOM-weight target and an
RTN draft (no model files), then the steady rounds read from the trace: each CUDA graph's span on the GPU (draft
steps, verify pass) and the GPU's idle time between rounds, with the host calls running while it idled.

    PYTHONPATH=src python bench/speculative_profile.py --shape llama2-7b --draft int4/g128 --trace $OUT/spec.json

Random weights make acceptance meaningless (near 0: every round is k draft steps and one verify pass), which is
what a cost profile wants. The JSON written with --json holds the per-round figures; --trace the Chrome trace.
`--syncs` lists the lines of src/ that made the host wait for the GPU in one more call (sync debug mode): in a
speculative call on the target's cache, rounds should wait only for the verdicts. `--draft-cache own` keeps the draft on its own cache, one round at a time (the default, shared, reads the target's
and queues each round before the host reads the last one's verdict). `--target SCHEME` quantizes the target too (RTN; the draft is made from the float model first): its verify passes of
k + 1 tokens then run on the tensor-core GEMV's rows mode, or with `--verify-stored` on the stored layout's kernels
(the target not re-laid, as before the rows mode):

    PYTHONPATH=src python bench/speculative_profile.py --target int4/g128 --draft int4/g128
    PYTHONPATH=src python bench/speculative_profile.py --target int4/g128 --draft int4/g128 --verify-stored
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from decode import SHAPES, llama_config, random_llama  # noqa: E402

from modelpress.formats.scheme import WeightScheme  # noqa: E402
from modelpress.inference.decoding import GenerationSettings  # noqa: E402
from modelpress.inference.sampling import SamplingConfig  # noqa: E402
from modelpress.inference.speculative import SpeculativeConfig, low_bit_draft, speculative_generate  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--draft", default="int4/g128", help="RTN scheme of the self-speculative draft")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--target", default=None, help="RTN scheme of the target (default: bf16)")
    p.add_argument("--verify-stored", action="store_true",
                   help="a quantized target keeps its stored layout (no re-layout for the verify passes)")
    p.add_argument("--draft-cache", default="shared", choices=["shared", "own"],
                   help="the draft reads the target's KV cache, its rounds queued one ahead of the host (shared, the "
                        "default), or keeps its own cache, one round at a time (own)")
    p.add_argument("--syncs", action="store_true",
                   help="also run one call under torch.cuda.set_sync_debug_mode('warn') and list the lines of "
                        "src/ that made the host wait for the GPU, with their counts")
    p.add_argument("--trace", default=None, help="write the Chrome trace here")
    p.add_argument("--json", default=None)
    return p.parse_args()


def graph_spans(events: list[dict]) -> list[dict]:
    """One entry per cudaGraphLaunch, in launch order: host start and duration, and its kernels' span on the GPU."""
    launches = {e["args"]["correlation"]: e for e in events if e["name"] == "cudaGraphLaunch"}
    kernels = defaultdict(list)
    for e in events:
        if e.get("cat") == "kernel" and e.get("args", {}).get("correlation") in launches:
            kernels[e["args"]["correlation"]].append(e)
    spans = []
    for correlation, launch in sorted(launches.items(), key=lambda item: item[1]["ts"]):
        ks = kernels.get(correlation)
        if ks:
            spans.append({"host_ts": launch["ts"], "host_us": launch["dur"], "kernels": len(ks),
                          "gpu_start": min(k["ts"] for k in ks), "gpu_end": max(k["ts"] + k["dur"] for k in ks)})
    return spans


def rounds_of(spans: list[dict], k: int) -> list[dict]:
    """Steady rounds: k draft graphs then one verify graph (more kernels than a draft step's), each round's GPU idle
    time between the previous verify's end and its first draft's start."""
    verify_kernels = max(s["kernels"] for s in spans)
    verifies = [i for i, s in enumerate(spans) if s["kernels"] == verify_kernels]
    rounds = []
    for before, i in zip(verifies, verifies[1:]):
        drafts = spans[before + 1:i]
        if len(drafts) != k:
            continue  # a round that caught up two tokens, or the last one
        rounds.append({"draft_ms": [(d["gpu_end"] - d["gpu_start"]) / 1e3 for d in drafts],
                       "verify_ms": (spans[i]["gpu_end"] - spans[i]["gpu_start"]) / 1e3,
                       "idle_ms": (drafts[0]["gpu_start"] - spans[before]["gpu_end"]) / 1e3,
                       "first_launch_us": drafts[0]["host_us"],
                       "round_ms": (spans[i]["gpu_end"] - spans[before]["gpu_end"]) / 1e3})
    return rounds


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profile reads CUDA graphs from the trace: it needs a CUDA device")
    device = torch.device("cuda")
    target = random_llama(llama_config(args.shape), device)
    draft = low_bit_draft(target, WeightScheme.parse(args.draft))
    if args.target:
        from decode import quantized_copy

        target = quantized_copy(target, args.target)
    if args.verify_stored:  # forwards of more than one row are then not re-laid (inference/decoding.kernel_context)
        from modelpress.nn import mma_ptx

        mma_ptx.MAX_ROWS = 1
    prompt = torch.randint(0, target.config.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    settings = GenerationSettings(max_new_tokens=args.new_tokens, sampling=SamplingConfig(args.temperature))
    config = SpeculativeConfig(args.draft_tokens, share_kv_cache=args.draft_cache == "shared")
    speculative_generate(target, draft, prompt, settings, config)  # kernels compiled, weights prepared
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = speculative_generate(target, draft, prompt, settings, config)
    trace = Path(args.trace or "/tmp/speculative_profile_trace.json")
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    rounds = rounds_of(graph_spans(events), args.draft_tokens)
    if not rounds:
        raise SystemExit("no steady round found in the trace (graph path not taken?)")
    median = {key: statistics.median(r[key] if key != "draft_ms" else statistics.median(r[key]) for r in rounds)
              for key in ("draft_ms", "verify_ms", "idle_ms", "first_launch_us", "round_ms")}
    host = Counter()
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            host[e["name"]] += e["dur"]
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
               "target": args.target or "bf16", "verify_stored": args.verify_stored, "fusions": result.fusions,
               "draft": args.draft, "draft_cache": args.draft_cache, "k": args.draft_tokens, "temperature": args.temperature, "rounds": result.rounds,
               "steady_rounds": len(rounds), "decode_path": result.decode_path,
               "capture_s": result.capture_seconds, "seconds": result.seconds, "median": median,
               "host_runtime_ms": {name: us / 1e3 for name, us in host.most_common(8)}}
    print(f"{summary['gpu']}, {args.shape} RANDOM {summary['target']} target"
          f"{' (stored layout)' if args.verify_stored else ''}, {args.draft} draft ({args.draft_cache} cache), "
          f"k = {args.draft_tokens}, "
          f"{len(rounds)} steady rounds of {result.rounds} ({result.decode_path})")
    print("| draft step (GPU) | verify pass (GPU) | GPU idle between rounds | first draft launch (host) | round |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {median['draft_ms']:.2f} ms | {median['verify_ms']:.2f} ms | {median['idle_ms']:.2f} ms | "
          f"{median['first_launch_us']:.0f} us | {median['round_ms']:.2f} ms |")
    if args.syncs:
        summary["syncs"] = host_waits(lambda: speculative_generate(target, draft, prompt, settings, config))
        print("lines that made the host wait (count):", summary["syncs"])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


def host_waits(call) -> dict[str, int]:
    """{file:line in src/modelpress: times} of the synchronizing CUDA operations `call` ran (PyTorch's sync debug
    mode names the Python line of each; a graph's capture and the prefills are among them, once a call)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message) and "modelpress" in w.filename)
    return dict(where.most_common())


if __name__ == "__main__":
    main()
