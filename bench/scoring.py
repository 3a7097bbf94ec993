"""What the quality benchmarks share: copies of a float model that cost only their own linear layers,
swapping quantized layers for the float32 weight they store, per-token score totals that add up over
windows, scoring many models on the same windows in one pass, and the text table / JSON output."""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench.peers.common import DequantizedLinear
from torch import nn

from modelpress.eval.quality import evaluate_quality
from modelpress.nn.layers import replace_module
from modelpress.nn.quant_linear import QuantLinear

log = logging.getLogger("bench.scoring")


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares the input embedding (never quantized here) with the original, so each
    candidate costs only its own linear layers in memory. Each copy's size still counts the embedding."""
    embedding = model.get_input_embeddings().weight
    return copy.deepcopy(model, memo={id(embedding): embedding})


def materialize(model: nn.Module) -> nn.Module:
    """Swap every quantized layer for a plain float32 Linear holding the weight its library stores,
    rebuilt once by the library's own dequantization (ours: PackedWeight.dequantize; peers: see
    bench/peers). Sizes are measured before this. The scores are then those of the stored weights under
    float32 arithmetic for every row alike, not of any kernel's numerics (our CPU backend, for one,
    rounds activations to bfloat16), and each window costs a float forward instead of a dequantization
    of all 106M weights per call."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            weight, bias = module.dequantized_weight(torch.float32), module.bias
        elif isinstance(module, DequantizedLinear):
            weight, bias = module._dequantize().float(), module.bias
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        replace_module(model, name, linear)
    return model


@dataclass
class Score:
    """Per-token totals over some windows; totals of disjoint windows add up."""

    nll: float
    kl: float
    agree: float
    tokens: int
    windows: int

    @classmethod
    def of(cls, q) -> Score:
        return cls(nll=math.log(q.perplexity) * q.scored_tokens, kl=(q.kl_divergence or 0.0) * q.scored_tokens,
                   agree=(q.top1_agreement or 0.0) * q.scored_tokens, tokens=q.scored_tokens, windows=q.windows)

    def __add__(self, other: Score) -> Score:
        return Score(self.nll + other.nll, self.kl + other.kl, self.agree + other.agree,
                     self.tokens + other.tokens, self.windows + other.windows)

    def fields(self) -> dict:
        return {"perplexity": math.exp(self.nll / self.tokens), "kl_divergence": self.kl / self.tokens,
                "top1_agreement": self.agree / self.tokens, "windows": self.windows, "scored_tokens": self.tokens}


def score(base: nn.Module, models: dict[str, nn.Module], windows: torch.Tensor) -> dict[str, Score]:
    """Every model and the float `base` on the same windows, each against `base` (which runs once)."""
    start = time.perf_counter()
    quality = evaluate_quality({"float": base, **models}, windows, reference=base)
    seconds = time.perf_counter() - start
    log.info("scored %d models + float on %d windows in %.0f s (%.2f s per model-window)", len(models),
             len(windows), seconds, seconds / (len(windows) * (len(models) + 1)))
    return {name: Score.of(q) for name, q in quality.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Hand freed heap back to the system between builds (the machine is shared)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "weight_bytes":
        return f"{value / 1e6:.1f}"
    if key == "bits_per_weight":
        return f"{value:.3f}"
    if key == "kl_divergence":
        return f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"
    if key == "top1_agreement":
        return f"{100 * value:.1f}%"
    if key == "delta_perplexity":
        return f"{100 * value:+.1f}%"
    if key == "peak_mb":
        return f"{value:.0f}"
    if key in ("perplexity", "quantize_seconds", "quantize_cpu_seconds"):
        return f"{value:.2f}" if value < 1000 else f"{value:.3g}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]], left: int = 3, markdown: bool = False) -> str:
    """Rows as a text (or markdown) table; `columns` are (row field, heading); the first `left` align left."""
    lines = [[h for _, h in columns]] + [[cell(k, r.get(k)) for k, _ in columns] for r in rows]
    if markdown:
        rule = "|" + "|".join("---" if i < left else "---:" for i in range(len(columns))) + "|"
        return "\n".join(["| " + " | ".join(lines[0]) + " |", rule] + ["| " + " | ".join(x) + " |" for x in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
