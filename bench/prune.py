"""Benchmark: pruning methods on one float model and the same text windows.

Rows: magnitude (per layer and global), Wanda and SparseGPT at 50% unstructured and 2:4; SparseGPT 2:4
jointly with int4/g128; structured pruning at ~25% of all parameters (MLP neurons, decoder layers, or one
of three key/value groups plus neurons) and one of three key/value groups alone. Each row is scored
against the float model (PPL, KL(float ‖ row), top-1 agreement) on the evaluation windows; calibration
windows come from the same text after them.

Bytes: `pruned/dense` is what the pruned layers store (bitmask + kept values, as saved) over their dense
weights in the model's dtype (float32 here); `fp16 equiv.` is that ratio had the model been float16
(1 mask bit + 16 bits per kept weight, over 16 bits per weight). Forward time: fastest of 5 prefills of one
512-token window, batch 1, on this CPU (the sparse layers rebuild their dense weight on every call on a
CPU: see docs/benchmarks.md for what that means).

    .venv/bin/python bench/prune.py                                  # everything: 40 x 512 tokens, ~hours
    .venv/bin/python bench/prune.py --rows wanda-2:4 sparsegpt-2:4   # some rows; merged into the JSON
    .venv/bin/python bench/prune.py --windows 2 --calib-samples 4 --rows wanda-50 --json /tmp/p.json  # a quick look

Rows are merged into the JSON file by name after every scored group (--group rows share one float pass),
so runs of a few rows add up and an interrupted run keeps what it finished. Structured rows remove at
least --target-share of ALL parameters (embeddings included): neurons only, whole layers only, or one
key/value group of three plus enough neurons; each reports its parameter count and measured forward time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from modelpress.algorithms.prune import MagnitudeConfig, SparseGPTConfig, StructuredConfig, WandaConfig, prune
from modelpress.api import CalibrationSettings, EvalSettings, calibration_windows, prepare_windows
from modelpress.engine.blocks import find_blocks
from modelpress.eval.quality import evaluate_quality
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import load_model
from modelpress.nn.sparse_linear import SparseLinear

log = logging.getLogger("bench.prune")
INT4 = WeightScheme.parse("int4/g128")


def structured_counts(model: nn.Module, share: float) -> dict[str, float]:
    """Structured sparsities that remove at least `share` of ALL the model's parameters (embeddings
    included): MLP neurons alone, whole layers alone, or one key/value group of three plus enough neurons."""
    config = model.config
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    blocks = find_blocks(model).blocks
    layers = len(blocks)
    width = config.intermediate_size
    per_neuron = 3 * config.hidden_size * layers                      # gate and up rows, down column, all layers
    per_layer = sum(p.numel() for p in blocks[0].parameters())
    attention = sum(p.numel() for n, p in blocks.named_parameters() if ".self_attn." in f".{n}")
    kv_groups = config.num_key_value_heads

    def neurons_for(params: float) -> float:
        count = -(-int(params) // per_neuron)
        return (-(-count // 8) * 8) / width                             # a multiple of 8 neurons per layer

    return {"neurons": neurons_for(share * total), "layers": -(-int(share * total) // per_layer) / layers,
            "heads": 1 / kv_groups, "heads+neurons": neurons_for(share * total - attention / kv_groups)}


def rows(model: nn.Module, target_share: float) -> dict[str, Callable[[], object]]:
    """Row name -> config, or a list of configs applied in turn (callables so they can look at the model)."""
    share = structured_counts(model, target_share)
    pct = round(100 * target_share)
    return {
        "magnitude-50": lambda: MagnitudeConfig(sparsity=0.5),
        "magnitude-global-50": lambda: MagnitudeConfig(sparsity=0.5, scope="global"),
        "wanda-50": lambda: WandaConfig(sparsity=0.5),
        "sparsegpt-50": lambda: SparseGPTConfig(sparsity=0.5),
        "magnitude-2:4": lambda: MagnitudeConfig(pattern="2:4"),
        "wanda-2:4": lambda: WandaConfig(pattern="2:4"),
        "sparsegpt-2:4": lambda: SparseGPTConfig(pattern="2:4"),
        "sparsegpt-2:4+int4": lambda: SparseGPTConfig(pattern="2:4", scheme=INT4),
        f"structured-neurons-{pct}": lambda: StructuredConfig("neurons", round(share["neurons"], 6)),
        f"structured-layers-{pct}": lambda: StructuredConfig("layers", share["layers"]),
        f"structured-heads+neurons-{pct}": lambda: [StructuredConfig("heads", share["heads"]),
                                                    StructuredConfig("neurons", round(share["heads+neurons"], 6))],
        "structured-heads-1of3": lambda: StructuredConfig("heads", share["heads"]),
    }


@torch.no_grad()
def forward_seconds(model: nn.Module, base: nn.Module, window: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """Fastest of `repeats` prefills of `window` for `model` and for the float model, run alternately so that
    both see the same machine load (the fastest run is the least disturbed one on a shared machine).
    Returns (seconds, seconds / float seconds)."""
    mine, theirs = [], []
    for _ in range(repeats):
        for target, times in ((model, mine), (base, theirs)):
            start = time.perf_counter()
            target(input_ids=window, use_cache=False)
            times.append(time.perf_counter() - start)
    return min(mine), min(mine) / min(theirs)


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy sharing the input embedding (never pruned) with the original, to save memory."""
    embedding = model.get_input_embeddings().weight
    return copy.deepcopy(model, memo={id(embedding): embedding})


def nonzero_weights(model: nn.Module) -> int:
    """Parameters, counting a SparseLinear as its kept weights."""
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return dense + sum(m.nnz for m in model.modules() if isinstance(m, SparseLinear))


def sparse_bytes(model: nn.Module) -> dict:
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if not layers:
        return {}
    stored = sum(m.weight_nbytes for m in layers)
    dense_fp16 = sum(2 * m.in_features * m.out_features for m in layers)
    float_values = [m for m in layers if not m.quantized]
    fp16_equiv = sum(m.mask.numel() + 2 * m.nnz for m in float_values) + sum(
        m.weight_nbytes for m in layers if m.quantized)
    return {"sparse_layer_bytes": stored, "fp16_equiv_ratio": fp16_equiv / dense_fp16}


def build_row(name: str, config, base: nn.Module, calib: torch.Tensor, batch_size: int, window: torch.Tensor) -> tuple:
    """Prune a copy of `base` as `config` says; returns (model, row of measurements other than quality)."""
    model = shared_copy(base)
    start = time.perf_counter()
    summary: dict = {}
    for step in config if isinstance(config, list) else [config]:
        summary = _merged(summary, prune(model, step, calib, batch_size=batch_size).summary())
    seconds = time.perf_counter() - start
    size = measure_size(model)
    forward, relative = forward_seconds(model, base, window)
    row = {"row": name, "method": summary["method"], "prune_seconds": round(seconds, 1),
           "weight_bytes": size.weight_bytes, "parameters": nonzero_weights(model),
           "pruned_dense_ratio": summary.get("bytes_ratio"), "sparsity": summary.get("sparsity"),
           "parameters_removed": summary.get("parameters_removed"), "forward_s": forward, "forward_vs_float": relative,
           **sparse_bytes(model)}
    if "widths" in summary:
        row["structure"] = {k: summary[k] for k in ("widths", "removed_layers", "config_changes")}
    log.info("%s: pruned in %.0f s", name, seconds)
    return model, row


def _merged(before: dict, after: dict) -> dict:
    """Summary of structured steps applied in turn: widths and config changes of all, parameters overall."""
    if not before:
        return after
    merged = {**after, "widths": {**before.get("widths", {}), **after.get("widths", {})},
              "config_changes": {**before.get("config_changes", {}), **after.get("config_changes", {})},
              "parameters_before": before["parameters_before"]}
    merged["parameters_removed"] = round(1 - after["parameters_after"] / before["parameters_before"], 4)
    merged["target"] = f"{before['target']}+{after['target']}"
    return merged


def table(rows_: list[dict], markdown: bool = False) -> str:
    cols = [("row", "row"), ("perplexity", "PPL"), ("ppl_ratio", "PPL/float"), ("kl_divergence", "KL"),
            ("top1_agreement", "top-1"), ("sparsity", "sparsity"), ("parameters_removed", "params removed"), ("pruned_dense_ratio", "pruned/dense"),
            ("fp16_equiv_ratio", "fp16 equiv."), ("weight_bytes", "model MB"), ("parameters", "nonzero M"),
            ("forward_s", "fwd 512 s"), ("forward_vs_float", "fwd/float"), ("prune_seconds", "prune s")]

    def fmt(key, value):
        if value is None:
            return "-"
        if key in ("weight_bytes", "parameters"):
            return f"{value / 1e6:.1f}"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    cells = [[h for _, h in cols]] + [[fmt(k, r.get(k)) for k, _ in cols] for r in rows_]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join(" --- " for _ in cols) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(cols))) for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: SmolLM2-135M)")
    parser.add_argument("--text", default=None, help="text file (default: embedded corpus)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration windows per block forward")
    parser.add_argument("--group", type=int, default=4, help="rows scored together (the float model runs once per group)")
    parser.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    parser.add_argument("--target-share", type=float, default=0.25, help="structured: share of all parameters removed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "prune.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_QUIET", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    base = load_model(args.model)
    _, windows = prepare_windows(base.tokenizer, EvalSettings(text=args.text, windows=args.windows, seq_len=args.seq_len))
    calib = calibration_windows(base.tokenizer, CalibrationSettings(text=args.text, samples=args.calib_samples,
                                                                    seq_len=args.seq_len,
                                                                    eval_tokens=args.windows * args.seq_len))
    window = windows.eval[:1]
    configs = rows(base.model, args.target_share)
    names = args.rows or list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(configs)}")

    saved = _load(args.json)
    float_row = saved.get("float") if args.windows == saved.get("windows") else None
    if float_row is None:
        float_row = {"row": "float", "method": "none", "weight_bytes": measure_size(base.model).weight_bytes,
                     "parameters": nonzero_weights(base.model), "forward_vs_float": 1.0,
                     "forward_s": forward_seconds(base.model, base.model, window)[0]}
    for start in range(0, len(names), args.group):
        group = names[start:start + args.group]
        models: dict[str, nn.Module] = {}
        built = []
        for name in group:
            models[name], row = build_row(name, configs[name](), base.model, calib, args.batch_size, window)
            built.append(row)
        scored = evaluate_quality({"float": base.model, **models}, windows.eval, reference=base.model)
        float_ppl = scored["float"].perplexity
        float_row.update(perplexity=float_ppl, kl_divergence=0.0, top1_agreement=1.0, ppl_ratio=1.0)
        for row in built:
            q = scored[row["row"]]
            row.update(perplexity=q.perplexity, kl_divergence=q.kl_divergence, top1_agreement=q.top1_agreement,
                       ppl_ratio=q.perplexity / float_ppl, settings={k: v for k, v in vars(args).items() if k != "json"})
        del models
        gc.collect()
        log.info("scored %s", group)
        _write(args, float_row, built)
    results = _rows_in_order(_load(args.json))
    print(table(results))
    print()
    print(table(results, markdown=True))


def _load(path: str) -> dict:
    """Saved results: {"windows": n, "float": row, "rows": {name: row}} (older list files are read too)."""
    if not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text())
    rows_ = data.get("rows", {})
    if isinstance(rows_, list):  # the session-1 layout: a list with the float row first
        rows_ = {r["row"]: r for r in rows_}
    windows = data.get("windows", (data.get("settings") or {}).get("windows"))
    return {"windows": windows, "float": rows_.pop("float", None), "rows": rows_, "machine": data.get("machine")}


def _rows_in_order(saved: dict) -> list[dict]:
    return ([saved["float"]] if saved.get("float") else []) + list(saved.get("rows", {}).values())


def _write(args, float_row: dict, built: list[dict]) -> None:
    """Merge `built` into the JSON file (a row of the same name is replaced), so that runs of a few rows
    at a time add up and an interrupted run keeps every group it finished."""
    saved = _load(args.json)
    if saved.get("windows") not in (None, args.windows):
        saved = {}   # other evaluation windows: not comparable, start afresh
    rows_ = saved.get("rows", {})
    rows_.update({row["row"]: row for row in built})
    payload = {"windows": args.windows, "float": float_row, "rows": rows_,
               "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(args.json)


if __name__ == "__main__":
    sys.exit(main())
