"""Where one batch-1 decode step of the default model goes on the CPU: forward hooks time each module kind
(inclusive), torch.profiler gives the operators, and the step is timed bare and inside `generate` loops.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_decode_profile.py --scheme int4/g32 --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_decode_profile.py --scheme int8/g32 --head int8/g32
    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_decode_profile.py --head int8/g32 --compile   # + torch.compile

Hooks add their own cost (two Python calls per module): read the shares, and the bare step time beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_decode import quantize_head  # noqa: E402

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn  # noqa: E402
from modelpress.formats.scheme import WeightScheme  # noqa: E402
from modelpress.inference.decoding import GenerationSettings, generate  # noqa: E402
from modelpress.io.model import load_model  # noqa: E402
from modelpress.nn.cpu_backend import CPU_BACKEND  # noqa: E402
from modelpress.nn.layers import output_head_names  # noqa: E402
from modelpress.nn.quant_linear import QuantLinear  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

PROMPT = list(range(100, 116))


def module_kind(name: str, module: nn.Module, heads: set[str]) -> str | None:
    if name in heads:
        return "output head"
    if isinstance(module, QuantLinear):
        return "quantized linear layers"
    if isinstance(module, nn.Linear):
        return "float linear layers"
    kind = type(module).__name__
    for suffix, label in (("Attention", "attention (with its linears)"), ("MLP", "MLP (with its linears)"),
                          ("RMSNorm", "RMS norms"), ("DecoderLayer", "decoder blocks (everything in them)")):
        if kind.endswith(suffix):
            return label
    return None


def decode_steps(model: nn.Module, steps: int, after_prefill=None) -> list[float]:
    """Seconds of each of `steps` bare forward calls of one token on a DynamicCache after a 16-token prompt."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([PROMPT]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    if after_prefill is not None:
        after_prefill()
    token, times = torch.tensor([[5]]), []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return times


def hooked_breakdown(model: nn.Module, steps: int) -> dict[str, tuple[float, float]]:
    """kind -> (calls per step, ms per step), inclusive of children."""
    heads, spent, handles = output_head_names(model), {}, []
    for name, module in model.named_modules():
        kind = module_kind(name, module, heads)
        if kind is None:
            continue
        def pre(m, args):
            m._profile_start = time.perf_counter()
        def post(m, args, out, kind=kind):
            spent.setdefault(kind, []).append(time.perf_counter() - m._profile_start)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    total = sum(decode_steps(model, steps, after_prefill=spent.clear))
    for handle in handles:
        handle.remove()
    out = {kind: (len(v) / steps, 1e3 * sum(v) / steps) for kind, v in spent.items()}
    out["whole step (hooked)"] = (1.0, 1e3 * total / steps)
    return out


def static_steps_ms(model: nn.Module, steps: int, compiled: bool) -> tuple[float, float]:
    """(median ms per decode step on a static KV cache, seconds spent before the first timed step), the steps
    run by the model as it is or by torch.compile of it (inductor: needs a C++ compiler)."""
    from modelpress.inference.static_decode import StaticDecoder

    start = time.perf_counter()
    decoder = StaticDecoder(model, len(PROMPT) + steps + 2, graph=False, compile=compiled)
    decoder.prefill(PROMPT)  # compiles the prompt's forward, when asked to
    decoder.step(5)  # compiles the step's, when asked to
    if compiled and decoder.compile_error:
        print(f"torch.compile failed, the steps ran uncompiled: {decoder.compile_error}", file=sys.stderr)
    setup = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        decoder.step(5)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), setup


def per_token(fn, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / new_tokens)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="int4/g32", help="RTN scheme of the linear layers, or float32")
    parser.add_argument("--head", default=None, help="also quantize the output head to this scheme")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--compile", action="store_true",
                        help="also time static-cache decode steps through torch.compile (minutes of compiling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(None).model.eval()
    if args.scheme != "float32":
        quantize_rtn(model, RTNConfig(WeightScheme.parse(args.scheme)))
    if args.head:
        quantize_head(model, WeightScheme.parse(args.head))
    ids = torch.tensor([PROMPT])
    with torch.no_grad(), CPU_BACKEND.fast():
        decode_steps(model, 3)  # builds the prepared weights
        bare = 1e3 * statistics.median(decode_steps(model, args.steps))
        hf = per_token(lambda: model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                              do_sample=False, pad_token_id=0), args.new_tokens, 3)
        ours = {path: per_token(lambda: generate(model, PROMPT, GenerationSettings(args.new_tokens, decode=path)),
                                args.new_tokens, 3) for path in ("eager", "static")}
        print(f"{args.scheme} (head {args.head or 'float'}), {args.threads} thread(s), ms per token: bare forward "
              f"{bare:.1f}; transformers generate {hf:.1f}; modelpress generate eager {ours['eager']:.1f}, "
              f"static cache {ours['static']:.1f} (generate times include the 16-token prefill)")
        if args.compile:
            eager_ms, _ = static_steps_ms(model, args.steps, compiled=False)
            compiled_ms, setup = static_steps_ms(model, args.steps, compiled=True)
            print(f"static-cache steps: eager {eager_ms:.1f} ms, torch.compile {compiled_ms:.1f} ms "
                  f"(after {setup:.0f} s of compiling)")
        for kind, (calls, ms) in sorted(hooked_breakdown(model, args.steps).items(), key=lambda kv: -kv[1][1]):
            print(f"  {kind:40s} {calls:6.0f} calls/step {ms:8.2f} ms/step")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode_steps(model, 5)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
