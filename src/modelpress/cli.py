"""The `modelpress` command. Each subcommand lives in commands/<name>.py and exposes
`add_parser(subparsers)` (which sets `func`); this file only assembles them and turns errors for people
into one line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from modelpress.errors import ModelpressError

# name -> one-line help. A command's module (commands/<name>.py) is imported only when that command runs,
# so `modelpress estimate` does not pay for importing transformers' generation or training code.
COMMANDS = {
    "estimate": "memory needed by a model's weights per format, and by its KV cache",
    "quantize": "quantize a model's linear layers and save it",
    "eval": "perplexity, KL and top-1 agreement against a reference, bytes and speed",
    "compare": "quantize one model into several formats and compare them",
    "generate": "generate text from a prompt (plain, speculative or self-speculative)",
    "chat": "a conversation with the model on stdin/stdout, each turn reusing the cache",
    "prune": "prune a model (unstructured, N:M or structured) and save it smaller",
    "distill": "train a student model on a teacher's soft targets (knowledge distillation)",
    "finetune": "recover a compressed model's quality: LoRA/QLoRA adapters or QAT",
    "export": "write a model as GGUF, compressed-tensors, a float HF directory or PEFT adapters",
    "plan": "plan a quantization for a size, bits or KL budget on a runtime, with a forecast",
    "compress": "run a recipe: prune, quantize, recover, evaluate, export",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress",
                                     description="Make models smaller and faster, and measure the cost.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        if name == chosen:
            importlib.import_module(f"modelpress.commands.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or 0)
        _sync_ranks()
        return code
    except ModelpressError as err:
        if _is_main_rank():   # under torchrun every rank raises the same agreed error: print it once
            print(f"modelpress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modelpress {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _is_main_rank() -> bool:
    from modelpress.engine.distributed import Ranks

    return Ranks.active().is_main


def _sync_ranks() -> None:
    """Under torchrun, wait for every rank to finish before the process group is torn down: a rank that leaves
    while a peer's last collective is still in flight can abort that peer in gloo's teardown ("terminate called
    without an active exception", seen in tests/engine/test_distributed.py under load). Only on success: after an
    error that not every rank saw, a barrier would wait forever."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
