"""Batched generation on the CPU against one prompt at a time: the default model, float as loaded and with int4/g32
layers and an int8 head, greedy, tokens/s over all prompts (generate_batch on the static cache, forced with
decode="static", beside generate on each prompt, which takes the native step where it serves the model).

    PYTHONPATH=src python bench/cpu_batch.py --threads 2 --json bench/results/cpu_batch.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
           "import numpy as np\n", "The three laws of thermodynamics", "SELECT name FROM users WHERE",
           "In 1905, Albert Einstein published", "To install the package, run"]


def rates(model, prompts: list[list[int]], batches: list[int], new_tokens: int) -> dict:
    from modelpress.inference.batch_decode import generate_batch
    from modelpress.inference.decoding import GenerationSettings, generate
    from modelpress.inference.sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0.0)
    static = GenerationSettings(max_new_tokens=new_tokens, sampling=greedy, decode="static")
    auto = GenerationSettings(max_new_tokens=new_tokens, sampling=greedy)
    generate_batch(model, prompts[:2], GenerationSettings(max_new_tokens=4, sampling=greedy, decode="static"))
    generate(model, prompts[0], GenerationSettings(max_new_tokens=4, sampling=greedy))  # warm-up: native build
    out = {}
    for b in batches:
        generate_batch(model, prompts[:b], static)  # warm-up at this row count (kernels prepared per shape)
        began = time.perf_counter()
        result = generate_batch(model, prompts[:b], static)
        out[f"batch {b}"] = result.new_tokens / (time.perf_counter() - began)
        began, count = time.perf_counter(), 0
        for prompt in prompts[:b]:
            one = generate(model, prompt, auto)
            count += len(one.tokens)
        out[f"one at a time {b} ({one.decode_path})"] = count / (time.perf_counter() - began)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, default=Path("cpu_batch.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import modelpress

    loaded = modelpress.load()
    prompts = [loaded.tokenizer(t)["input_ids"] for t in PROMPTS]
    rows = {"float (as loaded)": rates(loaded.model, prompts, args.batches, args.new_tokens)}
    modelpress.quantize(loaded, modelpress.RTN("int4/g32"))
    modelpress.quantize(loaded, modelpress.Head("int8/g32"))
    rows["int4/g32 + int8 head"] = rates(loaded.model, prompts, args.batches, args.new_tokens)
    print(f"default model, {args.threads} threads, {args.new_tokens} new tokens a prompt, tokens/s over all prompts")
    keys = list(next(iter(rows.values())))
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    args.json.write_text(json.dumps({"threads": args.threads, "new_tokens": args.new_tokens,
                                     "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
