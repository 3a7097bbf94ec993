"""Benchmark: batch-1 CPU decode of model families at the shapes of real small checkpoints, on generate's default
path (the native step, inference/native_decode.py) against its eager path, float32 and int4/g32 with an int8/g32
head. The weights are random (no checkpoint of these families is installed offline): the speed of a step depends
on the shapes, not the values. As a check that both paths run the same model, the logits of the prompt's first token
are compared (random weights leave near-ties among the top logits, so greedy tokens can part on rounding alone).

Shapes (from the checkpoints' config.json files):
- gemma-3-270m: Gemma3ForCausalLM, hidden 640, 18 layers (every sixth full attention, the rest a window of 512),
  4 heads of 256 and 1 key/value head, MLP 2048, vocabulary 262144 (its head alone is 168 M of the 268 M weights)
- qwen3-0.6b: Qwen3ForCausalLM, hidden 1024, 28 layers, 16 heads of 128 and 8 key/value heads, MLP 3072,
  vocabulary 151936

    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_decode_families.py --json bench/results/cpu_decode_families.json
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

from modelpress.algorithms.quantize.head import HeadConfig, quantize_head  # noqa: E402
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn  # noqa: E402
from modelpress.formats.scheme import WeightScheme  # noqa: E402
from modelpress.inference.decoding import GenerationSettings, forward_logits, generate  # noqa: E402
from modelpress.inference.native_decode import NativeDecoder  # noqa: E402
from modelpress.nn.cpu_backend import fast_cpu  # noqa: E402
from modelpress.inference.sampling import SamplingConfig  # noqa: E402


def gemma3_270m():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    layers = 18
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, layer_types=types,
        max_position_embeddings=32768, tie_word_embeddings=False))


def qwen3_0_6b():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, tie_word_embeddings=False))


SHAPES = {"gemma-3-270m": gemma3_270m, "qwen3-0.6b": qwen3_0_6b}


def decode(model, prompt: list[int], new_tokens: int, path: str) -> tuple[float, str]:
    """(tokens per second from the first new token to the last, the path that ran)."""
    stamps: list[float] = []
    settings = GenerationSettings(max_new_tokens=new_tokens, sampling=SamplingConfig(temperature=0.0), decode=path)
    result = generate(model, torch.tensor([prompt]), settings, on_tokens=lambda _: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), result.decode_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rows = []
    for shape in args.shapes:
        torch.manual_seed(0)
        model = SHAPES[shape]().float().eval()
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt,)).tolist()
        for scheme in (None, "int4/g32"):
            if scheme is not None:
                quantize_rtn(model, RTNConfig(WeightScheme.parse(scheme)))
                quantize_head(model, HeadConfig(WeightScheme.parse("int8/g32")))
            speeds: dict[str, list[float]] = {"auto": [], "eager": []}
            paths = {}
            for _ in range(args.repeats):   # the two paths in turn, so that drift hits both
                for path in speeds:
                    rate, paths[path] = decode(model, prompt, args.new_tokens, path)
                    speeds[path].append(rate)
            with fast_cpu():   # the eager path's kernels, as generate runs them
                reference = forward_logits(model, prompt[:1], None)   # one token: decode-sized calls on both
                native = NativeDecoder(model, args.prompt).prefill(prompt[:1])
            row = {"shape": shape, "model": "float32" if scheme is None else f"{scheme} + head int8/g32",
                   "native_tok_s": statistics.median(speeds["auto"]), "eager_tok_s": statistics.median(speeds["eager"]),
                   "native_path": paths["auto"], "max_logit_difference": (native - reference).abs().max().item(),
                   "logit_range": (reference.max() - reference.min()).item()}
            row["speedup"] = row["native_tok_s"] / row["eager_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    print(f"\n{args.threads} thread(s), {args.prompt}-token prompt, {args.new_tokens} new tokens, "
          f"median of {args.repeats}\n")
    print("| shape | model | native step (tok/s) | eager (tok/s) | native / eager | max logit difference (range) |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['model']} | {r['native_tok_s']:.1f} | {r['eager_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['max_logit_difference']:.1e} ({r['logit_range']:.1f}) |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "prompt": args.prompt,
                                         "new_tokens": args.new_tokens, "repeats": args.repeats,
                                         "torch": torch.__version__, "machine": platform.processor() or
                                         platform.machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
