"""modelpress compare MODEL [--formats ...]: quantize into several formats, evaluate each, table + plot."""

from __future__ import annotations

import argparse

from modelpress.algorithms.quantize import method_names
from modelpress.api import compare
from modelpress.commands.common import (
    add_json_argument,
    add_model_argument,
    add_text_arguments,
    check_output_paths,
    eval_settings,
    format_table,
    write_json,
)
from modelpress.formats.scheme import WeightScheme

DEFAULT_SCHEMES = ("int8/channel", "fp8-e4m3/channel", "int4-asym/g32", "int4/g128", "nf4/g64", "int3-asym/g128")
COLUMNS = [("format", "format"), ("bits_per_weight", "bits/w"), ("weight_bytes", "bytes"), ("perplexity", "PPL"),
           ("kl_divergence", "KL"), ("top1_agreement", "top-1"), ("quantize_seconds", "quant s"),
           ("prefill_tokens_per_s", "prefill tok/s"), ("decode_tokens_per_s", "decode tok/s")]


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="quantize one model into several formats and compare them")
    add_model_argument(p)
    p.add_argument("--formats", nargs="+", default=list(DEFAULT_SCHEMES), metavar="SPEC",
                   help=f"schemes as FORMAT[/gN|/channel|/tensor][/dq] (default: {' '.join(DEFAULT_SCHEMES)})")
    p.add_argument("--method", default="rtn", choices=method_names(),
                   help="quantization method for every scheme (default rtn; calibrated ones use the default corpus)")
    add_text_arguments(p)
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.add_argument("--plot", default="compare.png", metavar="PNG", help="quality-vs-bits plot (default compare.png; 'none' to skip)")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_paths(args)
    schemes = [WeightScheme.parse(spec) for spec in args.formats]
    settings = eval_settings(args)
    rows = compare(args.model, schemes, settings, method=args.method)
    print(format_table(rows, COLUMNS))
    if args.plot != "none":
        from modelpress.eval.plot import plot_quality_vs_bits

        plot_quality_vs_bits(rows, args.plot)
        print(f"plot: {args.plot}")
    write_json(args.json, rows)
    return 0
