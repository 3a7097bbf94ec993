"""modelpress quantize MODEL --method METHOD [--alpha A] --format F [--group-size G]
[--symmetric|--asymmetric] [--no-static-groups] [--calib-text FILE] [--calib-samples N] [--resume DIR] --out DIR

Mixed precision: --target-bits B [--candidates SPEC ...] [--sensitivity-samples N] instead of --format picks
one scheme per layer (from the candidates) for an average of at most B stored bits per weight, scales
included, at the least estimated KL divergence; the map is in the saved model and the report.

METHOD is any name in the quantizer registry (algorithms/quantize): choices, help and errors come from it."""

from __future__ import annotations

import argparse
import sys

from modelpress.algorithms.quantize import MixedConfig, config_for_method, method_help, method_names
from modelpress.algorithms.quantize.mixed_run import DEFAULT_CANDIDATES, parse_candidates
from modelpress.api import CalibrationSettings, EvalSettings, diagnose_calibration_text, quantize_model
from modelpress.commands.common import (
    add_calibration_arguments,
    add_json_argument,
    add_model_argument,
    calibration_settings,
    check_output_paths,
    group_size_arg,
    positive_int,
    write_json,
)
from modelpress.errors import ModelpressError
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import scheme_for
from modelpress.io.model import load_model
from modelpress.io.save import save_compressed
from modelpress.nn.layers import DEFAULT_SKIP


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers and save it")
    add_model_argument(p)
    p.add_argument("--method", default="rtn", choices=method_names(), help=f"{method_help()}; default rtn")
    p.add_argument("--alpha", type=float, default=None,
                   help="smoothquant migration strength in [0, 1]: how much of the activation range moves into "
                        "the weights (default 0.5)")
    p.add_argument("--format", default=None, help="number format: int8, int4, int3, int2, nf4, fp8-e4m3, fp8-e5m2, fp4, ternary")
    p.add_argument("--group-size", default=None, metavar="G",
                   help="inputs per scale: a positive integer, 'channel' or 'tensor' (default: 128 for <=4-bit, 64 for nf4, channel for 8-bit)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="symmetric integer grid (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="asymmetric grid with a per-group offset")
    p.add_argument("--double-quant", action="store_true", help="quantize the scales to int8 (NF4-style double quantization)")
    p.add_argument("--scale-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--no-static-groups", dest="static_groups", action="store_false",
                   help="gptq, awq-gptq: store activation order as a column permutation, groups cut in that order "
                        "(the older layout: 32 more bits per input column, not exportable to GGUF or "
                        "compressed-tensors) instead of the scheme's groups in the layer's own column order")
    p.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP), metavar="PATTERN",
                   help="layer name patterns left in float (default: lm_head; the output head is always skipped)")
    mixed = p.add_argument_group("mixed precision (instead of --format)")
    mixed.add_argument("--target-bits", type=float, default=None, metavar="B",
                       help="average stored bits per quantized weight, scales included (e.g. 4.5): each layer gets "
                            "the candidate scheme that meets the budget at the least estimated KL divergence")
    mixed.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), metavar="SPEC",
                       help=f"schemes to choose from (default: {' '.join(DEFAULT_CANDIDATES)})")
    mixed.add_argument("--sensitivity-samples", type=positive_int, default=8,
                       help="calibration windows for the per-layer sensitivity pass (default 8)")
    add_calibration_arguments(p, "calibration (gptq, awq, smoothquant, mixed precision's sensitivity)",
                              "save progress after every block to DIR and continue from it if it holds an earlier run")
    p.add_argument("--diagnose", nargs="?", const="default", default=None, metavar="TEXT",
                   help="before quantizing, print how well the calibration windows cover TEXT (default: the embedded "
                        "evaluation corpus): token coverage and per-block activation distance; also in --json")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_paths(args)
    if (args.format is None) == (args.target_bits is None):
        raise ModelpressError("give either --format (one scheme for every layer) or --target-bits (mixed precision)")
    calibration = calibration_settings(args)
    if args.target_bits is not None:
        return _run_mixed(args, calibration)
    group = None if args.group_size is None else group_size_arg(args.group_size)
    scheme = scheme_for(args.format, group, args.symmetric, args.double_quant, args.scale_dtype)
    options = {"alpha": args.alpha} if args.alpha is not None else {}
    if not args.static_groups:
        options["static_groups"] = False
    config = config_for_method(args.method, scheme, skip=tuple(args.skip), **options)
    loaded = load_model(args.model)
    diagnostics = _diagnose(args, loaded, calibration)
    info = quantize_model(loaded, config, calibration).to_json()
    size = measure_size(loaded.model)
    report = {**info, "weight_bytes": size.weight_bytes, "bits_per_weight": size.bits_per_weight,
              "quantized_parameters": size.quantized_parameters, "source": loaded.source, **diagnostics}
    save_compressed(loaded, args.out, overwrite=args.overwrite, report=report)
    print(f"quantized {info['layers']} layers to {scheme.spec} in {info['seconds']:.1f} s: "
          f"{size.bits_per_weight:.3f} bits/weight over quantized layers, {size.weight_bytes / 2**20:.1f} MiB "
          f"of weights in all -> {args.out}", file=sys.stdout)
    write_json(args.json, report)
    return 0


def _run_mixed(args: argparse.Namespace, calibration: CalibrationSettings) -> int:
    per_format = [a for a in ("group_size", "double_quant") if getattr(args, a) not in (None, False)]
    if per_format or args.symmetric is not None:
        raise ModelpressError("--group-size, --symmetric/--asymmetric and --double-quant describe one --format; with "
                              "--target-bits give the candidates as full specs, e.g. --candidates int4-asym/g64 nf4/g64/dq")
    if args.alpha is not None:
        raise ModelpressError("--alpha does not apply to mixed precision (--target-bits)")
    config = MixedConfig(target_bits=args.target_bits, candidates=parse_candidates(args.candidates),
                         method=args.method, sensitivity_samples=args.sensitivity_samples, skip=tuple(args.skip),
                         static_groups=args.static_groups)
    loaded = load_model(args.model)
    info = quantize_model(loaded, config, calibration).to_json()
    size = measure_size(loaded.model)
    report = {**info, "weight_bytes": size.weight_bytes, "bits_per_weight": size.bits_per_weight,
              "quantized_parameters": size.quantized_parameters, "source": loaded.source}
    save_compressed(loaded, args.out, overwrite=args.overwrite, report=report)
    mixed = info["mixed"]
    for spec, count in mixed["scheme_counts"].items():
        layers = [v for v in mixed["layers"].values() if v["scheme"] == spec]
        kl = sum(v["estimated_kl"] for v in layers)
        print(f"  {spec:<16} {count:4d} layers  estimated KL {kl:.4f}", file=sys.stdout)
    print(f"mixed precision ({args.method}) over {info['layers']} layers in {info['seconds']:.1f} s "
          f"(sensitivity {mixed['sensitivity']['seconds']:.1f} s on {mixed['sensitivity']['windows']} windows): "
          f"{mixed['achieved_bits_per_weight']:.3f} bits/weight (target {args.target_bits}), estimated KL "
          f"{mixed['estimated_kl']:.4f}, {size.weight_bytes / 2**20:.1f} MiB of weights in all -> {args.out}",
          file=sys.stdout)
    write_json(args.json, report)
    return 0


def _diagnose(args: argparse.Namespace, loaded, calibration: CalibrationSettings) -> dict:
    """--diagnose: the calibration diagnostics, printed and returned as a report entry ({} when not asked)."""
    if args.diagnose is None:
        return {}
    evaluation = EvalSettings(text=None if args.diagnose == "default" else args.diagnose, seq_len=calibration.seq_len,
                              speed=False, bos=calibration.bos)
    diagnostics = diagnose_calibration_text(loaded, calibration, evaluation)
    for line in diagnostics.lines():
        print(line, file=sys.stdout)
    return {"calibration_diagnostics": {"evaluation_text": args.diagnose, **diagnostics.to_json()}}
