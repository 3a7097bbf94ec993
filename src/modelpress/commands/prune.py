"""modelpress prune MODEL --method magnitude|wanda|sparsegpt|structured --sparsity S [--pattern 2:4]
[--target neurons|heads|layers|experts] [--quantize FORMAT] [--calib-text FILE] [--calib-samples N] [--stream] --out DIR"""

from __future__ import annotations

import argparse
import sys

from modelpress.algorithms.prune import (
    ExpertPruneConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    StructuredConfig,
    WandaConfig,
)
from modelpress.api import prune_model
from modelpress.commands.common import (
    add_calibration_arguments,
    add_json_argument,
    add_model_argument,
    calibration_settings,
    check_output_paths,
    group_size_arg,
    model_for,
    write_json,
)
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import scheme_for
from modelpress.io.save import save_compressed
from modelpress.nn.layers import DEFAULT_SKIP

METHODS = ("magnitude", "wanda", "sparsegpt", "structured")
TARGETS = ("neurons", "heads", "layers", "experts")


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (unstructured, N:M or structured) and save it smaller")
    add_model_argument(p)
    p.add_argument("--method", required=True, choices=METHODS,
                   help="magnitude (no data), wanda, sparsegpt (calibrated), structured (neurons/heads/layers/experts)")
    p.add_argument("--sparsity", type=float, default=None, metavar="S",
                   help="fraction removed, in (0, 1): of weights, or of the --target units for structured")
    p.add_argument("--pattern", default=None, metavar="N:M", help="N kept of every M inputs, e.g. 2:4 or 4:8")
    p.add_argument("--scope", default="layer", choices=("layer", "global"),
                   help="magnitude: one threshold per layer or over the whole model (default layer)")
    p.add_argument("--target", default="neurons", choices=TARGETS,
                   help="structured: MLP neurons, attention key/value groups, decoder layers or MoE experts")
    p.add_argument("--non-uniform", action="store_true",
                   help="structured: widths follow one global ranking (loads through modelpress only)")
    p.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="sparsegpt: quantize the kept weights in the same pass, e.g. int4")
    p.add_argument("--group-size", default=None, metavar="G", help="with --quantize: inputs per scale (default 128)")
    p.add_argument("--asymmetric", action="store_true", help="with --quantize: asymmetric integer grid")
    p.add_argument("--dense", action="store_true",
                   help="keep pruned layers dense (zeros stored) instead of compressed; for comparisons only")
    p.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP), metavar="PATTERN",
                   help="layer name patterns left unpruned (default: lm_head)")
    add_calibration_arguments(p, "calibration (wanda, sparsegpt, structured)",
                              "wanda/sparsegpt: save progress after every block to DIR and continue from it")
    p.add_argument("--stream", action="store_true",
                   help="wanda, sparsegpt: read the model (an HF safetensors directory, sharded or not) one block at "
                        "a time instead of loading it (engine/stream.py): host memory about one block plus "
                        "calibration activations")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_json_argument(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The pruning config the arguments describe; errors name the argument that does not fit."""
    if args.method != "sparsegpt" and (args.quantize or args.group_size or args.asymmetric):
        raise ModelpressError("--quantize/--group-size/--asymmetric go with --method sparsegpt only")
    if args.method == "structured":
        if args.pattern:
            raise ModelpressError("--pattern is for unstructured methods; structured pruning takes --target")
        if args.sparsity is None:
            raise ModelpressError("structured pruning needs --sparsity (fraction of the --target units removed)")
        if args.target == "experts":
            return ExpertPruneConfig(sparsity=args.sparsity, batch_size=args.calib_batch_size)
        return StructuredConfig(args.target, args.sparsity, uniform=not args.non_uniform,
                                batch_size=args.calib_batch_size)
    common = {"sparsity": args.sparsity, "pattern": args.pattern, "skip": tuple(args.skip), "compress": not args.dense}
    if args.method == "magnitude":
        return MagnitudeConfig(scope=args.scope, **common)
    if args.method == "wanda":
        return WandaConfig(**common)
    scheme = None
    if args.quantize:
        group = group_size_arg(args.group_size) if args.group_size is not None else 128
        scheme = scheme_for(args.quantize, group, symmetric=False if args.asymmetric else None)
    return SparseGPTConfig(scheme=scheme, **common)


def run(args: argparse.Namespace) -> int:
    check_output_paths(args)
    config = build_config(args)
    if args.stream and (args.method not in ("wanda", "sparsegpt") or args.dense):
        raise ModelpressError("--stream works with the block-by-block pruners (wanda, sparsegpt) storing sparse "
                              f"layers; {args.method}{' --dense' if args.dense else ''} needs the model in memory")
    calibration = calibration_settings(args)
    with model_for(args, args.stream) as loaded:
        info = prune_model(loaded, config, calibration).to_json()
        report = {**info, "source": loaded.source, "streamed": args.stream}
        save_compressed(loaded, args.out, overwrite=args.overwrite, report=report)
    print(_summary_line(info, args.out), file=sys.stdout)
    write_json(args.json, report)
    return 0


def _summary_line(info: dict, out: str) -> str:
    if "stored_bytes" in info:
        ratio = info["bytes_ratio"]
        return (f"pruned {info['layers']} layers with {info['method']} to sparsity {info['sparsity']:.3f} "
                f"({info['target']}) in {info['seconds']:.1f} s: pruned layers store "
                f"{info['stored_bytes'] / 2**20:.2f} MiB, {ratio:.1%} of dense -> {out}")
    return (f"{info['method']} pruning ({info.get('target', 'experts')}) in {info['seconds']:.1f} s: "
            f"{info['parameters_before']:,} -> {info['parameters_after']:,} parameters -> {out}")
