"""modelpress quantize MODEL --format F [--group-size G] [--symmetric|--asymmetric] --out DIR"""

from __future__ import annotations

import argparse
import sys

from modelpress.api import quantize_model
from modelpress.commands.common import add_json_argument, add_model_argument, group_size_arg, write_json
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import scheme_for
from modelpress.io.model import load_model
from modelpress.io.save import save_compressed
from modelpress.nn.layers import DEFAULT_SKIP


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers and save it")
    add_model_argument(p)
    p.add_argument("--method", default="rtn", help="quantization method (default rtn)")
    p.add_argument("--format", required=True, help="number format: int8, int4, int3, int2, nf4, fp8-e4m3, fp8-e5m2, fp4, ternary")
    p.add_argument("--group-size", default=None, metavar="G",
                   help="inputs per scale: a positive integer, 'channel' or 'tensor' (default: 128 for <=4-bit, 64 for nf4, channel for 8-bit)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="symmetric integer grid (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="asymmetric grid with a per-group offset")
    p.add_argument("--double-quant", action="store_true", help="quantize the scales to int8 (NF4-style double quantization)")
    p.add_argument("--scale-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP), metavar="PATTERN",
                   help="layer name patterns left in float (default: lm_head; the output head is always skipped)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    group = None if args.group_size is None else group_size_arg(args.group_size)
    scheme = scheme_for(args.format, group, args.symmetric, args.double_quant, args.scale_dtype)
    loaded = load_model(args.model)
    info = quantize_model(loaded, scheme, method=args.method, skip=tuple(args.skip))
    size = measure_size(loaded.model)
    report = {**info, "weight_bytes": size.weight_bytes, "bits_per_weight": size.bits_per_weight,
              "quantized_parameters": size.quantized_parameters, "source": loaded.source}
    save_compressed(loaded, args.out, overwrite=args.overwrite, report=report)
    print(f"quantized {info['layers']} layers to {scheme.spec} in {info['seconds']:.1f} s: "
          f"{size.bits_per_weight:.3f} bits/weight over quantized layers, {size.weight_bytes / 2**20:.1f} MiB "
          f"of weights in all -> {args.out}", file=sys.stdout)
    write_json(args.json, report)
    return 0
