"""Benchmark: perplexity over long windows with a quantized KV cache, and the cache's real bytes per token.

Each window (default 4 x 2048 tokens of the embedded corpus) is fed through the model in chunks (default
128 tokens) on top of one cache per mode, so every chunk attends to the cached, quantized K/V of all
earlier chunks (per-token int8/fp8 modes also quantize the chunk's own K/V before attending to it; KIVI
keeps the newest 128..255 tokens in float). All modes run in lockstep, chunk by chunk, so KL divergence
and top-1 agreement are taken against the float cache's logits on the same positions.

Bytes per token are what the cache stores after the window (codes + scales + offsets + float window),
divided by the window length, summed over layers:
- "run" columns: the cache as it ran (the model's dtype; float32 on the CPU by default);
- "16-bit" columns: the same cache code filled with bfloat16 states of the model's shapes, against a
  bfloat16 float cache (the deployment comparison). "marginal" is the cost of each token beyond the float
  window (quantized part only).

    .venv/bin/python bench/kv_cache.py --json bench/results/kv_cache_cpu.json
    python bench/kv_cache.py --device cuda --dtype bfloat16 --windows 8 --json kv_cache_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modelpress.inference.kv_cache import KV_MODES, KVCacheConfig, QuantizedKVLayer, cache_nbytes, make_kv_cache
from modelpress.io.model import load_model
from modelpress.io.text import load_text, make_windows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = [("mode", "mode"), ("perplexity", "PPL"), ("ppl_change_pct", "dPPL %"),
           ("perplexity_second_half", "PPL 2nd half"), ("ppl_second_half_change_pct", "dPPL 2nd %"),
           ("kl_divergence", "KL"), ("top1_agreement", "top-1"),
           ("bytes_per_token_run", "B/tok run"), ("ratio_run", "x run"), ("bytes_per_token_16bit", "B/tok 16-bit"),
           ("ratio_16bit", "x 16-bit"), ("marginal_ratio_16bit", "x marginal"), ("seconds", "s")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=128, help="tokens per forward call")
    p.add_argument("--modes", nargs="+", default=["float", "int8", "fp8", "int4"])
    p.add_argument("--residual", type=int, default=None, help="KIVI float window (default 128)")
    p.add_argument("--group-size", type=int, default=128, help="KIVI tokens per key scale")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machines)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def config_for(mode: str, args: argparse.Namespace) -> KVCacheConfig:
    if mode in KV_MODES and KV_MODES[mode].kivi:
        return KVCacheConfig(mode, residual_length=args.residual, group_size=args.group_size)
    return KVCacheConfig(mode)


class Totals:
    def __init__(self) -> None:
        self.nll = self.nll_second = self.kl = 0.0
        self.tokens = self.tokens_second = self.agree = 0
        self.seconds = 0.0
        self.bytes_run: list[float] = []
        self.quantized_tokens = 0


@torch.no_grad()
def score_window(model, window: torch.Tensor, modes: list[str], args, totals: dict[str, Totals]) -> None:
    device = next(model.parameters()).device
    ids = window.to(device).unsqueeze(0)
    length = ids.shape[1]
    caches = {mode: make_kv_cache(model, config_for(mode, args)) for mode in modes}
    for start in range(0, length - 1, args.chunk):
        end = min(start + args.chunk, length - 1)  # positions start..end-1 predict tokens start+1..end
        targets = ids[0, start + 1 : end + 1]
        logprobs = {}
        for mode in modes:
            began = time.perf_counter()
            logits = model(input_ids=ids[:, start:end], past_key_values=caches[mode], use_cache=True).logits[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            totals[mode].seconds += time.perf_counter() - began
            logprobs[mode] = F.log_softmax(logits.float(), dim=-1)
        second = torch.arange(start + 1, end + 1, device=device) >= length // 2
        for mode in modes:
            t, lp = totals[mode], logprobs[mode]
            nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            t.nll += nll.sum().item()
            t.tokens += nll.numel()
            t.nll_second += nll[second].sum().item()
            t.tokens_second += int(second.sum())
            if "float" in logprobs:
                ref = logprobs["float"]
                t.kl += (ref.exp() * (ref - lp)).sum().item()
                t.agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
    for mode, cache in caches.items():
        totals[mode].bytes_run.append(cache_nbytes(cache) / cache.get_seq_length())
        layer = cache.layers[0]
        totals[mode].quantized_tokens = getattr(layer, "quantized_length", 0)


def bytes_16bit(model, mode: str, args, tokens: int) -> tuple[float, float | None]:
    """Bytes per token of a bfloat16 cache of this model's shapes after `tokens` tokens, and the marginal
    bytes per token of the quantized part (None for float)."""
    text = model.config.get_text_config(decoder=True)
    layers = text.num_hidden_layers
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if mode == "float":
        return 2 * layers * heads * head_dim * 2, None
    layer = QuantizedKVLayer(config_for(mode, args))
    for start in range(0, tokens, args.chunk):
        part = torch.randn(1, heads, min(args.chunk, tokens - start), head_dim).to(torch.bfloat16)
        layer.update(part, part)
    window = (layer.keys.numel() + layer.values.numel()) * 2
    quantized = layer.nbytes() - window
    marginal = quantized / layer.quantized_length * layers if layer.quantized_length else None
    return layer.nbytes() * layers / tokens, marginal


def summarize(model, modes, totals, args) -> list[dict]:
    rows = []
    base = totals.get("float")
    float16, _ = bytes_16bit(model, "float", args, args.seq_len)
    for mode in modes:
        t = totals[mode]
        ppl = float(torch.exp(torch.tensor(t.nll / t.tokens)))
        ppl2 = float(torch.exp(torch.tensor(t.nll_second / t.tokens_second)))
        per16, marginal = bytes_16bit(model, mode, args, args.seq_len)
        run = sum(t.bytes_run) / len(t.bytes_run)
        row = {"mode": mode, "config": vars(config_for(mode, args)) if mode != "float" else None,
               "perplexity": ppl, "perplexity_second_half": ppl2, "scored_tokens": t.tokens,
               "kl_divergence": t.kl / t.tokens if base else None,
               "top1_agreement": t.agree / t.tokens if base else None,
               "bytes_per_token_run": run, "bytes_per_token_16bit": per16, "marginal_bytes_per_token_16bit": marginal,
               "ratio_16bit": float16 / per16, "marginal_ratio_16bit": float16 / marginal if marginal else None,
               "quantized_tokens_at_end": t.quantized_tokens, "seconds": t.seconds}
        rows.append(row)
    if base:
        float_row = rows[modes.index("float")]
        for row in rows:
            row["ppl_change_pct"] = 100 * (row["perplexity"] / float_row["perplexity"] - 1)
            second = row["perplexity_second_half"] / float_row["perplexity_second_half"]
            row["ppl_second_half_change_pct"] = 100 * (second - 1)
            row["ratio_run"] = float_row["bytes_per_token_run"] / row["bytes_per_token_run"]
    return rows


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model.to(args.device).to(DTYPES[args.dtype]).eval()
    windows = make_windows(loaded.tokenizer, load_text(args.text), seq_len=args.seq_len, eval_windows=args.windows).eval
    modes = list(dict.fromkeys(args.modes))
    totals = {mode: Totals() for mode in modes}
    for i, window in enumerate(windows):
        began = time.perf_counter()
        score_window(model, window, modes, args, totals)
        print(f"window {i + 1}/{len(windows)}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    rows = summarize(model, modes, totals, args)
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    if args.json:
        meta = {"model": loaded.source, "text": args.text or "default", "windows": len(windows),
                "seq_len": args.seq_len,
                "chunk": args.chunk, "device": args.device, "dtype": args.dtype, "threads": args.threads,
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
