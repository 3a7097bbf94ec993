"""modelpress distill --teacher T --student S [--text FILE] [--steps N] [--lr LR] [--temperature T] [--alpha A]
[--loss fkl|rkl|jsd] [--top-k K [--cache FILE]] [--precision auto|bf16|fp16|fp32] --out DIR

Training windows come from the calibration side of the text (after the evaluation windows). With --top-k
the teacher runs once over them, its top-k rows are kept (in memory, or in --cache FILE) and the teacher
is freed before training; a --cache file that exists is reused without loading the teacher at all.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Iterator
from pathlib import Path

from modelpress.commands.common import add_json_argument, check_output_paths, positive_int, write_json
from modelpress.errors import ModelpressError
from modelpress.formats.packed import check_finite_tensors
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.save import save_compressed
from modelpress.train.data import TaskData, check_same_vocabulary, training_windows
from modelpress.train.distill import DistillConfig, distill
from modelpress.train.losses import DIVERGENCES
from modelpress.train.teacher_cache import build_teacher_cache, load_teacher_cache, save_teacher_cache
from modelpress.train.trainer import PRECISIONS, TrainConfig, TrainingDiverged


def add_training_arguments(p: argparse.ArgumentParser, steps: int = 100, lr: float = 1e-4) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text file or hf:PATH[:CONFIG[:SPLIT]] (default: embedded corpus); training uses the "
                        "windows after the first 40 x 512 evaluation tokens")
    g.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--batch-size", type=positive_int, default=1, help="windows per micro-batch (default 1)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--seq-len", type=positive_int, default=512, help="tokens per training window (default 512)")
    g.add_argument("--train-windows", type=positive_int, default=None, metavar="N",
                   help="use at most N training windows (default: all the text has after the evaluation tokens)")
    g.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warm-up steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast precision over float32 master weights: bf16, fp16 (with loss scaling), fp32; "
                        "auto = bf16 on CPU and bf16-capable GPUs, else fp16")
    g.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    g.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop early after this much process CPU time")
    g.add_argument("--device", default="cpu", help="device to train on (default cpu)")


def add_distill_arguments(p: argparse.ArgumentParser, alpha: float = 0.0) -> None:
    g = p.add_argument_group("distillation")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T; the loss is scaled by T^2")
    g.add_argument("--alpha", type=float, default=alpha,
                   help=f"weight of the hard-label cross-entropy; 1 - alpha goes to soft targets (default {alpha})")
    g.add_argument("--loss", default="fkl", choices=DIVERGENCES,
                   help="forward KL (teacher || student), reverse KL, or generalized JSD (default fkl)")
    g.add_argument("--beta", type=float, default=0.5, help="JSD's teacher weight, in (0, 1) (default 0.5)")
    g.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="cache the teacher's top-K probabilities once (plus a tail bucket) and free the teacher")
    g.add_argument("--cache", default=None, metavar="FILE",
                   help="with --top-k: the teacher cache file (.safetensors), reused if it exists")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    budget = None if args.time_budget is None else args.time_budget * 60
    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accumulation=args.grad_accum,
                       seq_len=args.seq_len, precision=args.precision, weight_decay=args.weight_decay,
                       warmup_steps=args.warmup, seed=args.seed, time_budget_s=budget)


def distill_config_from_args(args: argparse.Namespace, freeze: tuple[str, ...] = ()) -> DistillConfig:
    return DistillConfig(temperature=args.temperature, alpha=args.alpha, loss=args.loss, beta=args.beta,
                         top_k=args.top_k, freeze=freeze)


@contextlib.contextmanager
def nothing_saved_on_nan(args: argparse.Namespace) -> Iterator[None]:
    """Training that diverges (a NaN/Inf loss) has saved nothing (outputs are written after training, atomically):
    the error says what is kept."""
    try:
        yield
    except TrainingDiverged as err:
        out = Path(args.out)
        kept = (f"the existing {out} is left as it was" if out.exists() else f"--out {out} was not created")
        cache = getattr(args, "cache", None)
        if cache is not None and Path(cache).exists():
            kept += f"; the teacher cache {cache} is complete and kept"
        raise ModelpressError(f"{err}. Nothing was saved: {kept}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a student model on a teacher's soft targets (knowledge distillation)")
    p.add_argument("--teacher", required=True, metavar="MODEL", help="the model to learn from")
    p.add_argument("--student", required=True, metavar="MODEL",
                   help="the model to train (a smaller or compressed model with the teacher's vocabulary)")
    add_training_arguments(p)
    add_distill_arguments(p)
    p.add_argument("--freeze", nargs="*", default=[], metavar="PATTERN",
                   help="student parameter name patterns kept fixed, e.g. embed_tokens")
    p.add_argument("--out", required=True, help="output directory for the trained student (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_paths(args)
    if args.cache is not None and args.top_k is None:
        raise ModelpressError("--cache stores the teacher's top-k rows: give --top-k as well")
    config = distill_config_from_args(args, tuple(args.freeze))
    train_config = train_config_from_args(args)
    student = load_model(args.student)
    check_finite_tensors(student.model.named_parameters(), "distill into")
    ids = training_windows(student.tokenizer, args.text, args.seq_len, args.train_windows)
    data = TaskData(ids)
    teacher = _teacher_for(args, student, data, config, train_config)
    with nothing_saved_on_nan(args):
        result = distill(student.model.to(args.device), teacher, data, config, train_config)
    report = {"command": "distill", "teacher": args.teacher, "student": student.source,
              "windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "temperature": config.temperature,
              "alpha": config.alpha, "loss": config.loss, "top_k": config.top_k, **result.to_dict()}
    save_compressed(LoadedModel(student.model.cpu(), student.tokenizer, source=args.out,
                                float_source=student.float_source), args.out, overwrite=args.overwrite,
                    report=report)
    losses = result.train.losses
    print(f"distilled {result.trained_parameters:,} parameters for {result.train.steps} steps in "
          f"{result.train.seconds:.1f} s: loss {losses[0]:.4f} -> {losses[-1]:.4f} -> {args.out}", file=sys.stdout)
    write_json(args.json, report)
    return 0


def _teacher_for(args, student: LoadedModel, data: TaskData, config: DistillConfig, train_config: TrainConfig):
    """The teacher model, or its top-k cache (from --cache, or built now and the teacher freed)."""
    if args.cache is not None and Path(args.cache).exists():
        return load_teacher_cache(args.cache)   # distill() checks its vocabulary, temperature and shape
    teacher = load_model(args.teacher).model.to(args.device)
    check_finite_tensors(teacher.named_parameters(), "distill from")
    check_same_vocabulary(teacher, student.model)
    if config.top_k is None:
        return teacher
    cache = build_teacher_cache(teacher, data, config.top_k, config.temperature, train_config.batch_size,
                                train_config.precision)
    del teacher
    gc.collect()
    if args.cache is not None:
        save_teacher_cache(cache, args.cache)
    return cache

