"""How many GPU kernels one batch-1 decode step launches per decoder layer, with and without the decode-time
fusions (inference/fusion.py), counted by the PyTorch profiler on a static-cache step of a random 7B-shaped model
cut to a few layers. The graph path replays exactly these kernels, so the count is what the fusions take away.
Each kernel's GPU time in that step is summed by name, and the kernels that took most are printed: where a
step's time goes besides the weight matmuls (the step runs eagerly here, so gaps between kernels are not counted).

    PYTHONPATH=src python bench/decode_kernels.py --layers 2 --prompt 512 --json $OUT/decode_kernels.json
    PYTHONPATH=src python bench/decode_kernels.py --layers 2 --prompt 512 --batch 16 --kv-cache int8   # 16 rows
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import llama_config, quantized_copy, random_llama  # noqa: E402

from modelpress.inference.decoding import relayout_options  # noqa: E402
from modelpress.inference.fusion import fuse_for_decode  # noqa: E402
from modelpress.inference.kv_cache import KVCacheConfig  # noqa: E402
from modelpress.inference.static_decode import StaticDecoder  # noqa: E402


def kernels_of_a_step(model, prompt: list[int], device: torch.device, batch: int = 1,
                      kv_cache: str = "float", fused_writes: bool = False) -> tuple[Counter, Counter]:
    """(count, GPU µs) of each kernel of one decode step of `batch` rows (the same prompt in each) on CUDA, by name
    (on the CPU, a smoke test of this script: top-level operators and their CPU time). fused_writes: keys and values
    written in one kernel a layer, as generate's static cache does with the decode-time fusions."""
    config = None if kv_cache == "float" else KVCacheConfig(kv_cache)
    decoder = StaticDecoder(model, len(prompt) + 8, graph=False, batch=batch, kv_cache=config,
                            fused_writes=fused_writes)
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    tokens = torch.arange(1, batch + 1, device=device)
    with torch.no_grad():
        decoder.prefill_rows([prompt] * batch)
        decoder.step_rows(tokens)  # launchers prepared, kernels compiled
        torch.cuda.synchronize() if cuda else None
        with torch.profiler.profile(activities=[activity]) as prof:
            decoder.step_rows(tokens + 1)
            torch.cuda.synchronize() if cuda else None
    if cuda:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [e for e in prof.events() if e.cpu_parent is None]
    times: Counter = Counter()
    for e in events:
        times[e.name] += e.time_range.elapsed_us()
    return Counter(e.name for e in events), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--shape", default="llama2-7b", help="a shape of bench/decode.py (tiny: a CPU smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--formats", nargs="*", default=["int4/g128"])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before the step (the cache holds 8 more)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (one static cache)")
    p.add_argument("--kv-cache", default="float", help="float, or a quantized cache mode (int8, ...)")
    p.add_argument("--top", type=int, default=8, help="kernels by GPU time to print per row")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    config = llama_config(args.shape)
    config.num_hidden_layers = args.layers
    device = torch.device(args.device)
    model = random_llama(config, device)
    prompt = [3 + i % 1000 for i in range(args.prompt)]
    rows = []
    for name, m in [("bf16", model)] + [(spec, quantized_copy(model, spec)) for spec in args.formats]:
        for fused in (False, True):
            # as generate fuses for `batch` rows a forward
            undo = fuse_for_decode(m, **relayout_options(args.batch))[1] if fused else (lambda: None)
            try:
                counts, times = kernels_of_a_step(m, prompt, device, args.batch, args.kv_cache, fused)
            finally:
                undo()
            total = sum(counts.values())
            busy = sum(times.values())
            rows.append({"model": name, "fused": fused, "kernels_per_step": total, "gpu_us": busy,
                         "kernels": dict(counts.most_common()), "kernel_us": dict(times.most_common())})
            print(f"{name:10s} fused={fused!s:5s} kernels per step {total:4d} "
                  f"(~{total / args.layers:.1f} per layer, head and embedding included), {busy:.1f} us busy",
                  flush=True)
            for kernel, us in times.most_common(args.top):
                print(f"    {us:8.1f} us  {counts[kernel]:3d}x  {kernel[:110]}")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "layers": args.layers,
                                         "prompt": args.prompt, "batch": args.batch, "kv_cache": args.kv_cache,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
