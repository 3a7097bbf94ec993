"""Benchmark: every registered weight format at per-channel, g128 and g64 with round-to-nearest, next to
peer libraries (optimum-quanto, HQQ, bitsandbytes), on one float model and the same text windows.

Each row is scored against the float model (PPL, KL(float ‖ row), top-1 agreement) in one pass per
batch of models, so the float forward runs once per window per batch. Bits per weight are measured from
the bytes each library really stores for the quantized linear layers (codes, scales, zeros, statistics).

    .venv/bin/python bench/formats.py                                  # everything, 40 x 512 tokens
    .venv/bin/python bench/formats.py --windows 2 --formats int4 nf4 --peers hqq   # a quick look
    .venv/bin/python bench/formats.py --preset key                     # the rows the docs call key rows
    .venv/bin/python bench/formats.py --sweep-windows 4   # all rows on 4 windows, key rows on all 40

With --sweep-windows N below --windows, every row is scored on the first N windows and the key rows
also on the rest; per-token totals add up exactly, so a key row's 40-window numbers are what scoring
it on 40 windows at once would give.

Peers install with: DISABLE_CUDA=1 .venv/bin/pip install -c constraints.txt -r bench/requirements-peers.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.peers` when run as a script

from bench import scoring
from bench.peers import PEERS, load_peer
from bench.scoring import materialize, peak_rss_mb, release_memory, score, shared_copy, write_json

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.api import EvalSettings, prepare_windows
from modelpress.eval.size import measure_size
from modelpress.formats import format_names
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import load_model

log = logging.getLogger("bench.formats")

GROUPINGS = ("channel", "g128", "g64")
EXTRA_SCHEMES = ("nf4/g64/dq", "int4-asym/g32")  # asym g32 = the default GGUF's Q4_1 blocks: lossless
KEY_SCHEMES = ("int8/channel", "int4/g128", "int4-asym/g128", "nf4/g64", "int3/g128")
KEY_PEER_SCHEMES = {"quanto": ((8, None), (4, None)), "hqq": ((8, 128), (4, 128), (3, 128)), "bnb": ()}


@dataclass(frozen=True)
class Job:
    key: str                                              # unique row name, e.g. "int4/g128" or "hqq/4/g64"
    build: Callable[[nn.Module], tuple[nn.Module, dict]]  # float model copy -> (model to score, row fields)
    is_key: bool = False                                  # scored on every window when the sweep is shorter


def ours_job(spec: str) -> Job:
    scheme = WeightScheme.parse(spec)

    def build(model: nn.Module) -> tuple[nn.Module, dict]:
        start = time.perf_counter()
        quantize_rtn(model, RTNConfig(scheme=scheme))
        seconds = time.perf_counter() - start
        size = measure_size(model)
        group = str(scheme.group_size) if scheme.granularity == "group" else scheme.granularity
        return model, {
            "library": "modelpress", "scheme": scheme.spec, "format": scheme.format, "group": group,
            "bits_per_weight": size.bits_per_weight, "weight_bytes": size.weight_bytes,
            "quantized_weight_bytes": size.quantized_weight_bytes, "quantize_seconds": seconds,
            "eval_path": "PackedWeight.dequantize() once, float32 matmul", "notes": [],
        }

    return Job(scheme.spec, build, is_key=scheme.spec in KEY_SCHEMES)


def peer_job(peer: str, bits, group_size) -> Job:
    module = load_peer(peer)
    group = "auto" if group_size is None else f"g{group_size}"

    def build(model: nn.Module) -> tuple[nn.Module, dict]:
        model, info = module.quantize(model, bits, group_size)
        row = info.to_dict()
        return model, {
            "library": info.library, "scheme": info.scheme, "format": str(bits), "group": info.group_size,
            "bits_per_weight": info.bits_per_weight, "weight_bytes": info.weight_bytes,
            "quantized_weight_bytes": info.quantized_weight_bytes, "quantize_seconds": info.seconds,
            "eval_path": info.eval_path, "notes": row["notes"], "version": info.version,
        }

    return Job(f"{peer}/{bits}/{group}", build, is_key=(bits, group_size) in KEY_PEER_SCHEMES.get(peer, ()))


def our_specs(formats: list[str], preset: str) -> list[str]:
    key = [s for s in KEY_SCHEMES if s.split("/")[0] in formats]
    if preset == "key":
        return key
    specs = [f"{f}/{g}" for f in formats for g in GROUPINGS]
    specs += [s for s in EXTRA_SCHEMES if s.split("/")[0] in formats]
    return [s for s in specs if s not in key] if preset == "rest" else specs


def peer_jobs(peers: list[str], preset: str, versions: dict) -> list[Job]:
    jobs = []
    for name in peers:
        try:
            module = load_peer(name)
            versions[name] = module.available()
        except ImportError as err:
            versions[name] = f"not available: {err}"
            log.warning("peer %s skipped: %s", name, err)
            continue
        for bits, group in module.DEFAULT_SCHEMES:
            is_key = (bits, group) in KEY_PEER_SCHEMES[name]
            if (preset == "key" and not is_key) or (preset == "rest" and is_key):
                continue
            jobs.append(peer_job(name, bits, group))
    return jobs


# key rows in the order they are built and scored: the 4-bit comparison first, so a run cut short has it
KEY_ORDER = ("int4-asym/g128", "int4/g128", "hqq/4/g128", "quanto/4/auto", "int8/channel",
             "nf4/g64", "int3/g128", "hqq/3/g128", "hqq/8/g128", "quanto/8/auto")


def key_first(jobs: list[Job]) -> list[Job]:
    """Key rows first (in KEY_ORDER), so a run stopped early still has them."""
    rank = {k: i for i, k in enumerate(KEY_ORDER)}
    key = sorted((j for j in jobs if j.is_key), key=lambda j: rank.get(j.key, len(rank)))
    return key + [j for j in jobs if not j.is_key]


def run_batch(base: nn.Module, jobs: list[Job], windows: torch.Tensor, sweep: int, chunk: int,
              save: Callable[[list[dict]], None]) -> list[dict]:
    """Build the batch's models, score all on windows[:sweep] and key rows also on windows[sweep:], in
    chunks of `chunk` windows; `save` gets the rows after every chunk (per-token totals add up exactly)."""
    built, fields = {}, {}
    for job in jobs:
        try:
            model, fields[job.key] = job.build(shared_copy(base))
            built[job.key] = materialize(model)
        except Exception as err:  # a peer that fails is a result to report, not a reason to stop
            log.exception("building %s failed", job.key)
            fields[job.key] = {"error": f"{type(err).__name__}: {err}"}
        release_memory()
    log.info("built %d models; peak RSS %.0f MB", len(built), peak_rss_mb())
    sweep_scores = score(base, built, windows[:sweep])
    key_models = {j.key: built[j.key] for j in jobs if j.is_key and j.key in built}
    key_scores = dict(sweep_scores)
    rows = batch_rows(base, jobs, fields, sweep_scores, {}, sweep)
    save(rows)
    for start in range(sweep, len(windows) if key_models else sweep, chunk):
        more = score(base, key_models, windows[start : start + chunk])
        key_scores = {k: key_scores[k] + more[k] for k in more}
        rows = batch_rows(base, jobs, fields, sweep_scores, key_scores, sweep)
        save(rows)
    return rows


def batch_rows(base: nn.Module, jobs: list[Job], fields: dict, sweep_scores: dict, key_scores: dict,
               sweep: int) -> list[dict]:
    rows = []
    for key in [j.key for j in jobs] + ["float"]:
        row = {"key": key, **fields.get(key, {})}
        if key == "float":
            size = measure_size(base)
            row.update(library="float", scheme="float32", format="float32", group="-", bits_per_weight=32.0,
                       weight_bytes=size.weight_bytes, quantized_weight_bytes=None, quantize_seconds=0.0,
                       eval_path="reference", notes=[])
        if key in sweep_scores:
            row["at"] = {str(sweep): sweep_scores[key].fields()}
            if key in key_scores and key_scores[key].windows > sweep:
                row["at"][str(key_scores[key].windows)] = key_scores[key].fields()
        rows.append(row)
    return rows


def sort_rows(rows: list[dict]) -> list[dict]:
    def kl(r: dict) -> float:
        at = r.get("at") or {}
        return min((v["kl_divergence"] for v in at.values()), default=0.0)

    return sorted(rows, key=lambda r: (r.get("bits_per_weight") or 1e9, kl(r)))


def at_windows(rows: list[dict], windows: int) -> list[dict]:
    """Rows scored on `windows` windows, with those numbers as top-level fields."""
    return [{**r, **r["at"][str(windows)]} for r in rows if str(windows) in (r.get("at") or {})]


COLUMNS = [("library", "library"), ("scheme", "scheme"), ("group", "group"), ("bits_per_weight", "bits/w"),
           ("weight_bytes", "model MB"), ("perplexity", "PPL"), ("kl_divergence", "KL"),
           ("top1_agreement", "top-1"), ("quantize_seconds", "quant s")]


def table(rows: list[dict], markdown: bool = False) -> str:
    return scoring.table(rows, COLUMNS, markdown=markdown)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--sweep-windows", type=int, default=None, metavar="N",
                   help="score non-key rows on the first N windows only (default: all windows)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--formats", nargs="+", default=None, metavar="FORMAT", help="subset of our formats (default: all registered)")
    p.add_argument("--peers", nargs="*", default=list(PEERS), metavar="PEER", help=f"subset of {list(PEERS)}; none for ours only")
    p.add_argument("--preset", choices=("all", "key", "rest"), default="all",
                   help="all rows, only the key rows, or all but the key rows (two runs side by side, then --merge)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine finished runs (same model, text, seq len) into --json, tables and plot; no scoring")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW",
                   help="run only these rows (keys as in the JSON, e.g. int4/g128 hqq/4/g128 quanto/8/auto)")
    p.add_argument("--batch-models", type=int, default=6, help="models scored together per pass (memory bound)")
    p.add_argument("--chunk-windows", type=int, default=4, help="key-row windows scored between JSON saves")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "formats.json"), metavar="OUT")
    p.add_argument("--plot", default=None, metavar="PNG", help="KL-vs-bits plot (default: JSON path with .png)")
    p.add_argument("--markdown", default=None, metavar="MD", help="also write the table as markdown")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.merge:
        meta, rows = merge(args.merge)
        meta["seconds"] = sum(m.get("seconds", 0) for m in meta["merged_from"])
        report(meta, rows, args, Path(args.json))
        return 0
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # one warning per int8 matmul otherwise
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # quanto's int4 wants no_grad rather than inference_mode
    started = time.perf_counter()

    formats = args.formats or format_names()
    unknown = sorted(set(formats) - set(format_names()))
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; registered: {format_names()}")
    versions: dict = {}
    jobs = key_first([ours_job(s) for s in our_specs(formats, args.preset)] + peer_jobs(args.peers, args.preset, versions))
    if args.only:
        missing = sorted(set(args.only) - {j.key for j in jobs})
        if missing:
            raise SystemExit(f"--only names rows this selection does not have: {missing}")
        jobs = [j for j in jobs if j.key in args.only]
    sweep = min(args.sweep_windows or args.windows, args.windows)

    base = load_model(None)
    source, windows = prepare_windows(base.tokenizer, EvalSettings(windows=args.windows, seq_len=args.seq_len))
    meta = {
        "command": "python bench/formats.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": base.source, "text": f"{source.name} sha256:{source.digest}", "windows": args.windows,
        "sweep_windows": sweep, "seq_len": args.seq_len, "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__, "peers": versions, "partial": True,
    }
    log.info("%d rows (%d key) on %d windows (key rows %d) x %d tokens (%s)", len(jobs), sum(j.is_key for j in jobs),
             sweep, args.windows, args.seq_len, meta["text"])
    out = Path(args.json)
    rows: list[dict] = []
    meta.update(peak_rss_mb=round(peak_rss_mb()), seconds=0)
    for i in range(0, len(jobs), args.batch_models):
        batch = jobs[i : i + args.batch_models]
        log.info("batch %d/%d: %s", i // args.batch_models + 1, -(-len(jobs) // args.batch_models),
                 " ".join(j.key for j in batch))
        done = list(rows)

        def save(new: list[dict], done: list[dict] = done) -> None:
            rows[:] = done + [r for r in new if r["key"] != "float" or not any(x["key"] == "float" for x in done)]
            meta.update(peak_rss_mb=round(peak_rss_mb()), seconds=round(time.perf_counter() - started))
            write_json(out, {"meta": meta, "rows": sort_rows(rows)})

        run_batch(base.model, batch, windows.eval, sweep, args.chunk_windows, save)
        release_memory()

    meta["partial"] = False
    report(meta, sort_rows(rows), args, out)
    return 0


def merge(paths: list[str]) -> tuple[dict, list[dict]]:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]["meta"]
    for run, path in zip(runs[1:], paths[1:]):
        for field in ("model", "text", "seq_len"):
            if run["meta"][field] != first[field]:
                raise SystemExit(f"{path}: {field} {run['meta'][field]!r} differs from {paths[0]}'s {first[field]!r}")
    rows: dict[str, dict] = {}
    for run in runs:
        for row in run["rows"]:
            merged = rows.setdefault(row["key"], {**row, "at": {}})
            merged["at"].update(row.get("at") or {})
    meta = {**first, "merged_from": [{"path": p, **r["meta"]} for p, r in zip(paths, runs)],
            "partial": any(r["meta"].get("partial") for r in runs),
            "windows": max(r["meta"]["windows"] for r in runs),
            "sweep_windows": min(r["meta"]["sweep_windows"] for r in runs),
            "peers": {k: v for r in runs for k, v in r["meta"]["peers"].items()}}
    return meta, sort_rows(list(rows.values()))


def report(meta: dict, rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    write_json(out, {"meta": meta, "rows": rows})
    sweep = meta["sweep_windows"]
    print(f"{meta['model']} | {meta['text']} | {meta['seq_len']}-token windows | {meta['seconds']} s")
    counts = sorted({int(n) for r in rows for n in (r.get("at") or {})})
    tables = {n: at_windows(rows, n) for n in counts}
    md = []
    for n, part in tables.items():
        print(f"\n{len(part)} rows on {n} windows:")
        print(table(part))
        md.append(f"{len(part)} rows on {n} windows:\n\n" + table(part, markdown=True))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAILED {r['key']}: {r['error']}")
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(md) + "\n")
    plot = args.plot or str(out.with_suffix(".png"))
    if plot != "none":
        from modelpress.eval.plot import plot_kl_vs_bits

        plot_kl_vs_bits([r for r in tables[sweep] if r["library"] != "float"], plot,
                        title=f"KL vs float over {sweep} windows of {meta['seq_len']} tokens (RTN; peers' own methods)")
        print(f"plot: {plot}")
    print(f"json: {out}")


if __name__ == "__main__":
    raise SystemExit(main())
