"""Benchmark: speculative decoding of the default model with self-speculative low-bit drafts (RTN copies of
the target), greedy and sampled: acceptance rate, tokens per target pass, tokens/s and speedup over plain
decoding of the target, all in one process with the configurations interleaved prompt by prompt (shared
machines drift; compare the ratios).

Prompts are consecutive 48-token pieces of the embedded corpus taken 10 windows apart; every run makes
exactly --new-tokens tokens (no end-of-sequence stop). tokens/s includes the prompt prefill. Greedy runs
also check that the speculative output is identical to the target's own greedy output. "draft cost" is
the median time of one single-token decode step of the draft over that of the target.

    .venv/bin/python bench/speculative.py --json bench/results/speculative_cpu.json
    python bench/speculative.py --device cuda --dtype bfloat16 --json speculative_gpu.json
    PYTHONPATH=src python bench/speculative.py --device cuda --dtype bfloat16 --random-target llama2-7b \
        --drafts int8/channel int4/g128 --json $OUT/speculative_h100.json   # no model files needed

--random-target SHAPE replaces the model with a RANDOM-weight Llama of that shape (bench/decode.py builds it
on the device; prompts are random tokens). What its figures mean: draft cost, tokens/s and speedup are real
costs of the kernels and of the draft-verify loop at that shape; acceptance only says how closely each RTN
copy's next-token distribution tracks the random target's. For the int8/channel self-draft (error far below
the logits' spread) that is close to what a self-speculative int8 draft of a real model gets; for 4-bit drafts
random weights (no outliers, no structure) make acceptance unrepresentative of real models, either way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modelpress.formats.scheme import WeightScheme
from modelpress.inference.decoding import GenerationSettings, forward_logits, generate
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.speculative import SpeculativeConfig, low_bit_draft, speculative_generate
from modelpress.io.model import load_model
from modelpress.io.text import load_text, make_windows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = [("temperature", "temp"), ("config", "config"), ("draft_cost", "draft cost"),
           ("acceptance_rate", "accept"), ("tokens_per_target_pass", "tok/target pass"),
           ("tokens_per_s", "tok/s"), ("speedup", "speedup"), ("identical", "= target greedy")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--random-target", default=None, metavar="SHAPE",
                   help="a random-weight Llama of this shape (bench/decode.py SHAPES: llama2-7b, llama-1b, tiny) "
                        "instead of --model; prompts are random tokens")
    p.add_argument("--text", default=None)
    p.add_argument("--drafts", nargs="*", default=["int8/channel", "int4/g128", "int4-asym/g32"], metavar="SCHEME",
                   help="self-speculative drafts: RTN copies of the target under these schemes")
    p.add_argument("--draft-model", nargs="*", default=[], metavar="MODEL", help="separate draft models")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machines)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def pick_prompts(tokenizer, args) -> list[list[int]]:
    windows = make_windows(tokenizer, load_text(args.text), seq_len=args.prompt_tokens,
                           eval_windows=args.prompts * 10).eval
    return [windows[i * 10].tolist() for i in range(args.prompts)]


@torch.no_grad()
def step_seconds(model, prompt: list[int], repeats: int = 7) -> float:
    """Median time of one single-token decode step after the prompt."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        forward_logits(model, prompt[-1:], cache, last_only=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def random_target(args, device: torch.device):
    """A random-weight target built on the device, random prompts, and the description of the target."""
    sys.path.insert(0, str(ROOT / "bench"))
    from decode import SHAPES, llama_config, random_llama

    if args.random_target not in SHAPES:
        raise SystemExit(f"--random-target: unknown shape {args.random_target!r}; choose from {sorted(SHAPES)}")
    if args.draft_model:
        raise SystemExit("--draft-model needs a real target (same tokenizer): drop --random-target")
    config = llama_config(args.random_target)
    target = random_llama(config, device, dtype=DTYPES[args.dtype], seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.prompts)]
    return target, prompts, f"RANDOM weights, {args.random_target} shape"


def run_all(target, drafts: dict, prompts, args) -> list[dict]:
    device = next(target.parameters()).device
    rows = []
    for temperature in args.temperatures:
        settings = GenerationSettings(max_new_tokens=args.new_tokens,
                                      sampling=SamplingConfig(temperature, top_p=args.top_p))
        runs: dict[str, list] = {"target": [], **{name: [] for name in drafts}}
        identical: dict[str, list[bool]] = {name: [] for name in drafts}
        for i, prompt in enumerate(prompts):
            seed = args.seed + i
            base = generate(target, prompt, settings, generator=torch.Generator(device=device).manual_seed(seed))
            runs["target"].append(base)
            for name, draft in drafts.items():
                result = speculative_generate(target, draft, prompt, settings, SpeculativeConfig(args.draft_tokens),
                                              generator=torch.Generator(device=device).manual_seed(seed))
                identical[name].append(result.tokens == base.tokens)
                runs[name].append(result)
            print(f"temperature {temperature}, prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
        rows += summarize(temperature, runs, identical)
    return rows


def summarize(temperature: float, runs: dict, identical: dict) -> list[dict]:
    rows = []
    base_rate = None
    for name, results in runs.items():
        tokens = sum(len(r.tokens) for r in results)
        seconds = sum(r.seconds for r in results)
        drafted = sum(r.drafted for r in results)
        rate = tokens / seconds
        base_rate = rate if name == "target" else base_rate
        verify_passes = sum(r.rounds for r in results) if name != "target" else tokens
        row = {"temperature": temperature, "config": name, "new_tokens": tokens, "seconds": seconds,
               "tokens_per_s": rate, "speedup": rate / base_rate,
               "acceptance_rate": sum(r.accepted for r in results) / drafted if drafted else None,
               "tokens_per_target_pass": tokens / verify_passes,
               "rounds": sum(r.rounds for r in results)}
        if name != "target" and temperature == 0:
            row["identical"] = f"{sum(identical[name])}/{len(results)}"
        rows.append(row)
    return rows


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.random_target:
        target, prompts, source = random_target(args, device)
    else:
        loaded = load_model(args.model)
        target, source = loaded.model.to(device).to(DTYPES[args.dtype]).eval(), loaded.source
        prompts = pick_prompts(loaded.tokenizer, args)
    drafts = {f"self {spec}": low_bit_draft(target, WeightScheme.parse(spec)) for spec in args.drafts}
    for spec in args.draft_model:
        drafts[f"draft {spec}"] = load_model(spec).model.to(device).to(DTYPES[args.dtype]).eval()
    warm = GenerationSettings(max_new_tokens=4, sampling=SamplingConfig(0.0))
    for draft in drafts.values():  # first calls build kernels' prepared weights
        speculative_generate(target, draft, prompts[0], warm, SpeculativeConfig(2))
    costs = {"target": [], **{name: [] for name in drafts}}
    for _ in range(3):  # round robin
        for name, model in [("target", target), *drafts.items()]:
            costs[name].append(step_seconds(model, prompts[0]))
    cost = {name: statistics.median(v) / statistics.median(costs["target"]) for name, v in costs.items()}
    rows = run_all(target, drafts, prompts, args)
    for row in rows:
        row["draft_cost"] = cost[row["config"]] if row["config"] != "target" else None
        row["target_step_ms"] = 1000 * statistics.median(costs["target"])
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    if args.json:
        meta = {"model": source, "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens, "draft_tokens": args.draft_tokens, "top_p": args.top_p,
                "device": args.device, "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
