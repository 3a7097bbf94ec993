"""Where a batch-1 decode step's host time goes, with and without the decode-time fusions: the PyTorch profiler's
top operators by self CPU time over a few eager steps of a random 7B-shaped model (bench/decode.py's), and the time
fuse_for_decode and its undo take.

    PYTHONPATH=src python bench/decode_profile.py --layers 8 --formats bf16 int4/g128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import llama_config, quantized_copy, random_llama  # noqa: E402

from modelpress.inference.decoding import GenerationSettings, generate  # noqa: E402
from modelpress.inference.fusion import fuse_for_decode  # noqa: E402
from modelpress.inference.sampling import SamplingConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--formats", nargs="+", default=["bf16", "int4/g128"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args()
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    config = llama_config(args.shape)
    config.num_hidden_layers = args.layers
    device = torch.device(args.device)
    base = random_llama(config, device)
    prompt = [3 + i % 30000 for i in range(args.prompt)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name in args.formats:
        model = base if name == "bf16" else quantized_copy(base, name)
        for fuse in (False, True):
            began = time.perf_counter()
            report, undo = fuse_for_decode(model) if fuse else (None, lambda: None)
            sync()
            fused_s = time.perf_counter() - began
            began = time.perf_counter()
            undo()
            sync()
            undo_s = time.perf_counter() - began
            settings = GenerationSettings(max_new_tokens=args.steps, decode="eager", fuse=fuse,
                                          sampling=SamplingConfig(temperature=0.0))
            generate(model, prompt, settings)  # warm-up
            sync()
            activities = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=activities) as prof:
                result = generate(model, prompt, settings)
                sync()
            print(f"\n== {name} fuse={fuse}: fuse {fused_s * 1e3:.1f} ms, undo {undo_s * 1e3:.1f} ms, "
                  f"{result.tokens_per_s:.1f} tok/s eager ({result.fusions or 'no fusions'})"
                  f"{'; skipped: ' + '; '.join(report.skipped) if report and report.skipped else ''}", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)


if __name__ == "__main__":
    main()
