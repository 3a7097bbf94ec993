"""modelpress quantize MODEL --method rtn|gptq|awq|awq-gptq|smoothquant [--alpha A] --format F [--group-size G]
[--symmetric|--asymmetric] [--calib-text FILE] [--calib-samples N] [--resume DIR] --out DIR"""

from __future__ import annotations

import argparse
import sys

from modelpress.api import CalibrationSettings, quantize_model
from modelpress.commands.common import add_json_argument, add_model_argument, group_size_arg, positive_int, write_json
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import scheme_for
from modelpress.io.model import load_model
from modelpress.io.save import save_compressed
from modelpress.nn.layers import DEFAULT_SKIP


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers and save it")
    add_model_argument(p)
    p.add_argument("--method", default="rtn",
                   help="rtn (round to nearest), gptq (calibrated, error-compensating), awq (activation-aware "
                        "scales + clipping), awq-gptq (AWQ scales, then GPTQ) or smoothquant (W8A8: int8 weights "
                        "and per-token int8 activations; use --format int8); default rtn")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="smoothquant migration strength in [0, 1]: how much of the activation range moves into "
                        "the weights (default 0.5)")
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
    calib = p.add_argument_group("calibration (gptq, awq, smoothquant)")
    calib.add_argument("--calib-text", default=None, metavar="FILE",
                       help="UTF-8 text file or hf:PATH[:CONFIG[:SPLIT]] (default: embedded corpus, after its evaluation windows)")
    calib.add_argument("--calib-samples", type=positive_int, default=128, help="calibration windows (default 128)")
    calib.add_argument("--calib-seq-len", type=positive_int, default=512, help="tokens per calibration window (default 512)")
    calib.add_argument("--calib-batch-size", type=positive_int, default=8, help="windows per block forward (default 8)")
    calib.add_argument("--resume", default=None, metavar="DIR",
                       help="save progress after every block to DIR and continue from it if it holds an earlier run")
    calib.add_argument("--device", default="cpu", help="device the blocks are calibrated on, e.g. cpu or cuda (default cpu)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    group = None if args.group_size is None else group_size_arg(args.group_size)
    scheme = scheme_for(args.format, group, args.symmetric, args.double_quant, args.scale_dtype)
    loaded = load_model(args.model)
    calibration = CalibrationSettings(text=args.calib_text, samples=args.calib_samples, seq_len=args.calib_seq_len,
                                      batch_size=args.calib_batch_size, device=args.device, resume_dir=args.resume)
    info = quantize_model(loaded, scheme, method=args.method, skip=tuple(args.skip), calibration=calibration,
                          alpha=args.alpha)
    size = measure_size(loaded.model)
    report = {**info, "weight_bytes": size.weight_bytes, "bits_per_weight": size.bits_per_weight,
              "quantized_parameters": size.quantized_parameters, "source": loaded.source}
    save_compressed(loaded, args.out, overwrite=args.overwrite, report=report)
    print(f"quantized {info['layers']} layers to {scheme.spec} in {info['seconds']:.1f} s: "
          f"{size.bits_per_weight:.3f} bits/weight over quantized layers, {size.weight_bytes / 2**20:.1f} MiB "
          f"of weights in all -> {args.out}", file=sys.stdout)
    write_json(args.json, report)
    return 0
