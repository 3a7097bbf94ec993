"""modelpress compress MODEL --recipe FILE.yaml --out DIR [--max-kl X] [--json OUT]

Runs a recipe's stages in order (docs/recipes.md). The recipe is read and checked whole before the model is
loaded. DIR keeps every stage's model and report; run the same command again after an interruption and it
goes on from the last finished stage (and, inside a calibrated stage, from its last block). The final
report is DIR/report.md, report.json and report.png. A missed quality gate (the recipe's `gate`, or
--max-kl) exits with status 1 having exported nothing, and prints the layers that cost the most KL.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from modelpress.commands.common import (
    add_json_argument,
    add_model_argument,
    check_output_paths,
    format_table,
    write_json,
)
from modelpress.recipe import Gate, load_recipe


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="run a recipe: prune, quantize, recover, evaluate, export")
    add_model_argument(p)
    p.add_argument("--recipe", required=True, metavar="FILE",
                   help="recipe YAML (docs/recipes.md; recipes/ has examples)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: stage outputs, reports, exports; resumed if it holds the same run")
    p.add_argument("--max-kl", type=float, default=None, metavar="X",
                   help="quality gate: stop before exporting if the KL divergence against the float model exceeds X")
    add_json_argument(p)
    p.set_defaults(func=run)


def with_max_kl(recipe, max_kl: float | None):
    """The recipe with --max-kl added to (or replacing the max_kl of) its gate."""
    if max_kl is None:
        return recipe
    gate = Gate(max_kl=max_kl) if recipe.gate is None else dataclasses.replace(recipe.gate, max_kl=max_kl)
    return dataclasses.replace(recipe, gate=gate)


def run(args: argparse.Namespace) -> int:
    from modelpress.io.model import load_model
    from modelpress.recipe.report import COLUMNS, stage_rows
    from modelpress.recipe.run import GateFailed, compress_model

    recipe = with_max_kl(load_recipe(args.recipe), args.max_kl)     # every error in the file before any work
    check_output_paths(argparse.Namespace(json=args.json))
    loaded = load_model(args.model)
    try:
        report = compress_model(loaded, recipe, None, args.out)
    except GateFailed as failed:
        print(format_table(stage_rows(failed.report), COLUMNS), file=sys.stdout)
        print(failed.report.gate.describe(), file=sys.stdout)          # type: ignore[union-attr]
        print(f"nothing exported; reports in {args.out}", file=sys.stdout)
        write_json(args.json, failed.report.to_json())
        return 1
    print(format_table(stage_rows(report), COLUMNS), file=sys.stdout)
    print(f"{len(report.stages)} stages in {report.seconds:.1f} s -> {args.out} (report.md, report.json, report.png)",
          file=sys.stdout)
    write_json(args.json, report.to_json())
    return 0
