"""Benchmark: what reading the static int8 KV cache's codes costs in quality, step by step on generate's decode path.

The embedded model (or --model) decodes real text teacher-forced on CUDA, under generate's decode-time fusions and
CUDA graphs: a prompt of --prompt tokens, then one token a step to the end of each window. Every step's next-token
distribution is set against the same step's on a float static cache (the model's dtype): KL divergence, top-1
agreement, and the perplexity of the text's next tokens, for each way of reading an int8 cache:

- folded: the attention kernels read the codes and apply each token's scale to its score and probability
  (triton_attention.FOLD_CODE_SCALES, the default);
- decoded: the kernels decode the codes to the model's dtype, as kv_quant dequantizes them (FOLD_CODE_SCALES off);
- dequantized: attention reads a float copy of the cache, dequantized each step (fusion.READ_INT8_CODES off).

    python bench/kv_codes.py --json bench/results/kv_codes_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from modelpress.inference.decoding import GenerationSettings, kernel_context  # noqa: E402
from modelpress.inference.kv_cache import KVCacheConfig  # noqa: E402
from modelpress.inference.static_decode import StaticDecoder  # noqa: E402
from modelpress.io.model import load_model  # noqa: E402
from modelpress.io.text import load_text, make_windows  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@contextlib.contextmanager
def reading(way: str):
    """The int8 cache read `way` (module docstring); the settings restored after."""
    from modelpress.inference import fusion
    from modelpress.nn import triton_attention

    before = triton_attention.FOLD_CODE_SCALES, fusion.READ_INT8_CODES
    triton_attention.FOLD_CODE_SCALES = way == "folded"
    fusion.READ_INT8_CODES = way != "dequantized"
    try:
        yield
    finally:
        triton_attention.FOLD_CODE_SCALES, fusion.READ_INT8_CODES = before


@torch.no_grad()
def steps(model, window: list[int], prompt: int, kv: KVCacheConfig | None) -> tuple[torch.Tensor, bool]:
    """(len(window) - prompt, V) float32 log-probabilities of each next token after the prompt, one step a token,
    and whether the cache handed attention its codes."""
    with kernel_context(GenerationSettings(), model):
        decoder = StaticDecoder(model, len(window), graph=next(model.parameters()).is_cuda, kv_cache=kv)
        rows = [decoder.prefill(window[:prompt]).float().log_softmax(-1).cpu()]
        rows += [decoder.step(token).float().log_softmax(-1).cpu() for token in window[prompt:-1]]
        codes = bool(getattr(decoder.cache, "read_codes", False))
    return torch.cat(rows), codes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model spec (default: the embedded model)")
    p.add_argument("--text", default=None, help="a text spec (default: the embedded corpus)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=1024, help="tokens a window")
    p.add_argument("--prompt", type=int, default=32, help="tokens prefilled; the rest decoded one a step")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kv_codes.py needs CUDA: the int8 codes are read by the GPU's attention kernels")
    if not 0 < args.prompt < args.length:
        raise SystemExit(f"--prompt must be between 1 and --length - 1, got {args.prompt}")
    loaded = load_model(args.model)
    model = loaded.model.to("cuda", DTYPES[args.dtype]).eval()
    source = load_text(args.text)
    windows = make_windows(loaded.tokenizer, source, seq_len=args.length, eval_windows=args.windows).eval.tolist()
    ways = ["folded", "decoded", "dequantized"]
    totals = {way: {"kl": 0.0, "agree": 0, "nll": 0.0, "codes": False} for way in ["float"] + ways}
    count = 0
    for window in windows:
        target = torch.tensor(window[args.prompt:])
        base, _ = steps(model, window, args.prompt, None)
        count += len(target)
        for way in ["float"] + ways:
            if way == "float":
                logp, codes = base, False
            else:
                with reading(way):
                    logp, codes = steps(model, window, args.prompt, KVCacheConfig("int8"))
            t = totals[way]
            t["kl"] += F.kl_div(logp, base, log_target=True, reduction="sum").item()
            t["agree"] += (logp.argmax(-1) == base.argmax(-1)).sum().item()
            t["nll"] -= logp.gather(1, target[:, None]).sum().item()
            t["codes"] = codes
    rows = [{"cache": "float" if way == "float" else f"int8, {way}", "codes_read": t["codes"],
             "kl_divergence": t["kl"] / count, "top1_agreement": t["agree"] / count,
             "perplexity": math.exp(t["nll"] / count)} for way, t in totals.items()]
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, {loaded.source} in {args.dtype}; {source.name}: "
          f"{len(windows)} windows of {args.length} tokens, {args.prompt} prefilled, {count} decode steps")
    print("| cache | codes read | KL to the float cache | top-1 agreement | perplexity |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cache']} | {'yes' if r['codes_read'] else 'no'} | {r['kl_divergence']:.2e} | "
              f"{r['top1_agreement']:.4f} | {r['perplexity']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "model": loaded.source,
                                         "dtype": args.dtype, "text": source.name, "windows": len(windows),
                                         "length": args.length, "prompt": args.prompt, "steps": count,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
