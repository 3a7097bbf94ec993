"""modelpress eval MODEL [--reference MODEL] [--text FILE] [--tasks FILE|NAME ...] [--json OUT]

--tasks adds lm-eval task accuracy (eval/tasks.py; the optional `tasks` extra) as columns beside PPL and KL."""

from __future__ import annotations

import argparse

from modelpress.api import default_reference, evaluate_models
from modelpress.commands.common import (
    add_json_argument,
    add_model_argument,
    add_text_arguments,
    check_output_paths,
    start_ranks,
    eval_settings,
    format_table,
    write_json,
)
from modelpress.io.model import load_model

COLUMNS = [("model", "model"), ("perplexity", "PPL"), ("reference_perplexity", "ref PPL"),
           ("kl_divergence", "KL"), ("top1_agreement", "top-1"), ("bits_per_weight", "bits/w"),
           ("weight_bytes", "bytes"), ("prefill_tokens_per_s", "prefill tok/s"), ("decode_tokens_per_s", "decode tok/s")]


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, KL and top-1 agreement against a reference, bytes and speed")
    add_model_argument(p)
    p.add_argument("--reference", default="auto", metavar="MODEL",
                   help="model to compare against (default: the float model a compressed model was made from; 'none' to skip)")
    add_text_arguments(p)
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="lm-eval tasks to score too: task YAML files (lm-eval's format) or lm-eval task names "
                        "(needs pip install 'modelpress[tasks]')")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_paths(args)
    ranks = start_ranks(args)          # under torchrun: windows split across ranks, the same numbers
    loaded = load_model(args.model)
    ref_spec = default_reference(loaded) if args.reference == "auto" else (None if args.reference == "none" else args.reference)
    reference = load_model(ref_spec) if ref_spec else None
    settings = eval_settings(args)
    report = evaluate_models({"model": loaded}, reference, settings)["model"]
    if not ranks.is_main:
        return 0
    row, columns = report.to_dict(), list(COLUMNS)
    for task, metrics in report.extra.get("tasks", {}).get("results", {}).items():
        for metric, value in metrics.items():
            row[f"{task} {metric}"] = value
            columns.append((f"{task} {metric}", f"{task} {metric}"))
    print(format_table([row], columns))
    write_json(args.json, report.to_dict())
    return 0
