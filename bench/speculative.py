"""Benchmark: speculative decoding of the default model with self-speculative low-bit drafts (RTN copies of
the target) or separate draft models, greedy and sampled: acceptance rate, tokens per target pass, tokens/s and
speedup over plain decoding of the target on the same decode path, all in one process with the configurations
interleaved prompt by prompt (shared machines drift; compare the ratios).

Decode paths (--decode, several to compare them in one run; --eager is --decode eager): auto (the default: CUDA
graphs on the static cache on CUDA; on the CPU the native decode step where it serves both models, else eager),
eager, static, graph, native; each row says the path that ran.
Prompts are consecutive 48-token pieces of the embedded corpus taken 10 windows apart; every run makes
exactly --new-tokens tokens (no end-of-sequence stop). tokens/s includes the prompt prefill and, on the graph
path, the capture of each call's graphs (a new decoder per call); "decode tok/s" and "decode speedup" leave the
capture out (what a long generation sees: speculation captures one graph per forward length, plain decoding one). Greedy
runs also check that the speculative output is identical to the target's own greedy output on the same path.
"draft cost" is the median time of one single-token decode step of the draft over that of the target, both on
the path of the row; "verify cost" that of the target's (k+1)-token forward, in the context its verify passes run
in. The JSON file is rewritten after every run, so a run cut short keeps what it measured.

    .venv/bin/python bench/speculative.py --json bench/results/speculative_cpu.json
    python bench/speculative.py --device cuda --dtype bfloat16 --json speculative_gpu.json
    PYTHONPATH=src python bench/speculative.py --device cuda --dtype bfloat16 --random-target llama2-7b \
        --drafts int8/channel int4/g128 --random-draft llama-1b --decode auto eager --new-tokens 128 \
        --json $OUT/speculative_h200.json   # no model files needed
    PYTHONPATH=src python bench/speculative.py --device cpu --random-target tiny --drafts int8/channel \
        --random-draft tiny --decode auto static --prompts 1 --new-tokens 8 --json /tmp/spec.json  # code path
    PYTHONPATH=src python bench/speculative.py --device cuda --dtype bfloat16 --widen llama2-7b \
        --drafts int8/channel int4/g128 --widen-gptq int4/g128 --json $OUT/speculative_widened.json
    PYTHONPATH=src python bench/speculative.py --device cuda --dtype bfloat16 --widen llama2-7b --drafts \
        --small-gptq int4-asym/g64 --draft-tokens 4 6 --new-tokens 256   # a 135M draft model for the 7B target

--random-target SHAPE replaces the model with a RANDOM-weight Llama of that shape (bench/decode.py builds it
on the device; prompts are random tokens); --random-draft SHAPE adds a RANDOM-weight draft of another shape
(e.g. llama-1b) with the target's vocabulary. What their figures mean: draft cost, tokens/s and speedup are real
costs of the kernels and of the draft-verify loop at that shape; acceptance only says how closely each draft's
next-token distribution tracks the random target's. For the int8/channel self-draft (error far below the
logits' spread) that is close to what a self-speculative int8 draft of a real model gets; for 4-bit drafts
random weights (no outliers, no structure) make acceptance unrepresentative of real models, and an independent
random draft is accepted about as often as chance, so its rows measure the cost of a draft of that size, not
its speedup on real text.

--widen SHAPE makes the target the model (default: the default model) carried into a larger Llama shape
(bench/widen.py: its weights placed among zeros, the same logits up to rounding, checked at the start): every
step reads and multiplies what a model of that shape does, and a draft's acceptance is that of a quantized copy of
a trained model on real prompts. --small-gptq drafts are the model's GPTQ copies left at their own size: a small
draft model for the large target, whose acceptance is that of the quantized small model against the float one
(the target's function), so a plausible figure for a real draft/target pair, not a measured one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
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
from modelpress.inference.decoding import (
    DECODE_PATHS,
    GenerationSettings,
    decode_path,
    forward_logits,
    fused_writes,
    generate,
    kernel_context,
    supports_logits_to_keep,
)
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.session import DecodeSession
from modelpress.inference.speculative import SpeculativeConfig, low_bit_draft, speculative_generate
from modelpress.inference.native_decode import NativeDecoder
from modelpress.inference.static_decode import StaticDecoder
from modelpress.io.model import load_model
from modelpress.io.text import load_text, make_windows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = [("temperature", "temp"), ("path", "path (ran)"), ("config", "config"), ("draft_cost", "draft cost"),
           ("acceptance_rate", "accept"), ("tokens_per_target_pass", "tok/target pass"),
           ("verify_cost", "verify cost"), ("tokens_per_s", "tok/s"), ("decode_tokens_per_s", "decode tok/s"),
           ("speedup", "speedup"),
           ("decode_speedup", "decode speedup"), ("later_speedup", "speedup after prompt 1"),
           ("identical", "= target greedy")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--random-target", default=None, metavar="SHAPE",
                   help="a random-weight Llama of this shape (bench/decode.py SHAPES: llama2-7b, llama-1b, tiny) "
                        "instead of --model; prompts are random tokens")
    p.add_argument("--widen", default=None, metavar="SHAPE",
                   help="carry the model into a larger Llama shape (bench/decode.py SHAPES; bench/widen.py): 7B "
                        "costs with a trained model's acceptance")
    p.add_argument("--widen-gptq", nargs="*", default=[], metavar="SCHEME",
                   help="with --widen: drafts that are GPTQ copies of the model under these schemes (the default "
                        "calibration, as `modelpress quantize --method gptq`), carried into the target's shape")
    p.add_argument("--small-gptq", nargs="*", default=[], metavar="SCHEME",
                   help="with --widen: draft models that are GPTQ copies of the model under these schemes NOT carried "
                        "into the target's shape (a small draft model for the large target)")
    p.add_argument("--draft-head", default=None, metavar="SCHEME",
                   help="also run each draft with its output head (and the embedding tied to it) quantized "
                        "round-to-nearest under SCHEME, e.g. int8/channel (rows 'DRAFT, SCHEME head')")
    p.add_argument("--text", default=None)
    p.add_argument("--drafts", nargs="*", default=["int8/channel", "int4/g128", "int4-asym/g32"], metavar="SCHEME",
                   help="self-speculative drafts: RTN copies of the target under these schemes")
    p.add_argument("--draft-model", nargs="*", default=[], metavar="MODEL", help="separate draft models")
    p.add_argument("--random-draft", nargs="*", default=[], metavar="SHAPE",
                   help="with --random-target: RANDOM-weight drafts of these shapes (e.g. llama-1b), target's "
                        "vocabulary")
    p.add_argument("--decode", nargs="+", default=["auto"],
                   choices=[*DECODE_PATHS, "auto+compile", "static+compile"],
                   help="decode paths to run, interleaved (default auto: CUDA graphs on CUDA, eager elsewhere); "
                        "+compile: GenerationSettings.compile")
    p.add_argument("--eager", action="store_true", help="the same as --decode eager")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[4], metavar="K",
                   help="k, drafts per round; several: each draft runs with each k (rows 'DRAFT, k=K')")
    p.add_argument("--draft-cache", default="shared", choices=["shared", "own", "both"],
                   help="a draft of the target's architecture reads the target's KV cache (shared, the default), "
                        "keeps its own, or both rows side by side")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--session", action="store_true",
                   help="each configuration's prompts in one DecodeSession (inference/session.py: the model prepared "
                        "and its graphs captured once, by the first prompt), configurations one after another; "
                        "default: every prompt a call of its own (generate / speculative_generate), configurations "
                        "interleaved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machines)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.eager:
        args.decode = ["eager"]
    if (args.widen_gptq or args.small_gptq) and not args.widen:
        p.error("--widen-gptq and --small-gptq need --widen")
    if args.widen and args.random_target:
        p.error("--widen carries a trained model; --random-target replaces it with random weights: pick one")
    if args.random_draft and not args.random_target:
        p.error("--random-draft needs --random-target (a real target needs a real draft: --draft-model)")
    return args


def pick_prompts(tokenizer, args) -> list[list[int]]:
    windows = make_windows(tokenizer, load_text(args.text), seq_len=args.prompt_tokens,
                           eval_windows=args.prompts * 10).eval
    return [windows[i * 10].tolist() for i in range(args.prompts)]


def path_settings(path: str, **kwargs) -> GenerationSettings:
    """GenerationSettings for a --decode entry: a decode path, "+compile" for GenerationSettings.compile."""
    decode, _, option = path.partition("+")
    return GenerationSettings(decode=decode, compile=option == "compile", **kwargs)


@torch.no_grad()
def step_seconds(model, prompt: list[int], path: str, settings: GenerationSettings, repeats: int = 7,
                 tokens: int = 1) -> float:
    """Median time of one forward of `tokens` tokens after the prompt (1: a decode step; k+1: a verify pass, in the
    verifier's context), on `path` (eager, static, graph or native; the graph's capture happens in an untimed first
    forward), in the kernel context generation runs in (on CUDA the decode-time fusions; one-token models' int4
    layers re-laid for the tensor-core GEMV)."""
    with kernel_context(settings, model, verifiers=(model,) if tokens > 1 else ()):
        return _step_seconds(model, prompt, path, settings, repeats, tokens)


def _step_seconds(model, prompt: list[int], path: str, settings: GenerationSettings, repeats: int,
                  tokens: int) -> float:
    device = next(model.parameters()).device
    feed = (prompt * tokens)[-tokens:]
    if path == "eager":
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
        step = lambda: (forward_logits(model, feed, cache), cache.crop(-tokens))
    elif path == "native":  # the CPU's native step, as generation runs it there
        decoder = NativeDecoder(model, len(prompt) + tokens + 1, products=settings.cpu_products)
        decoder.prefill(prompt)
        step = lambda: (decoder.forward(feed), decoder.rewind(tokens))
        step()
    else:
        decoder = StaticDecoder(model, len(prompt) + tokens + 1, graph=path == "graph", compile=settings.compile,
                                keep_last_only=supports_logits_to_keep(model), fused_writes=fused_writes(settings))
        decoder.prefill(prompt)
        step = lambda: (decoder.forward(feed), decoder.rewind(tokens))
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        step()
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
    drafts = {}
    for i, shape in enumerate(args.random_draft):
        if shape not in SHAPES:
            raise SystemExit(f"--random-draft: unknown shape {shape!r}; choose from {sorted(SHAPES)}")
        draft_config = llama_config(shape)
        draft_config.vocab_size = config.vocab_size  # a draft must score the target's tokens
        drafts[f"draft RANDOM {shape}"] = random_llama(draft_config, device, dtype=DTYPES[args.dtype],
                                                       seed=args.seed + 2 + i)
    return target, drafts, prompts, f"RANDOM weights, {args.random_target} shape"


def widened(loaded, prompt: list[int], args, device: torch.device):
    """The loaded model carried into --widen's shape, built on the device, checked against the model's own logits
    on `prompt` before it is used; (target, description, drafts: --widen-gptq's GPTQ copies, carried alike, and
    --small-gptq's, left small)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from decode import SHAPES
    from widen import WIDTH_KEYS, widen, widest_error

    import modelpress

    if args.widen not in SHAPES:
        raise SystemExit(f"--widen: unknown shape {args.widen!r}; choose from {sorted(SHAPES)}")
    small = loaded.model.float().eval()
    dims = {k: v for k, v in SHAPES[args.widen].items() if k in WIDTH_KEYS}
    target = widen(small, device, DTYPES[args.dtype], **dims)
    error = widest_error(small, target, prompt)
    print(f"target: {sum(p.numel() for p in target.parameters()) / 1e9:.2f}B parameters, logits within {error:.2e} "
          "of the model's (relative to its largest)", file=sys.stderr)
    if error > 0.05:
        raise SystemExit(f"the model widened to {args.widen} does not carry its function (error {error:.3g})")
    drafts = {}
    for spec in dict.fromkeys([*args.widen_gptq, *args.small_gptq]):
        quantized = copy.deepcopy(small).to(device)
        report = modelpress.quantize(quantized, modelpress.GPTQ(spec), tokenizer=loaded.tokenizer,
                                     calibration=modelpress.CalibrationSettings(device=str(device)))
        print(f"GPTQ {spec}: {report.seconds:.0f} s to quantize", file=sys.stderr)
        if spec in args.widen_gptq:
            quantized.cpu()  # widen builds from CPU weights; the small copy below goes back to the device
            draft = widen(quantized, device, DTYPES[args.dtype], **dims)
            print(f"GPTQ {spec} draft widened: logits within {widest_error(quantized, draft, prompt):.2e} of "
                  "the small quantized model's", file=sys.stderr)
            drafts[f"self GPTQ {spec}"] = draft
        if spec in args.small_gptq:
            drafts[f"draft GPTQ {spec}, {args.widen} -> small"] = quantized.to(device, DTYPES[args.dtype]).eval()
    return target, f"{loaded.source} carried into the {args.widen} shape (bench/widen.py)", drafts


def headed_copy(draft, scheme: str):
    """A copy of `draft` with its output head (and a tied embedding) quantized round-to-nearest under `scheme`."""
    import modelpress

    headed = copy.deepcopy(draft)
    modelpress.quantize(headed, modelpress.Head(scheme))
    return headed


class Report:
    """The JSON file, rewritten (atomically) after every run: meta, the runs so far, the summary rows so far."""

    def __init__(self, path: str | None, meta: dict) -> None:
        self.path = Path(path) if path else None
        self.meta, self.runs, self.rows = meta, [], []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add_run(self, run: dict) -> None:
        self.runs.append(run)
        self.write()

    def add_rows(self, rows: list[dict]) -> None:
        self.rows += rows
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        partial = self.path.with_suffix(self.path.suffix + ".partial")
        partial.write_text(json.dumps({"meta": self.meta, "rows": self.rows, "runs": self.runs}, indent=1) + "\n")
        partial.replace(self.path)


def run_all(target, drafts: dict, prompts, args, report: Report, costs: dict) -> None:
    """drafts: {config name: (draft model, its name in `costs`, k, share the target's KV cache)}."""
    device = next(target.parameters()).device
    if args.session:
        return run_all_in_sessions(target, drafts, prompts, args, report, costs, device)
    for temperature in args.temperatures:
        runs = {(path, name): [] for path in args.decode for name in ["target", *drafts]}
        identical: dict = {key: [] for key in runs if key[1] != "target"}
        for i, prompt in enumerate(prompts):
            seed = args.seed + i
            for path in args.decode:
                settings = path_settings(path, max_new_tokens=args.new_tokens,
                                         sampling=SamplingConfig(temperature, top_p=args.top_p))
                run_prompt(target, drafts, prompt, settings, args, seed, device,
                           lambda name, result, same=None: record(report, runs, temperature, path, name, i, result,
                                                                  identical=same))
                for name in drafts:
                    identical[(path, name)].append(runs[(path, name)][-1].tokens == runs[(path, "target")][-1].tokens)
            print(f"temperature {temperature}, prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
        report.add_rows(summarize(temperature, runs, identical, costs, {n: c[1:] for n, c in drafts.items()}))


def run_all_in_sessions(target, drafts: dict, prompts, args, report: Report, costs: dict, device) -> None:
    """run_all with each configuration's prompts in one DecodeSession (a model is in one session at a time)."""
    for temperature in args.temperatures:
        runs = {(path, name): [] for path in args.decode for name in ["target", *drafts]}
        for path in args.decode:
            settings = path_settings(path, max_new_tokens=args.new_tokens,
                                     sampling=SamplingConfig(temperature, top_p=args.top_p))
            for name in ["target", *drafts]:
                if name == "target":
                    session = DecodeSession(target, settings)
                else:
                    draft, _, k, share = drafts[name]
                    session = DecodeSession(target, settings, draft=draft,
                                            speculative=SpeculativeConfig(k, share_kv_cache=share))
                with session:
                    for i, prompt in enumerate(prompts):
                        result = session.generate(prompt,
                                                  generator=torch.Generator(device=device).manual_seed(args.seed + i))
                        same = None if name == "target" else result.tokens == runs[(path, "target")][i].tokens
                        record(report, runs, temperature, path, name, i, result, identical=same)
                print(f"temperature {temperature}, {path}, {name} done", file=sys.stderr, flush=True)
        identical = {key: [r.tokens == t.tokens for r, t in zip(results, runs[(key[0], "target")])]
                     for key, results in runs.items() if key[1] != "target"}
        report.add_rows(summarize(temperature, runs, identical, costs, {n: c[1:] for n, c in drafts.items()}))


def run_prompt(target, drafts: dict, prompt: list[int], settings: GenerationSettings, args, seed: int,
               device: torch.device, keep) -> None:
    """Plain decoding of the target, then speculation with each (draft, k), on one prompt; keep(name, result, same)."""
    base = generate(target, prompt, settings, generator=torch.Generator(device=device).manual_seed(seed))
    keep("target", base)
    for name, (draft, _, k, share) in drafts.items():
        result = speculative_generate(target, draft, prompt, settings, SpeculativeConfig(k, share_kv_cache=share),
                                      generator=torch.Generator(device=device).manual_seed(seed))
        keep(name, result, result.tokens == base.tokens)


def record(report: Report, runs: dict, temperature: float, path: str, name: str, prompt: int, result,
           identical: bool | None = None) -> None:
    runs[(path, name)].append(result)
    run = {"temperature": temperature, "path": path, "ran": result.decode_path, "config": name, "prompt": prompt,
           **{k: v for k, v in result.to_dict().items() if k != "tokens"}}
    if identical is not None:
        run["identical"] = identical
    report.add_run(run)


def summarize(temperature: float, runs: dict, identical: dict, costs: dict, configs: dict[str, tuple[str, int]]
              ) -> list[dict]:
    """configs: {config name: (draft name in `costs`, k)}."""
    rows = []
    base_rate = {}
    for (path, name), results in runs.items():
        tokens = sum(len(r.tokens) for r in results)
        seconds = sum(r.seconds for r in results)
        capture = sum(r.capture_seconds for r in results)
        drafted = sum(r.drafted for r in results)
        rate = tokens / seconds
        decode_rate = tokens / (seconds - capture) if seconds > capture else None
        # the calls after the first prompt's (in a session: those that reuse its decoders and graphs)
        later = results[1:]
        later_rate = sum(len(r.tokens) for r in later) / sum(r.seconds for r in later) if later else None
        if name == "target":
            base_rate[path] = rate, decode_rate, later_rate
        verify_passes = sum(r.rounds for r in results) if name != "target" else tokens
        ran = sorted({r.decode_path for r in results})
        row = {"temperature": temperature, "path": f"{path} ({'/'.join(ran)})", "config": name,
               "new_tokens": tokens, "seconds": seconds, "capture_seconds": capture, "tokens_per_s": rate,
               "decode_tokens_per_s": decode_rate, "speedup": rate / base_rate[path][0],
               "decode_speedup": decode_rate / base_rate[path][1] if decode_rate and base_rate[path][1] else None,
               "later_speedup": later_rate / base_rate[path][2] if later_rate and base_rate[path][2] else None,
               "acceptance_rate": sum(r.accepted for r in results) / drafted if drafted else None,
               "tokens_per_target_pass": tokens / verify_passes,
               "rounds": sum(r.rounds for r in results),
               "draft_cost": costs[path][configs[name][0]] if name != "target" else None,
               "verify_cost": costs[path][f"verify {configs[name][1]}"] if name != "target" else None,
               "target_step_ms": costs[path]["target_step_ms"]}
        if name != "target" and temperature == 0:
            row["identical"] = f"{sum(identical[(path, name)])}/{len(results)}"
        rows.append(row)
    return rows


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def draft_costs(target, drafts: dict, prompt: list[int], paths: list[str], ks: list[int]
                ) -> dict[str, dict[str, float]]:
    """{path: {draft: median step time over the target's, "verify K": the target's K+1-token forward over its
    step, for each K in ks}} on each path that runs (round robin, 3 rounds)."""
    costs = {}
    for path in paths:
        settings = path_settings(path)
        ran = {name: decode_path(model, settings, None) for name, model in [("target", target), *drafts.items()]}
        times: dict[str, list[float]] = {name: [] for name in [*ran, *(f"verify {k}" for k in ks)]}
        for _ in range(3):
            for name, model in [("target", target), *drafts.items()]:
                times[name].append(step_seconds(model, prompt, ran[name], settings))
            for k in ks:
                times[f"verify {k}"].append(step_seconds(target, prompt, ran["target"], settings, tokens=k + 1))
        target_s = statistics.median(times["target"])
        costs[path] = {name: statistics.median(v) / target_s for name, v in times.items()}
        costs[path]["target_step_ms"] = 1000 * target_s
    return costs


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.random_target:
        target, drafts, prompts, source = random_target(args, device)
    else:
        loaded = load_model(args.model)
        prompts = pick_prompts(loaded.tokenizer, args)
        if args.widen:
            target, source, drafts = widened(loaded, prompts[0], args, device)
        else:
            target, source, drafts = loaded.model.to(device).to(DTYPES[args.dtype]).eval(), loaded.source, {}
    drafts = {**{f"self {spec}": low_bit_draft(target, WeightScheme.parse(spec)) for spec in args.drafts}, **drafts}
    for spec in args.draft_model:
        drafts[f"draft {spec}"] = load_model(spec).model.to(device).to(DTYPES[args.dtype]).eval()
    if args.draft_head:
        drafts = {**drafts, **{f"{name}, {args.draft_head} head": headed_copy(model, args.draft_head)
                               for name, model in drafts.items()}}
    several = len(args.draft_tokens) > 1
    caches = {"shared": [True], "own": [False], "both": [True, False]}[args.draft_cache]
    configs = {f"{name}{f', k={k}' if several else ''}{'' if share or args.draft_cache == 'own' else ', own cache'}":
               (model, name, k, share) for name, model in drafts.items() for k in args.draft_tokens for share in caches}
    for path in args.decode:  # first calls build prepared weights and compile kernels for each T and cache length
        warm = path_settings(path, max_new_tokens=args.new_tokens, sampling=SamplingConfig(0.0))
        run_prompt(target, configs, prompts[0], warm, args, args.seed, device, lambda *_: None)
    costs = draft_costs(target, drafts, prompts[0], args.decode, args.draft_tokens)
    meta = {"model": source, "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "draft_tokens": args.draft_tokens, "top_p": args.top_p,
            "decode": args.decode, "draft_cache": args.draft_cache, "session": args.session, "device": args.device, "dtype": args.dtype,
            "threads": args.threads,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "step_costs": costs,
            "complete": False}
    report = Report(args.json, meta)
    run_all(target, configs, prompts, args, report, costs)
    meta["complete"] = True
    report.write()
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in report.rows:
        print("| " + " | ".join(fmt(row.get(k)) for k, _ in COLUMNS) + " |")


if __name__ == "__main__":
    main()
