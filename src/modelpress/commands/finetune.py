"""modelpress finetune MODEL (--lora [--rank R] [--lora-alpha A] [--merge rtn|gptq|none] | --qat FORMAT)
[--quantize SPEC] [--teacher MODEL|auto|none] [training options] --out DIR

Recovery training of a compressed model:
- --lora: low-rank adapters on the frozen (packed) base, e.g. a saved quantized model, or a float MODEL
  quantized first with --quantize SPEC (QLoRA style). The adapters are saved as adapters.safetensors;
  with --merge rtn|gptq (default rtn) they are also folded in: dequantize, add, re-quantize.
- --qat FORMAT: quantization-aware training of a float MODEL at a scheme spec (int4/g128, int3/g128,
  nf4/g64...), then conversion to the same packed layers post-training quantization produces.
The loss is distillation from a teacher (auto: the float model the compressed one was made from, or the
float MODEL itself for --qat/--quantize) mixed with the hard labels by --alpha; --teacher none trains on
the hard labels alone.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

from torch import nn

from modelpress.commands.common import (
    add_json_argument,
    add_model_argument,
    check_output_paths,
    positive_int,
    write_json,
)
from modelpress.commands.distill import (
    add_distill_arguments,
    add_training_arguments,
    distill_config_from_args,
    nothing_saved_on_nan,
    train_config_from_args,
)
from modelpress.errors import ModelpressError
from modelpress.formats.packed import check_finite_tensors
from modelpress.formats.scheme import WeightScheme
from modelpress.io.atomic import atomic_file
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.save import save_compressed
from modelpress.train.data import TaskData, training_windows
from modelpress.train.distill import DistillConfig, distill
from modelpress.train.lora import (
    ADAPTERS_FILE,
    MERGE_METHODS,
    LoRAConfig,
    adapters_bytes,
    add_lora,
    merge_lora,
    unwrap_lora,
)
from modelpress.train.qat import convert_qat, prepare_qat
from modelpress.train.teacher_cache import build_teacher_cache


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="recover a compressed model's quality: LoRA/QLoRA adapters or QAT")
    add_model_argument(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--lora", action="store_true", help="train low-rank adapters on the frozen base")
    mode.add_argument("--qat", default=None, metavar="SCHEME", help="quantization-aware training at SCHEME (e.g. int4/g128)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--quantize", default=None, metavar="SCHEME",
                      help="quantize a float MODEL with RTN at SCHEME before adding adapters (QLoRA)")
    lora.add_argument("--rank", type=positive_int, default=16, help="adapter rank (default 16)")
    lora.add_argument("--lora-alpha", type=float, default=32.0, help="adapter scale numerator: update x alpha/rank")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    lora.add_argument("--merge", default="rtn", choices=MERGE_METHODS + ("none",),
                      help="fold adapters into the base and re-quantize with rtn or gptq, or keep them apart")
    lora.add_argument("--calib-samples", type=positive_int, default=32, help="calibration windows for --merge gptq")
    p.add_argument("--teacher", default="auto", metavar="MODEL",
                   help="distillation teacher: a model, auto (the float model behind MODEL), or none")
    add_training_arguments(p, steps=100, lr=1e-4)
    add_distill_arguments(p, alpha=0.0)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_paths(args)
    if args.qat is not None and args.quantize is not None:
        raise ModelpressError("--quantize belongs to --lora; --qat already names the scheme")
    loaded = load_model(args.model)
    check_finite_tensors(loaded.model.named_parameters(), "fine-tune")
    float_copy = None
    if args.qat is not None or args.quantize is not None:
        float_copy = copy.deepcopy(loaded.model) if args.teacher == "auto" else None
    teacher = _resolve_teacher(args, loaded, float_copy)
    del float_copy
    config = distill_config_from_args(args, freeze=("embed_tokens", "word_embeddings"))
    if teacher is None:
        config = DistillConfig(alpha=1.0, freeze=config.freeze)
    train_config = train_config_from_args(args)
    ids = training_windows(loaded.tokenizer, args.text, args.seq_len, args.train_windows)
    data = TaskData(ids)
    model = loaded.model
    report: dict = {"command": "finetune", "model": loaded.source, "teacher": _teacher_name(args, teacher),
                    "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
    if args.qat is not None:
        scheme = WeightScheme.parse(args.qat)
        prepare_qat(model, scheme)
        report.update(mode="qat", scheme=scheme.spec)
    else:
        if args.quantize is not None:
            from modelpress.algorithms.quantize import RTNConfig
            from modelpress.api import quantize_model

            quantize_model(loaded, RTNConfig(args.quantize))
        add_lora(model, LoRAConfig(rank=args.rank, alpha=args.lora_alpha, dropout=args.lora_dropout))
        report.update(mode="lora", rank=args.rank, lora_alpha=args.lora_alpha, merge=args.merge)
    teacher = _maybe_cache(teacher, data, config, train_config)
    model.to(args.device)
    with nothing_saved_on_nan(args):
        result = distill(model, teacher, data, config, train_config)
    del teacher
    gc.collect()
    model.cpu()
    report.update(result.to_dict())
    adapters = _finish(args, loaded, data)
    save_compressed(LoadedModel(model, loaded.tokenizer, source=args.out, float_source=loaded.float_source),
                    args.out, overwrite=args.overwrite, report=report)
    if adapters is not None:
        with atomic_file(Path(args.out) / ADAPTERS_FILE, mode="wb") as handle:
            handle.write(adapters)
    losses = result.train.losses
    print(f"{report['mode']}: {result.train.steps} steps in {result.train.seconds:.1f} s, loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f} -> {args.out}", file=sys.stdout)
    write_json(args.json, report)
    return 0


def _resolve_teacher(args, loaded: LoadedModel, float_copy: nn.Module | None) -> nn.Module | None:
    if args.teacher == "none":
        return None
    if args.teacher != "auto":
        teacher = load_model(args.teacher).model.to(args.device)
        check_finite_tensors(teacher.named_parameters(), "distill from")
        return teacher
    if float_copy is not None:
        return float_copy.to(args.device)
    if loaded.float_source != loaded.source:
        return load_model(loaded.float_source).model.to(args.device)
    raise ModelpressError(f"{loaded.source} is a float model with no float source to learn from: give --teacher, "
                          f"--teacher none, or --quantize SCHEME for QLoRA")


def _teacher_name(args, teacher) -> str | None:
    if teacher is None:
        return None
    return args.teacher if args.teacher != "auto" else "auto (float source)"


def _maybe_cache(teacher, data: TaskData, config: DistillConfig, train_config):
    if teacher is None or config.top_k is None:
        return teacher
    cache = build_teacher_cache(teacher, data, config.top_k, config.temperature, train_config.batch_size,
                                train_config.precision)
    return cache


def _finish(args, loaded: LoadedModel, data: TaskData) -> bytes | None:
    """QAT: convert to packed layers. LoRA: the adapters as safetensors bytes, folded into the base by
    --merge (rtn or gptq) or taken out again (none) so the saved model is the plain base."""
    model = loaded.model
    if args.qat is not None:
        convert_qat(model)
        return None
    adapters = adapters_bytes(model)
    if args.merge == "none":
        unwrap_lora(model)
    else:
        calibration = data.input_ids[: args.calib_samples] if args.merge == "gptq" else None
        merge_lora(model, args.merge, calibration_ids=calibration, device="cpu")
    return adapters
