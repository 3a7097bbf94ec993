"""A pipeline's final report: one table of size and quality after every stage, as markdown, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from modelpress.io.atomic import atomic_file

COLUMNS = (("label", "stage"), ("weight_bytes", "weight bytes"), ("bits_per_weight", "bits/w"),
           ("perplexity", "PPL"), ("perplexity_ratio", "PPL ratio"), ("kl_divergence", "KL"),
           ("top1_agreement", "top-1"), ("seconds", "seconds"))


def stage_rows(report) -> list[dict]:
    """The float model, then one row per stage that was measured (changed the model, or evaluated it)."""
    ref = report.reference
    rows = [{"label": "0 float", "weight_bytes": ref["weight_bytes"], "bits_per_weight": None,
             "perplexity": ref["perplexity"], "perplexity_ratio": 1.0, "kl_divergence": 0.0, "top1_agreement": 1.0,
             "seconds": 0.0}]
    for stage in report.stages:
        if stage.quality is None or stage.size is None:
            continue
        rows.append({"label": f"{stage.index} {stage.name}", **stage.size, **stage.quality, "seconds": stage.seconds})
    return rows


def markdown(report) -> str:
    rows = stage_rows(report)
    lines = [f"# compress {report.model}", "", f"{len(report.stages)} stages in {report.seconds:.1f} s "
             f"({report.resumed_stages} found done and not run again); quality against the float model on the "
             f"recipe's evaluation windows.", "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    exports = [s for s in report.stages if s.kind == "export"]
    for stage in exports:
        for target in stage.report.get("targets", []):
            exact = "lossless" if target["lossless"] else f"re-rounded layers: {target['re_rounded_layers']}"
            lines.append(f"\nexport {target['target']}: {target['file_bytes']:,} bytes, {exact}")
    if report.gate is not None:
        verdict = "passed" if report.gate.passed else f"```\n{report.gate.describe()}\n```"
        lines += ["", "## quality gate", "", verdict]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_reports(report, out: Path) -> None:
    from modelpress.eval.plot import plot_stages

    with atomic_file(out / "report.md") as handle:
        handle.write(markdown(report))
    with atomic_file(out / "report.json") as handle:
        json.dump(report.to_json(), handle, indent=1)
    plot_stages(stage_rows(report), str(out / "report.png"))
