"""The `modelpress` command. Each subcommand lives in commands/<name>.py and exposes
`add_parser(subparsers)` (which sets `func`); this file only assembles them and turns errors for people
into one line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from modelpress.errors import ModelpressError

COMMANDS = ("quantize", "eval", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description="Make models smaller and faster, and measure the cost.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"modelpress.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ModelpressError as err:
        print(f"modelpress {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modelpress {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
