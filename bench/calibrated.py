"""Benchmark: calibrated quantization settings side by side (GPTQ, AWQ, AWQ+GPTQ and their options), on
the default model and text, every row scored against the float model on the same windows in one run.

A row is METHOD:SCHEME[+OPTION[=VALUE]]...: the method is gptq, awq or awq-gptq; options are fields of
GPTQConfig (gptq) or AWQConfig (awq, awq-gptq), plus `samples` (calibration windows, default 128). A bare
option is True; `no_OPTION` is False.

    .venv/bin/python bench/calibrated.py --rows gptq:int3/g128 gptq:int3-asym/g128+true_sequential
    PYTHONPATH=src python3 bench/calibrated.py --device cuda --rows awq-gptq:int3-asym/g128 \\
        gptq:int3-asym/g128+samples=256+damp=0.05
    .venv/bin/python bench/calibrated.py --windows 10 --rows gptq:int4/g128+samples=32 \\
        gptq:int4/g128+no_static_groups+samples=32          # static groups against the permuted layout

Quantization runs on --device (the engine moves one block at a time there); scoring runs there too, on
float32 weights rebuilt once from what each row stores (bench/scoring.materialize), so the numbers are
those of the stored weights. Results on CUDA and on the CPU agree to float32 rounding of the solves,
not bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scoring import materialize, release_memory, score, table, write_json

from modelpress.algorithms.quantize.awq import AWQConfig, quantize_awq
from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.api import CalibrationSettings, EvalSettings, calibration_windows, prepare_windows
from modelpress.errors import ModelpressError
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import load_model

log = logging.getLogger("bench.calibrated")
METHODS = {"gptq": GPTQConfig, "awq": AWQConfig, "awq-gptq": AWQConfig}


@dataclasses.dataclass(frozen=True)
class RowSpec:
    key: str
    method: str
    scheme: WeightScheme
    options: dict
    samples: int

    @classmethod
    def parse(cls, key: str) -> RowSpec:
        method, _, rest = key.partition(":")
        if method not in METHODS or not rest:
            raise ModelpressError(f"row {key!r}: expected METHOD:SCHEME[+OPTION=VALUE...], METHOD one of "
                                  f"{', '.join(METHODS)}")
        spec, *parts = rest.split("+")
        fields = {f.name: f for f in dataclasses.fields(METHODS[method])}
        options, samples = {}, 128
        for part in parts:
            name, has_value, text = part.partition("=")
            if name == "samples":
                samples = int(text)
                continue
            value: object = True
            if name.startswith("no_") and not has_value:
                name, value = name[3:], False
            if name not in fields or name in ("scheme", "skip", "schemes", "solver", "grid"):
                raise ModelpressError(f"row {key!r}: {name!r} is not an option of {METHODS[method].__name__}")
            if has_value:
                value = type(getattr(METHODS[method](scheme=WeightScheme.parse(spec)), name))(text)
            options[name] = value
        return cls(key, method, WeightScheme.parse(spec), options, samples)

    def run(self, model: torch.nn.Module, tokenizer, device: str, text: str | None) -> dict:
        ids = calibration_windows(tokenizer, CalibrationSettings(text=text, samples=self.samples,
                                                                        device=device), model)
        start = time.perf_counter()
        if self.method == "gptq":
            report = quantize_gptq(model, GPTQConfig(scheme=self.scheme, **self.options), ids, device=device)
        else:
            config = AWQConfig(scheme=self.scheme, solver="gptq" if self.method == "awq-gptq" else "rtn",
                               **self.options)
            report = quantize_awq(model, config, ids, device=device)
        seconds = time.perf_counter() - start
        size = measure_size(model)
        return {"method": self.method, "scheme": self.scheme.spec, "options": self.options,
                "calibration_windows": self.samples, "quantize_seconds": round(seconds, 1),
                "bits_per_weight": size.bits_per_weight, "summary": report.summary()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", required=True, metavar="ROW")
    p.add_argument("--model", default=None, help="float model (default: the embedded default model)")
    p.add_argument("--text", default=None, help="evaluation and calibration text (default: the embedded text)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "calibrated.json"), metavar="OUT")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    specs = [RowSpec.parse(key) for key in args.rows]

    base = load_model(args.model)
    base.model.float().eval()
    source, windows = prepare_windows(base.tokenizer, EvalSettings(text=args.text, windows=args.windows,
                                                                   seq_len=args.seq_len, speed=False))
    eval_ids = windows.eval
    reference = copy.deepcopy(base.model).to(args.device)
    columns = [("row", "row"), ("bits_per_weight", "bits/w"), ("perplexity", "PPL"), ("delta_perplexity", "dPPL"),
               ("kl_divergence", "KL"), ("top1_agreement", "top-1"), ("quantize_seconds", "time s")]
    rows, float_fields = [], None
    for spec in specs:   # each row is scored (and saved) as soon as it is built: a long run keeps what it did
        model = copy.deepcopy(base.model)
        row = {"row": spec.key, **spec.run(model, base.tokenizer, args.device, args.text)}
        scores = score(reference, {spec.key: materialize(model).to(args.device)}, eval_ids)
        float_fields = scores["float"].fields()
        row.update(scores[spec.key].fields())
        row["delta_perplexity"] = row["perplexity"] / float_fields["perplexity"] - 1
        log.info("%s: %.1f s, %.3f bits/weight, PPL %.3f, KL %.4f", spec.key, row["quantize_seconds"],
                 row["bits_per_weight"], row["perplexity"], row["kl_divergence"])
        rows.append(row)
        del model
        release_memory()
        write_json(Path(args.json), {
            "model": base.source, "text": source.name, "windows": args.windows, "seq_len": args.seq_len,
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "torch": torch.__version__, "python": platform.python_version(), "float": float_fields, "rows": rows})
    print(f"float PPL {float_fields['perplexity']:.3f} on {args.windows} x {args.seq_len} tokens ({source.name})")
    print(table(rows, columns, left=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
