"""Why calibrated quantization loses its lead out of domain, one layer at a time (bench/cross_domain.py
measures the whole model; this isolates the solver).

For a few linear layers of the float default model, the input Hessians H = X^T X / n are collected on
calibration windows of corpus A and on evaluation windows of corpora B (in-domain and out of domain).
Each setting solves every layer against H_A, then scores the solution with the layer objective
tr((W - Q) H_B (W - Q)^T) under each H_B, relative to round-to-nearest's objective under the same H_B:
below 1 the solver beats RTN on that text, above 1 it does worse. Settings are GPTQ options
(damp, shrink_steps, act_order, ...) and the calibration text.

    PYTHONPATH=src .venv/bin/python bench/cross_domain_layers.py --calib docs mix --eval docs bible dialogue \\
        --settings damp=0.01 damp=0.1 damp=0.1+shrink_steps=1
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scoring import table, write_json

from modelpress.algorithms.quantize.gptq import GPTQConfig, gptq_solve, layer_objective
from modelpress.api import CalibrationSettings, EvalSettings, calibration_windows, prepare_windows
from modelpress.engine.blocks import find_blocks
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import load_model
from modelpress.nn.layers import find_linear_layers

log = logging.getLogger("bench.cross_domain_layers")


@torch.no_grad()
def input_hessians(model, names: list[str], ids: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """X^T X / n (K, K) of the input of each named linear layer over all positions of ids (windows, seq_len)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    count = [0]

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size])
            count[0] += ids[start : start + batch_size].numel()
    finally:
        for h in handles:
            h.remove()
    return {n: (s / count[0]).float() for n, s in sums.items()}


def parse_setting(text: str) -> dict:
    options = {}
    for part in filter(None, text.split("+")):
        key, _, value = part.partition("=")
        default = getattr(GPTQConfig(scheme="int4/g128"), key)
        options[key] = (value.lower() in ("1", "true")) if isinstance(default, bool) else type(default)(value)
    return options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", default="int4/g128")
    p.add_argument("--calib", nargs="+", default=["docs", "mix"])
    p.add_argument("--eval", nargs="+", default=["docs", "bible", "dialogue"])
    p.add_argument("--settings", nargs="+", default=["damp=0.01"])
    p.add_argument("--samples", type=int, default=32, help="calibration windows")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows per corpus")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 10, 20, 28])
    p.add_argument("--layers", nargs="+", default=["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                    "mlp.down_proj"])
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "cross_domain_layers.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(2)
    base = load_model(None)
    model = base.model.float().eval()
    stack = find_blocks(model)
    names = [f"{stack.block_name(b)}.{layer}" for b in args.blocks for layer in args.layers]
    linear = find_linear_layers(model)
    scheme = WeightScheme.parse(args.scheme)
    hessians = {}
    for corpus in args.calib:
        ids = calibration_windows(base.tokenizer, CalibrationSettings(text=corpus, samples=args.samples))
        hessians["calib:" + corpus] = input_hessians(model, names, ids)
        log.info("Hessians of %s calibration windows: %s", corpus, tuple(ids.shape))
    for corpus in args.eval:
        _, windows = prepare_windows(base.tokenizer, EvalSettings(text=corpus, windows=args.windows, speed=False))
        hessians["eval:" + corpus] = input_hessians(model, names, windows.eval)
        log.info("Hessians of %s evaluation windows", corpus)
    rtn = {n: quantize_weight(linear[n].weight.detach().float(), scheme).dequantize().float() for n in names}
    rows = []
    for corpus in args.calib:
        for setting in args.settings:
            options = parse_setting(setting)
            config = GPTQConfig(scheme=scheme, **options)
            ratios: dict[str, list[float]] = {b: [] for b in args.eval}
            for n in names:
                w = linear[n].weight.detach().float()
                h = hessians["calib:" + corpus][n]
                q = gptq_solve(w, h, scheme, config.damp, config.block_size, config.act_order, config.shrink_steps,
                               config.static_groups).packed().dequantize().float()
                if config.keep_better_of_rtn and layer_objective(w, rtn[n], h) < layer_objective(w, q, h):
                    q = rtn[n]
                for b in args.eval:
                    hb = hessians["eval:" + b][n]
                    ratios[b].append(layer_objective(w, q, hb) / layer_objective(w, rtn[n], hb))
            row = {"calibration": corpus, "setting": setting or "defaults"}
            for b in args.eval:   # geometric mean over layers of objective(GPTQ) / objective(RTN) under H_B
                row[b] = math.exp(sum(math.log(r) for r in ratios[b]) / len(ratios[b]))
                row[b + "_layers"] = ratios[b]
            log.info("%s", {k: v for k, v in row.items() if not k.endswith("_layers")})
            rows.append(row)
    write_json(Path(args.json), {"scheme": scheme.spec, "layers": names, "samples": args.samples,
                                 "windows": args.windows, "rows": rows})
    columns = [("calibration", "calib A"), ("setting", "GPTQ setting")] + [(b, f"obj/RTN on {b}") for b in args.eval]
    for row in rows:
        for b in args.eval:
            row[b] = f"{row[b]:.3f}"
    print(f"{scheme.spec}: layer objective of GPTQ / RTN's under each evaluation text's Hessian "
          f"(geometric mean over {len(names)} layers)")
    print(table(rows, columns, left=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
