"""What a DecodeSession saves: the same prompts generated as separate calls (each prepares the model: on CUDA the
decode-time fusions, the int4 re-layout and the graph captures; on the CPU the native step's structures) and in one
session (prepared once). Wall time of every call, setup included, on the path users get (decode="auto").

    PYTHONPATH=src python bench/session.py --device cuda --dtype bfloat16 --random-target llama2-7b --draft int4/g128
    .venv/bin/python bench/session.py --threads 2 --quantize int4/g32     # the default model, CPU, native step

--random-target SHAPE: a RANDOM-weight Llama of that shape (bench/decode.py; random prompts); else the default model
(prompts from the embedded text). --quantize SCHEME: the target quantized round-to-nearest first; --draft SCHEME:
self-speculative decoding with an RTN copy under SCHEME. Prints a table and writes JSON (--json).

--turns N: a conversation instead, in one session: the first prompt of --prompt-tokens, then each turn the last
prompt, its reply and a message of --message-tokens. Timed twice on the same prompts (the first run's replies): each
prompt run whole (reuse_prefix=False), and only the part after what the cache holds from the turn before.

    .venv/bin/python bench/session.py --threads 2 --quantize int4/g32 --turns 6 --prompt-tokens 256 --new-tokens 48
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from modelpress.formats.scheme import WeightScheme  # noqa: E402
from modelpress.inference.decoding import GenerationSettings, generate  # noqa: E402
from modelpress.inference.sampling import SamplingConfig  # noqa: E402
from modelpress.inference.session import DecodeSession  # noqa: E402
from modelpress.inference.speculative import SpeculativeConfig, low_bit_draft, speculative_generate  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--random-target", default=None, metavar="SHAPE")
    p.add_argument("--quantize", default=None, metavar="SCHEME", help="RTN-quantize the target first")
    p.add_argument("--draft", default=None, metavar="SCHEME", help="self-speculative draft: an RTN copy")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--turns", type=int, default=0, help="a conversation of this many turns (see above)")
    p.add_argument("--message-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    return p.parse_args()


def target_and_prompts(args, device: torch.device):
    """The model and its prompts: --prompts of --prompt-tokens, or with --turns the conversation's messages."""
    lengths = ([args.prompt_tokens] + [args.message_tokens] * (args.turns - 1) if args.turns
               else [args.prompt_tokens] * args.prompts)
    if args.random_target:
        from decode import SHAPES, llama_config, random_llama

        if args.random_target not in SHAPES:
            raise SystemExit(f"--random-target: one of {', '.join(SHAPES)}")
        model = random_llama(llama_config(args.random_target), device, DTYPES[args.dtype])
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
        return model, prompts, f"RANDOM {args.random_target}"
    from modelpress.io.model import load_model
    from modelpress.io.text import load_text, make_windows

    loaded = load_model(None)
    windows = make_windows(loaded.tokenizer, load_text(None), seq_len=max(lengths), eval_windows=len(lengths) * 10).eval
    model = loaded.model.to(device, DTYPES[args.dtype]).eval()
    return model, [windows[i * 10][:n].tolist() for i, n in enumerate(lengths)], loaded.source


def timed(call) -> tuple[float, object]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = call()
    sync()
    return time.perf_counter() - start, result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, prompts, source = target_and_prompts(args, device)
    if args.quantize:
        import modelpress

        modelpress.quantize(model, modelpress.RTN(args.quantize))
    draft = low_bit_draft(model, WeightScheme.parse(args.draft)) if args.draft else None
    settings = GenerationSettings(max_new_tokens=args.new_tokens, sampling=SamplingConfig(0.0))
    config = SpeculativeConfig(args.draft_tokens)

    def one_call(prompt):
        if draft is None:
            return generate(model, prompt, settings)
        return speculative_generate(model, draft, prompt, settings, config)

    one_call(prompts[0])  # kernels compiled, weights prepared by a first call outside the timing
    if device.type == "cuda":  # and the session's shapes (its decoders' rounded lengths: Triton compiles per shape)
        with DecodeSession(model, settings, draft=draft, speculative=config if draft is not None else None) as warm:
            warm.generate(prompts[0])
    if args.turns:
        return conversation(args, model, prompts, settings, draft, config, source, device)
    rows, tokens = {}, {}
    for mode in ("calls", "session", "calls again"):
        if mode.startswith("calls"):
            timings = [timed(lambda p=p: one_call(p)) for p in prompts]
            setup = 0.0
        else:
            setup, session = timed(lambda: DecodeSession(model, settings, draft=draft,
                                                         speculative=config if draft is not None else None))
            with session:
                timings = [timed(lambda p=p: session.generate(p)) for p in prompts]
        seconds = [t for t, _ in timings]
        results = [r for _, r in timings]
        tokens[mode] = [r.tokens for r in results]
        new = sum(len(r.tokens) for r in results)
        rows[mode] = {"setup_s": setup, "first_call_s": seconds[0], "later_calls_median_s": statistics.median(
                      seconds[1:]) if len(seconds) > 1 else None, "capture_s": sum(r.capture_seconds for r in results),
                      "wall_s": setup + sum(seconds), "tokens_per_s": new / (setup + sum(seconds)),
                      "decode_path": ",".join(sorted({r.decode_path for r in results}))}
    same = tokens["session"] == tokens["calls"]
    base = (rows["calls"]["wall_s"] + rows["calls again"]["wall_s"]) / 2
    for row in rows.values():
        row["speedup"] = base / row["wall_s"]
    print(f"{source}{', ' + args.quantize if args.quantize else ''}"
          f"{', self-draft ' + args.draft if args.draft else ''} on {device} ({args.dtype}), {len(prompts)} prompts x "
          f"{args.new_tokens} new tokens; the session's tokens equal the calls': {same}")
    print("| mode | setup | first call | later calls (median) | captures | wall | tok/s | over calls | path |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for mode, r in rows.items():
        later = f"{r['later_calls_median_s'] * 1e3:.1f} ms" if r["later_calls_median_s"] is not None else "-"
        print(f"| {mode} | {r['setup_s'] * 1e3:.1f} ms | {r['first_call_s'] * 1e3:.1f} ms | {later} | "
              f"{r['capture_s'] * 1e3:.1f} ms | {r['wall_s']:.3f} s | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['decode_path']} |")
    if args.json:
        meta = {"model": source, "quantize": args.quantize, "draft": args.draft, "device": str(device),
                "dtype": args.dtype, "threads": args.threads, "prompts": len(prompts), "new_tokens": args.new_tokens,
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "same_tokens": same}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def conversation(args, model, messages, settings, draft, config, source, device) -> None:
    """Each turn's prompt is the last one, its reply and the next message; timed with whole prompts, then with
    the held prefix reused, on the same prompts (the first run's replies)."""
    runs, prompts = {}, []
    modes = (("whole prompts", False), ("held prefix", True))
    for mode, reuse in modes + modes if device.type == "cuda" else modes:  # on CUDA a first pass compiles each shape
        with DecodeSession(model, settings, draft=draft, speculative=config if draft is not None else None,
                           reuse_prefix=reuse) as session:
            turns = []
            for i, message in enumerate(messages):
                if not reuse and len(prompts) < len(messages):   # the last prompt, its reply, this message
                    prompts.append(prompts[-1] + turns[-1]["tokens"] + message if prompts else message)
                seconds, result = timed(lambda: session.generate(prompts[i]))
                turns.append({"prompt_tokens": len(prompts[i]), "reused_prompt_tokens": result.reused_prompt_tokens,
                              "seconds": seconds, "tokens": result.tokens, "decode_path": result.decode_path})
        runs[mode] = turns
    whole, held = runs["whole prompts"], runs["held prefix"]
    same = [a["tokens"] for a in whole] == [b["tokens"] for b in held]
    total = {mode: sum(t["seconds"] for t in turns) for mode, turns in runs.items()}
    print(f"{source}{', ' + args.quantize if args.quantize else ''}{', self-draft ' + args.draft if args.draft else ''}"
          f" on {device} ({args.dtype}, {args.threads} threads), a conversation of {len(messages)} turns "
          f"({args.prompt_tokens}-token first prompt, {args.message_tokens}-token messages, {args.new_tokens}-token "
          f"replies), path {whole[0]['decode_path']}; the same replies both ways: {same}")
    print("| turn | prompt tokens | reused | whole prompt | held prefix reused | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(whole, held)):
        print(f"| {i + 1} | {a['prompt_tokens']} | {b['reused_prompt_tokens']} | {a['seconds'] * 1e3:.1f} ms | "
              f"{b['seconds'] * 1e3:.1f} ms | {a['seconds'] / b['seconds']:.2f}x |")
    print(f"| all | | | {total['whole prompts']:.3f} s | {total['held prefix']:.3f} s | "
          f"{total['whole prompts'] / total['held prefix']:.2f}x |")
    if args.json:
        meta = {"model": source, "quantize": args.quantize, "draft": args.draft, "device": str(device),
                "dtype": args.dtype, "threads": args.threads, "turns": len(messages), "new_tokens": args.new_tokens,
                "prompt_tokens": args.prompt_tokens, "message_tokens": args.message_tokens,
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "same_tokens": same}
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs, "total_s": total}, indent=1) + "\n")


if __name__ == "__main__":
    main()
