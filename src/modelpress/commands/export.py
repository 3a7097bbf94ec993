"""modelpress export MODEL --to gguf|compressed-tensors|hf|peft [...] --out DIR

Writes every target into DIR/<target>/ (atomically: all of them or nothing), prints per target whether the
export is lossless, its true bits per weight and, where a layer had to be re-rounded, the KL divergence that
cost against MODEL itself on a few windows of the evaluation text."""

from __future__ import annotations

import argparse
import sys

from modelpress.commands.common import (
    add_json_argument,
    add_model_argument,
    check_output_paths,
    format_table,
    positive_int,
    write_json,
)
from modelpress.export import ExportOptions, export_model, export_targets
from modelpress.io.model import load_model

COLUMNS = [("target", "target"), ("lossless", "lossless"), ("re_rounded_layers", "re-rounded layers"),
           ("linear_bits_per_weight", "linear bits/w"), ("file_bytes", "bytes"), ("kl_divergence", "KL vs model")]


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model in the formats runtimes load (GGUF, compressed-tensors, ...)")
    add_model_argument(p)
    p.add_argument("--to", nargs="+", required=True, choices=export_targets(), metavar="TARGET",
                   help=f"one or more of: {', '.join(export_targets())}")
    p.add_argument("--out", required=True, help="output directory; each target goes into DIR/<target>/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--gguf-float-type", default="F16", choices=("F16", "BF16", "F32"),
                   help="GGUF type of float matrices such as the token embedding (default F16)")
    p.add_argument("--gguf-fallback", default="nearest", metavar="TYPE",
                   help="GGML type (Q8_0, Q4_K, ...) for layers that no GGUF type holds exactly; 'nearest' picks one by "
                        "the layer's bits and row length (default)")
    p.add_argument("--hf-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="float dtype of the hf export and of the peft export's base (default float16)")
    p.add_argument("--measure-windows", type=int, default=8, metavar="N",
                   help="windows of the evaluation text to measure a re-rounded export's KL on (0: skip; default 8)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per measuring window (default 512)")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_paths(args)
    loaded = load_model(args.model)
    windows = None
    if args.measure_windows > 0 and loaded.tokenizer is not None:
        from modelpress.api import EvalSettings, prepare_windows

        settings = EvalSettings(windows=args.measure_windows, seq_len=args.seq_len, speed=False)
        windows = prepare_windows(loaded.tokenizer, settings)[1].eval
    options = ExportOptions(gguf_float_type=args.gguf_float_type, gguf_fallback=args.gguf_fallback,
                            hf_dtype=args.hf_dtype)
    results = export_model(loaded, args.to, args.out, options, overwrite=args.overwrite, windows=windows)
    rows = [result.to_json() for result in results]
    print(format_table(rows, COLUMNS))
    for result in results:
        for note in result.notes:
            print(f"{result.target}: {note}", file=sys.stdout)
    print(f"exported {', '.join(args.to)} -> {args.out}")
    write_json(args.json, rows)
    return 0
