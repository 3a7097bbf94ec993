"""Arguments and output shared by subcommands: MODEL, --text, --json, tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from modelpress.errors import ModelpressError
from modelpress.io.atomic import atomic_file, check_output_dir, check_output_file, check_writable_parent


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="HF directory, hub id, .gguf file or saved modelpress directory (default: SmolLM2-135M)")


def add_text_arguments(parser: argparse.ArgumentParser, windows: int = 40) -> None:
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="UTF-8 text file, or hf:PATH[:CONFIG[:SPLIT]] (default: embedded corpus)")
    parser.add_argument("--windows", type=positive_int, default=windows, help=f"evaluation windows (default {windows})")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not start windows with the BOS token (by default they do when the tokenizer adds one)")
    parser.add_argument("--bos-mode", choices=("overwrite", "prepend"), default="overwrite",
                        help="how text follows the BOS: llama.cpp's overwrite (default: the first token of each "
                             "block becomes BOS) or prepend (BOS before the text, no token skipped)")
    parser.add_argument("--score", choices=("all", "second-half"), default="all",
                        help="positions scored: all but the first (default), or llama.cpp's second half of each window")


def eval_settings(args: argparse.Namespace):
    """The EvalSettings the text arguments describe."""
    from modelpress.api import EvalSettings

    return EvalSettings(text=args.text, windows=args.windows, seq_len=args.seq_len, speed=not args.no_speed,
                        bos=not args.no_bos, bos_mode=args.bos_mode, score=args.score, tasks=tuple(getattr(args, "tasks", None) or ()))


def add_calibration_arguments(parser: argparse.ArgumentParser, title: str, resume_help: str) -> None:
    """--calib-text/-samples/-seq-len/-batch-size, --resume and --device, as one argument group."""
    calib = parser.add_argument_group(title)
    calib.add_argument("--calib-text", default=None, metavar="FILE",
                       help="UTF-8 text file, hf:PATH[:CONFIG[:SPLIT]], a named corpus (docs, bible, dialogue), a mix "
                            "(mix, mix:A,B), or 'generated': windows the float model samples itself (default: embedded "
                            "corpus, after its evaluation windows)")
    calib.add_argument("--calib-samples", type=positive_int, default=128, help="calibration windows (default 128)")
    calib.add_argument("--calib-seq-len", type=positive_int, default=512, help="tokens per calibration window (default 512)")
    calib.add_argument("--calib-batch-size", type=positive_int, default=8, help="windows per block forward (default 8)")
    calib.add_argument("--resume", default=None, metavar="DIR", help=resume_help)
    calib.add_argument("--calib-no-bos", action="store_true",
                       help="do not start calibration windows with the BOS token the tokenizer adds")
    calib.add_argument("--calib-bos-mode", choices=("overwrite", "prepend"), default="overwrite",
                       help="how calibration text follows the BOS: llama.cpp's overwrite (default) or prepend")
    calib.add_argument("--device", default="cpu", help="device the blocks are calibrated on, e.g. cpu or cuda (default cpu)")
    calib.add_argument("--offload-hidden", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the hidden states carried between blocks in host memory (default: only when they "
                            "would crowd the GPU; `modelpress estimate MODEL --calibrate` shows both)")


def start_ranks(args: argparse.Namespace):
    """Under torchrun (engine/distributed.py): join the process group (gloo on CPU, NCCL on CUDA) and make
    `args.device` this rank's device. A single process gets Ranks() and its arguments unchanged."""
    from modelpress.engine.distributed import init_from_environment

    ranks, device = init_from_environment(getattr(args, "device", None) or "cpu")
    if hasattr(args, "device"):
        args.device = device
    return ranks


def calibration_settings(args: argparse.Namespace):
    """The CalibrationSettings the calibration arguments describe."""
    from modelpress.api import CalibrationSettings

    return CalibrationSettings(text=args.calib_text, samples=args.calib_samples, seq_len=args.calib_seq_len,
                               batch_size=args.calib_batch_size, device=args.device, resume_dir=args.resume,
                               bos=not args.calib_no_bos, bos_mode=args.calib_bos_mode,
                               offload_hidden=getattr(args, "offload_hidden", None))


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any model is loaded, the outputs a command could only fail on after its work: an
    existing --out without --overwrite (or one --overwrite must not replace), and an --out, --json, --plot
    or --resume that cannot be created. Each command's run() calls this first."""
    if getattr(args, "out", None) is not None:
        check_output_dir(Path(args.out), getattr(args, "overwrite", False), "--out")
    for flag in ("json", "plot"):
        value = getattr(args, flag, None)
        if value is not None and value != "none":
            check_output_file(Path(value), f"--{flag}")
    if getattr(args, "resume", None) is not None:
        resume = Path(args.resume)
        if resume.exists() and not resume.is_dir():
            raise ModelpressError(f"--resume {resume} is not a directory; give a directory for the run's progress")
        check_writable_parent(resume / "state.json", "--resume")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def group_size_arg(text: str) -> int | str:
    """--group-size: a positive integer, `channel` or `tensor`."""
    if text in ("channel", "tensor"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise ModelpressError(f"group size must be a positive integer, 'channel' or 'tensor', got {text!r}") from None
    if value <= 0:
        raise ModelpressError(f"group size must be a positive integer, got {value}")
    return value


def write_json(path: str | None, payload) -> None:
    if path is None:
        return
    with atomic_file(path) as handle:
        json.dump(payload, handle, indent=1, default=str)
        handle.write("\n")


def fmt_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """columns: (key, header). Plain aligned text, one row per dict."""
    cells = [[header for _, header in columns]] + [[fmt_value(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def model_for(args: argparse.Namespace, stream: bool) -> Iterator:
    """The model a command works on: loaded, or with `stream` opened block by block (engine/stream.py). The
    streamed blocks' work directory (a hidden sibling of --out, removed afterwards) lives as long as the context."""
    from modelpress.io.model import load_model, load_streamed

    if not stream:
        yield load_model(args.model)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-blocks-", dir=out.parent))
    try:
        yield load_streamed(args.model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

