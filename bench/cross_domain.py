"""Benchmark: calibrate on corpus A, evaluate on corpus B, for every calibrated method, beside
calibration-free rows (RTN, bitsandbytes NF4, HQQ) on the same B windows.

Corpora are the named offline ones (io/corpora.py: docs, bible, dialogue), calibration mixes (`mix`,
`mix:docs,bible`) and `generated` (io/generated.py: windows the float model samples itself; as an evaluation
corpus, other samples than calibration's, seed 1). A row is METHOD:SCHEME[+OPTION[=VALUE]]... as in bench/calibrated.py (gptq, awq,
awq-gptq with `samples=N`), or a calibration-free row: `rtn:SCHEME`, `bnb:nf4` (bitsandbytes NF4, blocks
of 64, double-quantized absmax) and `hqq:4` (HQQ 4-bit, groups of 64). Calibrated rows are built once per
calibration corpus, calibration-free ones once; every model is scored on every evaluation corpus against
the float model, on the same windows (`--windows` x `--seq-len`, BOS per window by the usual rule,
scored on all positions). Each evaluation corpus's windows are its first ones; calibration windows come
after them (a mix: after each part's), so calibration never sees evaluation text.

    PYTHONPATH=src .venv/bin/python bench/cross_domain.py                      # the table in docs/benchmarks.md
    PYTHONPATH=src .venv/bin/python bench/cross_domain.py --windows 8 --calib docs --eval bible \\
        --rows gptq:int4/g128+samples=16 gptq:int4/g128+samples=16+damp=0.1 rtn:int4-asym/g128
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.calibrated import RowSpec
from bench.peers.compare import with_weights
from bench.peers.rows import stored_weights
from bench.scoring import materialize, release_memory, score, shared_copy, table, write_json

from modelpress.api import EvalSettings, prepare_windows
from modelpress.errors import ModelpressError
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
from modelpress.io.generated import GENERATED, generated_windows
from modelpress.io.model import load_model

log = logging.getLogger("bench.cross_domain")

ROWS = ["gptq:int4/g128", "awq-gptq:int3-asym/g128", "awq:int4/g128", "rtn:int4-asym/g128", "bnb:nf4", "hqq:4"]
FREE = ("rtn", "bnb", "hqq")      # rows that take no calibration data
EVAL_SEED = 1                     # `--eval generated`: samples the calibration (seed 0) never saw


def build_free(key: str, model: torch.nn.Module) -> dict:
    """A calibration-free row, quantized in place: its fields."""
    method, _, arg = key.partition(":")
    start = time.perf_counter()
    if method == "rtn":
        from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn

        quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse(arg)))
        bits = measure_size(model).bits_per_weight
    elif method == "bnb":
        from bench.peers import bnb

        bits = bnb.quantize(model, arg, 64)[1].bits_per_weight
    elif method == "hqq":
        from bench.peers import hqq

        bits = hqq.quantize(model, int(arg), 64)[1].bits_per_weight
    else:
        raise ModelpressError(f"row {key!r}: calibration-free rows are rtn:SCHEME, bnb:nf4, hqq:BITS")
    return {"method": method, "scheme": arg, "bits_per_weight": bits,
            "quantize_seconds": round(time.perf_counter() - start, 1)}


def build_rows(base, args) -> list[tuple[dict, torch.nn.Module]]:
    """(fields, float32 model holding the stored weights) for every row and calibration corpus. With
    --cache DIR each built row is kept there (its stored weights as float32) and reused by a later run."""
    built = []
    for key in args.rows:
        free = key.partition(":")[0] in FREE
        for calib in ([None] if free else args.calib):
            cached = None if args.cache is None else Path(args.cache) / f"{key}@{calib}".replace("/", "_")
            if cached is not None and (cached / "row.json").exists():
                fields = json.loads((cached / "row.json").read_text())
                built.append((fields, with_weights(base.model, torch.load(cached / "weights.pt", weights_only=True))))
                log.info("reused %s (calibration %s) from %s", key, fields["calibration"], cached)
                continue
            model = shared_copy(base.model)
            if free:
                fields = build_free(key, model)
            else:
                fields = RowSpec.parse(key).run(model, base.tokenizer, args.device, calib)
                fields.pop("summary", None)
            fields.update(row=key, calibration=calib or "-")
            log.info("built %s (calibration %s) in %.1f s", key, fields["calibration"], fields["quantize_seconds"])
            built.append((fields, materialize(model)))
            if cached is not None:
                cached.mkdir(parents=True, exist_ok=True)
                torch.save(stored_weights(model), cached / "weights.pt")
                (cached / "row.json").write_text(json.dumps(fields, default=str))
            release_memory()
    return built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, metavar="ROW")
    p.add_argument("--calib", nargs="+", default=["docs", "mix"], metavar="A", help="calibration corpora / mixes")
    p.add_argument("--eval", nargs="+", default=["docs", "bible", "dialogue"], metavar="B", help="evaluation corpora")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu", help="where models are calibrated and scored (cpu, cuda); "
                   "the peers bnb and hqq need their own devices")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None, metavar="DIR", help="keep built rows in DIR and reuse them")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "cross_domain.json"), metavar="OUT")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)   # quanto/hqq want no_grad rather than inference_mode
    start = time.perf_counter()
    base = load_model(None)
    base.model.float().eval().to(args.device)     # every row is built, scored and compared on --device
    built = build_rows(base, args)
    results, floats = [], {}
    for corpus in args.eval:
        if corpus == GENERATED:   # in-domain for `generated` calibration: other samples of the float model
            eval_ids = generated_windows(base.model, base.tokenizer, args.windows, args.seq_len, seed=EVAL_SEED)
        else:
            eval_ids = prepare_windows(base.tokenizer, EvalSettings(text=corpus, windows=args.windows,
                                                                    seq_len=args.seq_len, speed=False))[1].eval
        names = {f"{f['row']} @ {f['calibration']}": m for f, m in built}
        scores = score(base.model, names, eval_ids)
        floats[corpus] = scores["float"].fields()
        rtn_kl = {}
        for fields, _ in built:
            row = {**fields, "eval": corpus, **scores[f"{fields['row']} @ {fields['calibration']}"].fields()}
            row["delta_perplexity"] = row["perplexity"] / floats[corpus]["perplexity"] - 1
            row["ppl_ratio"] = row["perplexity"] / floats[corpus]["perplexity"]
            if fields["method"] == "rtn":
                rtn_kl.setdefault(corpus, row["kl_divergence"])
            results.append(row)
        for row in results:
            if row["eval"] == corpus and corpus in rtn_kl:
                row["kl_vs_rtn"] = row["kl_divergence"] / rtn_kl[corpus]
        write_json(Path(args.json), payload(args, base, floats, results, time.perf_counter() - start))
    seconds = time.perf_counter() - start
    write_json(Path(args.json), payload(args, base, floats, results, seconds))
    columns = [("row", "row"), ("calibration", "calib A"), ("eval", "eval B"), ("bits_per_weight", "bits/w"),
               ("perplexity", "PPL"), ("delta_perplexity", "dPPL"), ("kl_divergence", "KL"), ("kl_vs_rtn", "KL/RTN"),
               ("top1_agreement", "top-1")]
    for row in results:
        row["kl_vs_rtn"] = None if "kl_vs_rtn" not in row else round(row["kl_vs_rtn"], 2)
    print(", ".join(f"float PPL on {c} {f['perplexity']:.3f}" for c, f in floats.items()),
          f"({args.windows} x {args.seq_len} tokens; {seconds / 60:.1f} min in all)")
    print(table(sorted(results, key=lambda r: (r["eval"], r["row"])), columns, left=3, markdown=args.markdown))
    return 0


def payload(args, base, floats: dict, rows: list[dict], seconds: float) -> dict:
    return {"model": base.source, "windows": args.windows, "seq_len": args.seq_len, "calibration": args.calib,
            "eval": args.eval, "device": args.device, "torch": torch.__version__,
            "python": platform.python_version(), "seconds": round(seconds, 1), "float": floats, "rows": rows}


if __name__ == "__main__":
    raise SystemExit(main())
