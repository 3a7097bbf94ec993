"""Benchmark: recovering quality after compression (issue 5), on the default model (SmolLM2-135M) and the
default text. Every perplexity is over the same 40 evaluation windows of 512 tokens; training uses only
windows cut after them (the calibration side of the text).

(a) qat    at a scheme (default int4/g128): RTN and GPTQ (128 calibration windows), then quantization-aware
           training distilled from the float model (KL to its logits) within a CPU-time budget (default
           20 minutes). By default QAT starts from the GPTQ model on GPTQ's own grid (scales, offsets and
           column order fixed; train/qat.py prepare_qat_from_packed), so step 0 is exactly the GPTQ model and
           training moves weights between codes (and trains the norms); --qat-init float starts from the
           float weights with the format's scale rule instead (which starts at RTN's perplexity).
(b) prune  structured removal of 25% of all parameters (MLP neurons, or one key/value group per layer plus
           neurons), then distillation from the float model within a CPU-time budget (default 30 minutes).
(c) lora   LoRA adapters on a round-to-nearest base (default int4/g128), distilled from the float model;
           perplexity with the adapters, then merged (dequantize + BA, re-quantize with RTN or GPTQ).

    .venv/bin/python bench/recover.py --rows prune             # one part (results merged into the JSON)
    .venv/bin/python bench/recover.py --rows qat
    .venv/bin/python bench/recover.py --table                  # print the tables from saved results

The machine is shared: CPU time (time.process_time, all threads) is what the budget counts, wall time is
reported beside it together with the load average, so contention is visible.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.api import CalibrationSettings, EvalSettings, calibration_windows, prepare_windows
from modelpress.eval.quality import evaluate_quality
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import load_model
from modelpress.train.data import TaskData, training_windows
from modelpress.train.distill import DistillConfig, distill
from modelpress.train.lora import LoRAConfig, add_lora, merge_lora
from modelpress.train.qat import convert_qat, prepare_qat, prepare_qat_from_packed
from modelpress.train.trainer import TrainConfig

log = logging.getLogger("bench.recover")
RESULTS = ROOT / "bench" / "results" / "recover.json"
FREEZE = ("embed_tokens",)   # the tied embedding / output head stays as it is in every part


class Clock:
    def __init__(self) -> None:
        self.wall, self.cpu, self.load = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 1), "cpu_s": round(time.process_time() - self.cpu, 1),
                "load_start": round(self.load, 1), "load_end": round(os.getloadavg()[0], 1)}


def perplexity(model: nn.Module, eval_ids: torch.Tensor) -> dict:
    clock = Clock()
    with torch.no_grad():
        result = evaluate_quality({"m": model}, eval_ids)["m"]
    return {"ppl": round(result.perplexity, 4), "eval": clock.read()}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str) + "\n")


def float_row(base, eval_ids: torch.Tensor, results: dict) -> dict:
    """The float model's perplexity, computed once and kept in the results file."""
    key = f"windows={eval_ids.shape[0]}x{eval_ids.shape[1]}"
    if results.get("float", {}).get("key") != key:
        results["float"] = {"key": key, **perplexity(base.model, eval_ids),
                            "parameters": measure_size(base.model).parameters}
        save_results(results)
    return results["float"]


def train_config(args, steps: int, lr: float, budget_s: float | None = None) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, batch_size=1, seq_len=args.seq_len, precision=args.precision,
                       warmup_steps=args.warmup, time_budget_s=budget_s, log_every=10)


def distill_config(args) -> DistillConfig:
    return DistillConfig(temperature=args.temperature, alpha=args.alpha, loss=args.loss, freeze=FREEZE)


# ---- (b) structured pruning + distillation ----------------------------------------------------------------

def part_prune(args, base, eval_ids, data: TaskData, results: dict) -> dict:
    from modelpress.algorithms.prune.structured import StructuredConfig, count_parameters, prune_structured

    clock = Clock()
    student = copy.deepcopy(base.model)
    before = count_parameters(student)
    calib = calibration_windows(base.tokenizer, CalibrationSettings(samples=args.prune_calib))
    width = base.model.config.intermediate_size
    steps = []
    removed = args.prune_share * before
    if args.prune_target == "heads+neurons":  # one key/value group of each attention first, then neurons
        groups = base.model.config.num_key_value_heads
        steps.append(StructuredConfig(target="heads", sparsity=1 / groups))
        removed -= sum(p.numel() for n, p in student.named_parameters() if ".self_attn." in n) / groups
    neurons = neurons_for_share(base.model, removed / before)
    steps.append(StructuredConfig(target="neurons", sparsity=neurons / width))
    for step in steps:
        prune_structured(student, step, calib)
    row: dict = {"method": f"structured {args.prune_target} (prune module), {neurons}/{width} MLP neurons per layer"
                           + (", 1 key/value group per layer" if len(steps) == 2 else ""),
                 "parameters_before": before, "parameters_after": count_parameters(student),
                 "removed": round(1 - count_parameters(student) / before, 4), "prune": clock.read()}
    row["pruned"] = perplexity(student, eval_ids)
    log.info("pruned: %s", row)
    budget = args.budget_min * 60
    result = distill(student, base.model, data, distill_config(args),
                     train_config(args, args.max_steps, args.prune_lr, budget_s=budget))
    row["distill"] = {**result.to_dict(), "lr": args.prune_lr, "budget_cpu_s": budget, "losses": result.train.losses}
    row["distilled"] = perplexity(student, eval_ids)
    f, p, d = results["float"]["ppl"], row["pruned"]["ppl"], row["distilled"]["ppl"]
    row["gap_shrink"] = round((p - d) / (p - f), 4)
    row["total"] = clock.read()
    return row


def neurons_for_share(model: nn.Module, share: float) -> int:
    """MLP neurons to remove per layer (a multiple of 8) so that at least `share` of all parameters go."""
    config = model.config
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    per_neuron = 3 * config.hidden_size * config.num_hidden_layers   # gate, up and down weights of one neuron
    needed = -(-int(share * total) // per_neuron)
    return -(-needed // 8) * 8


# ---- (a) QAT against post-training quantization -------------------------------------------------------------

def part_qat(args, base, eval_ids, data: TaskData, results: dict) -> dict:
    """RTN and GPTQ at each scheme, then QAT distilled from the float model within a CPU-time budget,
    starting from the GPTQ model on its own grid (--qat-init gptq) or from the float weights (float)."""
    rows = {}
    for spec in args.schemes:
        scheme = WeightScheme.parse(spec)
        entry: dict = {}
        clock = Clock()
        rtn = copy.deepcopy(base.model)
        quantize_rtn(rtn, RTNConfig(scheme))
        entry["rtn"] = {**perplexity(rtn, eval_ids), "quantize": clock.read(),
                        "bits_per_weight": measure_size(rtn).bits_per_weight}
        del rtn
        gptq_model = None
        if args.gptq or args.qat_init == "gptq":
            entry["gptq"], gptq_model = gptq_row(base, scheme, eval_ids, args)
        gc.collect()
        clock = Clock()
        if args.qat_init == "gptq":
            student = gptq_model
            prepare_qat_from_packed(student)
        else:
            student = copy.deepcopy(base.model)
            prepare_qat(student, scheme)
        budget = args.qat_budget_min * 60
        result = distill(student, base.model, data, distill_config(args),
                         train_config(args, args.qat_steps, args.qat_lr, budget_s=budget))
        convert_qat(student)
        entry["qat"] = {**perplexity(student, eval_ids), "init": args.qat_init,
                        "train": {**result.to_dict(), "lr": args.qat_lr, "budget_cpu_s": budget,
                                  "losses": result.train.losses},
                        "bits_per_weight": measure_size(student).bits_per_weight, "total": clock.read()}
        log.info("%s: %s", spec, {k: v.get("ppl") for k, v in entry.items()})
        rows[scheme.spec] = entry
        del student
        gc.collect()
    return rows


def gptq_row(base, scheme: WeightScheme, eval_ids: torch.Tensor, args) -> tuple[dict, nn.Module]:
    from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq

    clock = Clock()
    model = copy.deepcopy(base.model)
    calib = calibration_windows(base.tokenizer, CalibrationSettings(samples=args.gptq_calib))
    quantize_gptq(model, GPTQConfig(scheme=scheme), calib, device=args.device, batch_size=4)
    return {**perplexity(model, eval_ids), "quantize": clock.read(), "calibration_windows": args.gptq_calib}, model


# ---- (c) LoRA on a quantized base ------------------------------------------------------------------------

def part_lora(args, base, eval_ids, data: TaskData, results: dict) -> dict:
    scheme = WeightScheme.parse(args.lora_scheme)
    clock = Clock()
    student = copy.deepcopy(base.model)
    quantize_rtn(student, RTNConfig(scheme))
    row: dict = {"scheme": scheme.spec, "rank": args.rank, "lora_alpha": args.lora_alpha}
    row["base"] = perplexity(student, eval_ids)
    add_lora(student, LoRAConfig(rank=args.rank, alpha=args.lora_alpha))
    result = distill(student, base.model, data, distill_config(args), train_config(args, args.lora_steps, args.lora_lr))
    row["train"] = {**result.to_dict(), "lr": args.lora_lr, "losses": result.train.losses}
    row["adapters"] = perplexity(student, eval_ids)
    for method in args.lora_merge:
        merged = copy.deepcopy(student)
        calib = None
        if method == "gptq":
            calib = calibration_windows(base.tokenizer, CalibrationSettings(samples=args.gptq_calib))
        merge_lora(merged, method, calibration_ids=calib)
        row[f"merged_{method}"] = {**perplexity(merged, eval_ids), "bits_per_weight": measure_size(merged).bits_per_weight}
        del merged
    row["total"] = clock.read()
    return row


# ---- tables ---------------------------------------------------------------------------------------------

def tables(results: dict) -> str:
    lines = []
    f = results.get("float", {}).get("ppl")
    lines.append(f"float model perplexity: {f}")
    for spec, entry in results.get("qat", {}).items():
        if spec in ("settings", "clock"):
            continue
        lines.append(f"\n(a) {spec}: method | PPL | CPU s")
        for method in ("rtn", "gptq", "qat"):
            if method in entry:
                e = entry[method]
                cpu = (e.get("train") or {}).get("cpu_seconds") or (e.get("quantize") or {}).get("cpu_s")
                init = f" (from {e['init']}, {e['train']['steps']} steps, lr {e['train']['lr']})" if method == "qat" else ""
                lines.append(f"  {method:5s} | {e.get('ppl')} | {cpu}{init}")
    if "prune" in results:
        r = results["prune"]
        d = r["distill"]
        lines.append(f"\n(b) {r['method']}: removed {r['removed']:.2%} of parameters")
        lines.append(f"  pruned PPL {r['pruned']['ppl']} -> distilled {r['distilled']['ppl']} (float {f}); "
                     f"gap shrinks by {r['gap_shrink']:.1%}")
        lines.append(f"  distillation: {d['steps']} steps, {d['cpu_seconds']} CPU s, {d['seconds']} wall s "
                     f"(budget {d['budget_cpu_s']} CPU s)")
    if "lora" in results:
        r = results["lora"]
        merged = ", ".join(f"merged ({k[7:]}) {v['ppl']}" for k, v in r.items() if k.startswith("merged_"))
        lines.append(f"\n(c) LoRA r={r['rank']} on RTN {r['scheme']}: base {r['base']['ppl']} -> adapters "
                     f"{r['adapters']['ppl']}; {merged}; {r['train']['steps']} steps, "
                     f"{r['train']['cpu_seconds']} CPU s")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", "--rows", dest="part", choices=("qat", "prune", "lora"), action="append", default=None,
                   help="parts to run (repeatable); each is saved into the JSON as soon as it ends")
    p.add_argument("--table", action="store_true", help="only print the tables from saved results")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where everything runs (cuda: the budgets still count "
                                                   "process CPU time, which then tracks wall time)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512, help="training window length")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length (pilots: shorter)")
    p.add_argument("--results", default=None, help="JSON file (default bench/results/recover.json)")
    p.add_argument("--train-windows", type=int, default=None)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--loss", default="fkl")
    # (b)
    p.add_argument("--prune-share", type=float, default=0.25)
    p.add_argument("--prune-calib", type=int, default=32)
    p.add_argument("--prune-target", choices=("neurons", "heads+neurons"), default="neurons",
                   help="what structured pruning removes (bench/prune.py's structured rows say which loses least)")
    p.add_argument("--budget-min", type=float, default=30.0, help="CPU minutes for the distillation")
    p.add_argument("--max-steps", type=int, default=400, help="step cap; the budget normally ends training first")
    p.add_argument("--prune-lr", type=float, default=2e-4)
    # (a)
    p.add_argument("--schemes", nargs="+", default=["int4/g128"])
    p.add_argument("--qat-steps", type=int, default=400, help="step cap; the budget normally ends training first")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="pilot: 2e-4 stable over 10 steps; 1e-4 for ~150")
    p.add_argument("--qat-budget-min", type=float, default=20.0, help="CPU minutes for QAT")
    p.add_argument("--qat-init", choices=("gptq", "float"), default="gptq",
                   help="start QAT from the GPTQ model on its grid, or from the float weights (format's scale rule)")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gptq-calib", type=int, default=128)
    # (c)
    p.add_argument("--lora-scheme", default="int4/g128")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-steps", type=int, default=200)
    p.add_argument("--lora-lr", type=float, default=3e-4)
    p.add_argument("--lora-merge", nargs="+", default=["rtn", "gptq"], choices=("rtn", "gptq"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.results:
        global RESULTS
        RESULTS = Path(args.results)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = load_results()
    if args.table or not args.part:
        print(tables(results))
        return 0
    torch.set_num_threads(args.threads)
    base = load_model(None)
    base.model.to(args.device)
    _, windows = prepare_windows(base.tokenizer, EvalSettings(windows=args.windows, seq_len=args.eval_seq_len))
    eval_ids = windows.eval
    float_row(base, eval_ids, results)
    data = TaskData(training_windows(base.tokenizer, None, args.seq_len, args.train_windows))
    results["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "device": args.device, "torch": torch.__version__,
                          "python": platform.python_version(), "train_windows": len(data)}
    for part in args.part:
        clock = Clock()
        row = {"qat": part_qat, "prune": part_prune, "lora": part_lora}[part](args, base, eval_ids, data, results)
        results = load_results() | {part: row, "float": results["float"], "machine": results["machine"]}
        results[part]["settings"] = {k: v for k, v in vars(args).items() if k not in ("part", "table")}
        results[part]["clock"] = clock.read()
        save_results(results)
        print(tables(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
