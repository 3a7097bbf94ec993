"""modelpress estimate [MODEL | --params N] [--context C] [--batch B] [--kv-dtype D] [--calibrate [METHOD]] [--json OUT]

Weights per number format and the KV cache, from a parameter count or from a model's config; with
--calibrate, what a calibrated run (GPTQ by default) holds on its device and in host memory. A model is
never loaded: its architecture is built on the meta device from config.json (for a .gguf file, the config of
its float cache, which other commands share) and only shapes are read; the calibration estimate traces one
block on fake tensors to learn which layers share statistics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelpress.commands.common import add_json_argument, add_model_argument, format_table, positive_int, write_json
from modelpress.errors import ModelpressError
from modelpress.estimate import (
    CALIBRATED_METHODS,
    GB,
    GIB,
    KV_DTYPES,
    LinearShape,
    ModelShapes,
    block_layout,
    estimate_all_weights,
    estimate_calibration,
    estimate_kv_cache,
    kv_shape_from_config,
    parse_parameter_count,
)


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="memory of the weights per number format, and of the KV cache")
    add_model_argument(p)
    p.add_argument("--params", default=None, metavar="N",
                   help="a parameter count instead of a model: 7B, 13B, 135M, 1.5B or an integer")
    p.add_argument("--context", type=positive_int, default=4096, help="tokens in the KV cache (default 4096)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences in the KV cache (default 1)")
    p.add_argument("--kv-dtype", default="float16", metavar="D",
                   help=f"KV cache element type: {', '.join(KV_DTYPES)} (default float16)")
    p.add_argument("--layers", type=positive_int, default=None, help="with --params: attention layers")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="with --params: key/value heads")
    p.add_argument("--head-dim", type=positive_int, default=None, help="with --params: size of one head")
    calib = p.add_argument_group("calibration (with a MODEL)")
    calib.add_argument("--calibrate", nargs="?", const="gptq", default=None, metavar="METHOD",
                       choices=CALIBRATED_METHODS,
                       help=f"also estimate a calibrated run's memory: {', '.join(CALIBRATED_METHODS)} (default gptq)")
    calib.add_argument("--calib-samples", type=positive_int, default=128, help="calibration windows (default 128)")
    calib.add_argument("--calib-seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    calib.add_argument("--calib-batch-size", type=positive_int, default=8, help="windows per block forward (default 8)")
    calib.add_argument("--no-float-target", action="store_true", help="GPTQ without its float target (plain GPTQ)")
    calib.add_argument("--stream", action="store_true", help="the model streamed from disk block by block")
    calib.add_argument("--device-memory", type=float, default=None, metavar="GB",
                       help="memory of the calibration GPU in GB: says whether the run fits, and whether the "
                            "engine would keep the hidden states in host memory")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.kv_dtype not in KV_DTYPES:
        raise ModelpressError(f"unknown KV cache dtype {args.kv_dtype!r}; known: {', '.join(KV_DTYPES)}")
    if args.params is not None and args.model is not None:
        raise ModelpressError("give a MODEL or --params, not both")
    if args.calibrate is not None and args.params is not None:
        raise ModelpressError("--calibrate needs a MODEL's shapes (which layers share statistics), not --params")
    kv_given = (args.layers, args.kv_heads, args.head_dim)
    if args.params is not None:
        shapes: ModelShapes | int = parse_parameter_count(args.params)
        parameters, resolved = shapes, None
        source = f"{shapes:,} parameters (all counted in each format)"
        kv_shape = kv_given if all(kv_given) else None
    else:
        shapes, resolved = read_model_shapes(args.model, layout=args.calibrate is not None)
        parameters = shapes.parameters
        source = (f"{resolved}: {shapes.parameters:,} parameters, {shapes.quantized_parameters:,} in linear layers "
                  f"(the rest counted as float16 in quantized rows)")
        model_kv = (shapes.layers, shapes.kv_heads, shapes.head_dim)
        kv_shape = tuple(given or found for given, found in zip(kv_given, model_kv))

    rows = estimate_all_weights(shapes)
    kv = None if kv_shape is None else estimate_kv_cache(*kv_shape, context=args.context, batch=args.batch,
                                                         dtype=args.kv_dtype)
    print(source)
    columns = COLUMNS if any(r.float_bytes for r in rows) else [c for c in COLUMNS if c[0] != "float"]
    print(format_table([_table_row(r) for r in rows], columns))
    if args.params is not None:
        print("per-channel scales (int8/channel, fp8) add 16/K bits per weight for rows of K inputs: "
              "not counted without a model's shapes")
    if kv is None:
        missing = [flag for flag, value in zip(("--layers", "--kv-heads", "--head-dim"), kv_given) if not value]
        kv_note = f"KV cache: not estimated; with --params it needs {', '.join(missing)} (or give a MODEL)"
        print(kv_note)
    else:
        kv_note = None
        print(f"KV cache ({kv.dtype}, {kv.bits_per_element:g} bits/element): {kv.layers} layers x {kv.kv_heads} KV "
              f"heads x {kv.head_dim} head dim x {kv.context} tokens x {kv.batch} sequences = "
              f"{_size(kv.total_bytes)} ({kv.bytes_per_token:,.0f} bytes/token)"
              + (f"; {KV_DTYPES[kv.dtype].note}" if KV_DTYPES[kv.dtype].note else ""))
    calibration = None
    if args.calibrate is not None:
        calibration = _calibration(args, shapes)
    write_json(args.json, {"source": resolved, "parameters": parameters,
                           "formats": [r.to_dict() for r in rows],
                           "kv_cache": None if kv is None else kv.to_dict(), "kv_cache_note": kv_note,
                           "calibration": calibration})
    return 0


def _calibration(args: argparse.Namespace, shapes: ModelShapes) -> dict:
    """Print the calibration estimate, kept on the device and offloaded; returns both for the JSON."""
    from modelpress.engine.states import crowds

    settings = dict(method=args.calibrate, samples=args.calib_samples, seq_len=args.calib_seq_len,
                    batch_size=args.calib_batch_size, float_target=not args.no_float_target, streamed=args.stream)
    kept, off = (estimate_calibration(shapes, offload=o, **settings) for o in (False, True))
    target = " with its float target" if kept.float_target else ""
    print(f"calibration, {kept.method}{target}: {kept.samples} windows x {kept.seq_len} tokens, batches of "
          f"{kept.batch_size}, float32" + ("" if kept.traced else
                                           " (input groups not traced: every layer counted as its own group)"))
    table = [("the block" + (" and its float copy" if kept.float_target else ""), kept.block_bytes, off.block_bytes),
             (f"hidden states ({kept.streams} streams at the peak)", kept.hidden_bytes, off.hidden_bytes),
             ("running sums of the layers observed together", kept.statistics_bytes, off.statistics_bytes),
             ("the largest solve, with the sums still held", kept.solve_bytes, off.solve_bytes),
             ("one batch through the block", kept.activation_bytes, off.activation_bytes),
             ("device, in all", kept.device_bytes, off.device_bytes),
             ("host: the float model" + (" (one block of it, streamed)" if args.stream else ""),
              kept.host_model_bytes, off.host_model_bytes),
             ("host: hidden states", kept.host_hidden_bytes, off.host_hidden_bytes)]
    print(format_table([{"part": name, "kept": _size(a), "offloaded": _size(b)} for name, a, b in table],
                       [("part", "memory"), ("kept", "hidden states on the device"),
                        ("offloaded", "in host memory")]))
    verdict = None
    if args.device_memory is not None:
        memory = args.device_memory * GB
        offloads = crowds(kept.hidden_bytes, memory, kept.block_bytes)
        used = off if offloads else kept
        verdict = {"device_memory_bytes": memory, "engine_offloads": offloads, "fits": used.device_bytes <= memory,
                   "fits_offloaded": off.device_bytes <= memory}
        where = "in host memory" if offloads else "on the device"
        line = (f"on a {args.device_memory:g} GB GPU the engine keeps the hidden states {where}; the run "
                + ("fits" if verdict["fits"] else f"does not fit ({_size(used.device_bytes)} needed)"))
        if not verdict["fits"] and verdict["fits_offloaded"]:
            line += f"; with --offload-hidden it fits ({_size(off.device_bytes)})"
        print(line)
    return {"kept": kept.to_dict(), "offloaded": off.to_dict(), "verdict": verdict}


COLUMNS = [("format", "format"), ("scheme", "scheme"), ("bits", "bits/weight"), ("weights", "weights"),
           ("overhead", "scales/zeros"), ("float", "float rest"), ("total", "total"), ("gib", "total GiB")]


def _size(n: float) -> str:
    """Decimal units, as model cards use them."""
    for unit, scale in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _table_row(r) -> dict:
    return {"format": r.label, "scheme": r.scheme or "-", "bits": f"{r.bits_per_weight:.3f}",
            "weights": _size(r.weight_bytes), "overhead": _size(r.overhead_bytes), "float": _size(r.float_bytes),
            "total": _size(r.total_bytes), "gib": f"{r.total_bytes / GIB:.3f}"}


def read_model_shapes(spec: str | None, layout: bool = False):
    """(ModelShapes, resolved source) for a MODEL argument, without loading any weight; with `layout`, its
    first block traced on fake tensors for the calibration estimate."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from modelpress.io.model import (
        check_remote_code,
        gguf_float_cache,
        is_causal_lm,
        looks_like_path,
        remote_code_message,
        resolve_model_spec,
    )
    from modelpress.nn.layers import find_linear_layers, linear_weight

    source = resolve_model_spec(spec)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelpressError(f"model file {source} does not exist")
        config_source = str(gguf_float_cache(path))  # made once (dequantizing); config.json read from it
    elif path.is_dir() and not (path / "config.json").exists():
        raise ModelpressError(f"{source} is a directory without config.json")
    elif not path.exists() and looks_like_path(source):
        raise ModelpressError(f"model path {source} does not exist")
    else:
        config_source = source
    if Path(config_source).is_dir():
        check_remote_code(Path(config_source))
    try:
        config = AutoConfig.from_pretrained(config_source, trust_remote_code=False)  # False: never a prompt
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ModelpressError(remote_code_message(f"model {source!r} (its config.json)")) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelpressError(f"cannot read the config of {source!r}: {first}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    try:
        with init_empty_weights(include_buffers=True):
            model = auto.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError) as err:
        raise ModelpressError(f"cannot build {type(config).__name__} from {source!r}: {err}") from None
    parameters = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    linear = tuple(LinearShape(*linear_weight(m).shape) for m in find_linear_layers(model).values())
    layers, kv_heads, head_dim = kv_shape_from_config(config)
    block = blocks = None
    if layout:
        from modelpress.engine.blocks import find_blocks

        blocks = len(find_blocks(model))
        block = block_layout(lambda: auto.from_config(config, trust_remote_code=False))
    return ModelShapes(parameters, linear, layers, kv_heads, head_dim, block, blocks), source

