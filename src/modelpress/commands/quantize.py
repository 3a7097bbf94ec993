"""modelpress quantize MODEL --method METHOD [--alpha A] --format F [--group-size G]
[--symmetric|--asymmetric] [--no-static-groups] [--grid gguf] [--true-sequential] [--no-float-target] [--rotate [KIND]] [--head SCHEME] [--calib-text FILE] [--calib-samples N] [--resume DIR] [--stream] --out DIR

Mixed precision: --target-bits B [--candidates SPEC ...] [--sensitivity-samples N] instead of --format picks
one scheme per layer (from the candidates) for an average of at most B stored bits per weight, scales
included, at the least estimated KL divergence; the map is in the saved model and the report.

METHOD is any name in the quantizer registry (algorithms/quantize): choices, help and errors come from it.
Under `torchrun --nproc-per-node N -m modelpress quantize ...` the ranks share the calibration data and rank 0
writes the output (docs/distributed.md); --stream reads the model block by block (engine/stream.py).
--rotate first rotates the residual stream into the weights (algorithms/rotate.py): the same function, outlier
channels spread before quantization."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

from modelpress.algorithms.quantize import MixedConfig, config_for_method, method_help, method_names
from modelpress.algorithms.quantize.awq import AWQConfig
from modelpress.algorithms.quantize.gptq import GPTQConfig
from modelpress.algorithms.quantize.mixed_run import DEFAULT_CANDIDATES, parse_candidates
from modelpress.algorithms.rotate import ROTATION_KINDS, RotateConfig, rotate_residual
from modelpress.api import CalibrationSettings, EvalSettings, diagnose_calibration_text, quantize_model
from modelpress.commands.common import (
    add_calibration_arguments,
    add_json_argument,
    add_model_argument,
    calibration_settings,
    start_ranks,
    check_output_paths,
    group_size_arg,
    model_for,
    positive_int,
    write_json,
)
from modelpress.errors import ModelpressError
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme, scheme_for
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
    p.add_argument("--integer-zero-points", action="store_true",
                   help="with --asymmetric: integer zero points (offset = -z * scale, scales kept to 7 significant "
                        "bits at 4 bits), as compressed-tensors/vLLM store them, so the model exports there "
                        "losslessly (spec suffix /zp)")
    p.add_argument("--no-static-groups", dest="static_groups", action="store_false",
                   help="gptq, awq-gptq: store activation order as a column permutation, groups cut in that order "
                        "(the older layout: 32 more bits per input column, not exportable to GGUF or "
                        "compressed-tensors) instead of the scheme's groups in the layer's own column order")
    p.add_argument("--grid", default=None, choices=("gguf",),
                   help="gptq, awq-gptq: fix each group's range on the grid GGUF stores it on before the sweep (the "
                        "k-quant header for int4-asym/g32 -> Q4_K, int5-asym/g32 -> Q5_K, int6/g16 -> Q6_K, int3/g16 "
                        "-> Q3_K, int2-asym/g16 -> Q2_K on rows of whole 256-blocks, with float32 scales; float16 "
                        "32-blocks otherwise), so `export --to gguf` holds the result bit for bit")
    p.add_argument("--true-sequential", action="store_true",
                   help="gptq: re-run each block between its dependency levels (q/k/v, o, gate/up, down), so later "
                        "layers are solved on the quantized outputs of earlier ones (~40%% more calibration time); "
                        "the default float target implies it, so it matters with --no-float-target")
    p.add_argument("--float-target", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq (on by default): fit each layer to the float model's outputs, ||Q x~ - W x|| with x~ its "
                        "input after the layers quantized before it and x its input in the float model, so that each "
                        "layer also makes up for the error upstream (GPTAQ's asymmetric calibration; solved level by "
                        "level, as --true-sequential; one more block forward per level, the float model's hidden "
                        "states kept beside the quantized model's). --no-float-target: plain GPTQ, less memory and "
                        "time")
    p.add_argument("--rotate", nargs="?", const="hadamard", default=None, choices=ROTATION_KINDS,
                   help="rotate the residual stream into the weights before quantizing (QuaRot-style, no runtime "
                        "cost; a head tied to the embedding is untied): hadamard (default) or orthogonal; "
                        "pre-norm RMS-norm models (Llama, Mistral, Qwen2/3, Phi-3) only. Pair it with gptq: "
                        "round-to-nearest can lose by it where norms silence channels (docs/cross_domain.md)")
    p.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP), metavar="PATTERN",
                   help="layer name patterns left in float (default: lm_head; the method always skips the output "
                        "head: see --head)")
    p.add_argument("--head", default=None, metavar="SCHEME",
                   help="after the method, quantize the output head round-to-nearest to SCHEME (a scheme spec, e.g. "
                        "int8/g32, llama.cpp's Q8_0, or int4/g32); a head tied to the token embedding stays tied, "
                        "one packed table for both (default: none, the head stays float)")
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
    p.add_argument("--max-kl", type=float, default=None, metavar="X",
                   help="quality gate: if the KL divergence against the float model (8 evaluation windows of the "
                        "--calib-text) exceeds X, save nothing, exit 1 and print the layers that cost most")
    p.add_argument("--stream", action="store_true",
                   help="read the model (an HF safetensors directory, sharded or not) one block at a time instead of "
                        "loading it: host memory about one block plus calibration activations; gptq, awq, awq-gptq")
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
    head = _head(args)
    ranks = start_ranks(args)          # under torchrun: every rank calibrates its share, rank 0 writes
    calibration = calibration_settings(args)
    if args.target_bits is not None:
        return _run_mixed(args, calibration, head)
    group = None if args.group_size is None else group_size_arg(args.group_size)
    scheme = scheme_for(args.format, group, args.symmetric, args.double_quant, args.scale_dtype,
                        args.integer_zero_points)
    options = {"alpha": args.alpha} if args.alpha is not None else {}
    if not args.static_groups:
        options["static_groups"] = False
    if args.grid is not None:
        options["grid"] = args.grid
    if args.true_sequential:
        options["true_sequential"] = True
    if args.float_target is not None:
        options["float_target"] = args.float_target
    config = config_for_method(args.method, scheme, skip=tuple(args.skip), **options)
    if args.stream and (args.max_kl is not None or args.diagnose is not None):
        raise ModelpressError("--max-kl and --diagnose need the float model in memory; they do not combine with --stream")
    if args.stream and args.rotate:
        raise ModelpressError("--rotate changes every block and the embedding at once; it does not combine with --stream")
    with _model_for(args, config) as loaded:
        rotation = _rotate(args, loaded)
        diagnostics = _diagnose(args, loaded, calibration)
        float_model = copy.deepcopy(loaded.model) if args.max_kl is not None else None
        info = quantize_model(loaded, config, calibration, head).to_json()
        if not ranks.is_main:
            return 0
        if float_model is not None and not passes_gate(args, float_model, loaded):
            return 1
        size = measure_size(loaded.model)
        report = {**info, "weight_bytes": size.weight_bytes, "bits_per_weight": size.bits_per_weight,
                  "quantized_parameters": size.quantized_parameters, "source": loaded.source, "ranks": ranks.world,
                  "streamed": args.stream, **rotation, **diagnostics}
        save_compressed(loaded, args.out, overwrite=args.overwrite, report=report)
    head_note = f" (+ output head {info['head']['scheme']}{', tied embedding' if info['head']['tied_embedding'] else ''})" \
        if "head" in info else ""
    print(f"quantized {info['layers']} layers to {scheme.spec}{head_note} in {info['seconds']:.1f} s: "
          f"{size.bits_per_weight:.3f} bits/weight over quantized layers, {size.weight_bytes / 2**20:.1f} MiB "
          f"of weights in all -> {args.out}", file=sys.stdout)
    write_json(args.json, report)
    return 0


def _head(args: argparse.Namespace) -> WeightScheme | None:
    """--head SCHEME, checked before the model is loaded; none (the default) leaves the head float."""
    if args.head is None or args.head.strip().lower() == "none":
        return None
    return WeightScheme.parse(args.head)


def passes_gate(args: argparse.Namespace, float_model, loaded) -> bool:
    """--max-kl: the quantized model against the float one on 8 evaluation windows of the calibration text
    (the part calibration leaves out; for a calibration mix, of its first corpus); a miss prints the layers that cost most (recipe/gate.py), saves nothing."""
    from modelpress.api import EvalSettings
    from modelpress.python_api import eval_windows
    from modelpress.recipe import Gate
    from modelpress.recipe.gate import gate_model

    from modelpress.io.corpora import mix_parts

    parts = mix_parts(args.calib_text) if isinstance(args.calib_text, str) else None
    text = parts[0] if parts else args.calib_text   # a mix is no text: its first corpus's evaluation windows
    windows = eval_windows(loaded.tokenizer, text, EvalSettings(windows=8, speed=False))[1].eval
    verdict = gate_model(Gate(max_kl=args.max_kl), float_model, loaded.model, windows)
    if not verdict.passed:
        print(verdict.describe(), file=sys.stdout)
        print("nothing saved", file=sys.stdout)
    return verdict.passed


def _model_for(args: argparse.Namespace, config):
    """The model to quantize: loaded, or with --stream opened block by block (block-by-block methods only)."""
    if args.stream and not isinstance(config, (GPTQConfig, AWQConfig)):
        raise ModelpressError(f"--stream works with the block-by-block methods (gptq, awq, awq-gptq); {args.method} "
                              f"changes every weight at once and needs the model in memory")
    return model_for(args, args.stream)


def _run_mixed(args: argparse.Namespace, calibration: CalibrationSettings, head: WeightScheme | None) -> int:
    per_format = [a for a in ("group_size", "double_quant", "integer_zero_points")
                  if getattr(args, a) not in (None, False)]
    if per_format or args.symmetric is not None:
        raise ModelpressError("--group-size, --symmetric/--asymmetric, --double-quant and --integer-zero-points "
                              "describe one --format; with "
                              "--target-bits give the candidates as full specs, e.g. --candidates int4-asym/g64 nf4/g64/dq")
    if args.alpha is not None or args.grid is not None or args.true_sequential or args.float_target is not None:
        raise ModelpressError("--alpha, --grid, --true-sequential and --(no-)float-target do not apply to mixed "
                              "precision (--target-bits)")
    if args.stream:
        raise ModelpressError("--stream works with one --format (mixed precision measures every layer of the whole "
                              "model first)")
    config = MixedConfig(target_bits=args.target_bits, candidates=parse_candidates(args.candidates),
                         method=args.method, sensitivity_samples=args.sensitivity_samples, skip=tuple(args.skip),
                         static_groups=args.static_groups)
    loaded = load_model(args.model)
    rotation = _rotate(args, loaded)
    float_model = copy.deepcopy(loaded.model) if args.max_kl is not None else None
    info = quantize_model(loaded, config, calibration, head).to_json()
    if float_model is not None and not passes_gate(args, float_model, loaded):
        return 1
    size = measure_size(loaded.model)
    report = {**info, "weight_bytes": size.weight_bytes, "bits_per_weight": size.bits_per_weight,
              "quantized_parameters": size.quantized_parameters, "source": loaded.source, **rotation}
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


def _rotate(args: argparse.Namespace, loaded) -> dict:
    """--rotate: the residual stream rotated in place, the line printed and returned as a report entry."""
    if args.rotate is None:
        return {}
    report = rotate_residual(loaded.model, RotateConfig(kind=args.rotate))
    print(report.summary(), file=sys.stdout)
    return {"rotation": dataclasses.asdict(report)}


def _diagnose(args: argparse.Namespace, loaded, calibration: CalibrationSettings) -> dict:
    """--diagnose: the calibration diagnostics, printed and returned as a report entry ({} when not asked)."""
    if args.diagnose is None:
        return {}
    evaluation = EvalSettings(text=None if args.diagnose == "default" else args.diagnose, seq_len=calibration.seq_len,
                              speed=False, bos=calibration.bos,
                              bos_mode=calibration.bos_mode)
    diagnostics = diagnose_calibration_text(loaded, calibration, evaluation)
    for line in diagnostics.lines():
        print(line, file=sys.stdout)
    return {"calibration_diagnostics": {"evaluation_text": args.diagnose, **diagnostics.to_json()}}
