"""Benchmark: GGUF files made by llama.cpp's own quantizer and by modelpress, all scored by llama.cpp itself.

Rows (each a GGUF of the default model, cached in --workdir so a rerun only scores what is missing):
- llama.cpp: `llama-quantize` from an F32 GGUF of the float model (written by our exporter, token embedding
  kept Q8_0 as the source GGUF has it, like every modelpress row), with and without an importance matrix from
  `llama-imatrix` over the same calibration text modelpress calibrates on. Row: llamacpp:TYPE[+imatrix].
- modelpress: METHOD[+gguf]:SCHEME (rtn, gptq, awq-gptq; `+gguf` solves on GGUF's own grids, `--grid gguf`:
  k-quant headers where rows are whole 256-blocks) or mixed:BITS:METHOD:CANDIDATE,CANDIDATE..., quantized by
  modelpress and exported with `export_model(..., ["gguf"])`; every such row is a lossless export here.
- compressed-tensors (ct:METHOD:SCHEME, `--ct-rows`): exported with `export_model(..., ["compressed-tensors"])`,
  loaded by transformers' `AutoModelForCausalLM.from_pretrained` and scored by our evaluator on our windows
  (BOS rule, all positions) beside the in-memory modelpress model: PPL, KL and top-1 against the float model,
  and the KL between transformers' logits and ours.
Scoring: `llama-perplexity -c SEQ --chunks WINDOWS` on the evaluation text (llama.cpp tokenizes it, scores the
second half of every window), PPL and KL divergence against the float model's logits (`--kl-divergence-base`
from the F32 GGUF), and the top-token agreement. Bits per weight: the file's own bytes of the 210 linear
tensors over their parameters (and the whole file's size).

    .venv/bin/python bench/export.py --json bench/results/export.json
    .venv/bin/python bench/export.py --rows llamacpp:Q4_0+imatrix gptq:int4/g32 --calib-samples 64
    .venv/bin/python bench/export.py --rows --ct-rows ct:gptq:int4/g128 ct:smoothquant:int8/channel

Rows already in --json from a run with the same windows and calibration are kept (a rerun of a row replaces it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers.llamacpp import run_tool, tensor_mix  # noqa: E402
from bench.scoring import table, write_json  # noqa: E402

from modelpress.algorithms.quantize.mixed_run import MixedConfig, parse_candidates  # noqa: E402
from modelpress.algorithms.quantize import config_for_method  # noqa: E402
from modelpress.api import CalibrationSettings, calibration_windows, quantize_model  # noqa: E402
from modelpress.export import ExportOptions, export_model, llamacpp  # noqa: E402
from modelpress.export.gguf import GGUF_FILE  # noqa: E402
from modelpress.io.model import load_model  # noqa: E402
from modelpress.eval.quality import evaluate_quality  # noqa: E402
from modelpress.io.text import load_text, make_windows, tokenizer_bos  # noqa: E402

log = logging.getLogger("bench.export")
DEFAULT_ROWS = (
    "llamacpp:Q4_0", "llamacpp:Q4_0+imatrix", "llamacpp:Q4_K_M", "llamacpp:Q4_K_M+imatrix",
    "llamacpp:Q3_K_M", "llamacpp:Q3_K_M+imatrix", "llamacpp:Q5_0+imatrix", "llamacpp:Q5_K_M+imatrix",
    "rtn:int4/g32", "gptq:int4/g32", "awq-gptq:int4/g32", "gptq:int5/g32",
    "mixed:5.0:gptq:int4/g32,int5/g32,int8/g32", "gptq+gguf:int4-asym/g32",
)
DEFAULT_CT_ROWS = ("ct:gptq:int4/g128", "ct:gptq:int4-asym/g128", "ct:gptq:int8/channel", "ct:smoothquant:int8/channel")


def float_gguf(base, workdir: Path) -> Path:
    path = workdir / "float-f32.gguf"
    if not path.exists():
        tmp = workdir / "float-export"
        shutil.rmtree(tmp, ignore_errors=True)
        export_model(base, ["gguf"], tmp, ExportOptions(gguf_float_type="F32"))
        shutil.move(tmp / "gguf" / GGUF_FILE, path)
        shutil.rmtree(tmp)
    return path


def importance_matrix(f32: Path, calibration: str, chunks: int, seq_len: int, workdir: Path) -> Path:
    path = workdir / f"imatrix-{chunks}x{seq_len}.gguf"
    if not path.exists():
        text = workdir / "calibration.txt"
        text.write_text(calibration)
        run_tool([llamacpp.tool("llama-imatrix"), "-m", f32, "-f", text, "-c", seq_len, "--chunks", chunks,
                  "-o", path, "-t", "2"], workdir / "imatrix.log")
    return path


def llamacpp_row(key: str, f32: Path, imatrix: Path, workdir: Path) -> tuple[Path, float]:
    quant_type, _, extra = key.partition(":")[2].partition("+")
    out = workdir / f"{key.replace(':', '-').replace('+', '-')}.gguf"
    start = time.perf_counter()
    if not out.exists():
        command = [llamacpp.tool("llama-quantize"), "--token-embedding-type", "q8_0"]
        if extra == "imatrix":
            command += ["--imatrix", imatrix]
        run_tool(command + [f32, out, quant_type, "2"], workdir / f"{out.stem}.log")
    return out, time.perf_counter() - start


def quantized(key: str, base, calibration: CalibrationSettings):
    """A copy of the float model quantized as the row key METHOD[+gguf]:SCHEME or mixed:... says."""
    loaded = copy.deepcopy(base)
    method, _, spec = key.partition(":")
    if method == "mixed":
        bits, method, candidates = spec.split(":")
        config = MixedConfig(target_bits=float(bits), candidates=parse_candidates(candidates.split(",")),
                             method=method)
    else:
        method, _, grid = method.partition("+")
        config = config_for_method(method, spec, **({"grid": grid} if grid else {}))
    quantize_model(loaded, config, calibration)
    return loaded


def modelpress_row(key: str, base, calibration: CalibrationSettings, workdir: Path) -> tuple[Path, float]:
    out = workdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '-', key)}.gguf"
    start = time.perf_counter()
    if not out.exists():
        loaded = quantized(key, base, calibration)
        tmp = workdir / f"{out.stem}-export"
        shutil.rmtree(tmp, ignore_errors=True)
        result = export_model(loaded, ["gguf"], tmp)[0]
        if not result.lossless:
            log.warning("%s: %d layers re-rounded in the export", key, sum(not x.lossless for x in result.layers))
        shutil.move(tmp / "gguf" / GGUF_FILE, out)
        shutil.rmtree(tmp)
    return out, time.perf_counter() - start


def score(path: Path, base_logits: Path, text: Path, windows: int, seq_len: int, workdir: Path) -> dict:
    output = llamacpp.run([llamacpp.tool("llama-perplexity"), "-m", path, "-f", text, "-c", seq_len, "--chunks",
                           windows, "-t", "2", "--kl-divergence-base", base_logits, "--kl-divergence"])
    (workdir / f"{path.stem}.score.log").write_text(output)
    found = {name: re.search(pattern, output) for name, pattern in (
        ("perplexity", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), ("float_perplexity", r"Mean PPL\(base\)\s*:\s*([\d.]+)"),
        ("kl_divergence", r"Mean\s+KLD:\s*([-\d.e]+)"), ("top1_agreement", r"Same top p:\s*([\d.]+)"))}
    missing = [name for name, match in found.items() if match is None]
    if missing:
        raise RuntimeError(f"llama-perplexity printed no {missing} for {path}; see {workdir / path.stem}.score.log")
    values = {name: float(match.group(1)) for name, match in found.items()}
    values["top1_agreement"] /= 100
    mix = tensor_mix(path)
    parameters = sum(v["parameters"] for v in mix["types"].values())
    values["bits_per_weight"] = 8 * sum(v["bytes"] for v in mix["types"].values()) / parameters
    values["file_mb"] = path.stat().st_size / 1e6
    values["linear_types"] = {k: v["tensors"] for k, v in mix["types"].items()}
    return values


def ct_row(key: str, base, calibration: CalibrationSettings, windows: torch.Tensor, workdir: Path) -> dict:
    """Export to compressed-tensors, load it in transformers, score both it and our model against the float one."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    start = time.perf_counter()
    loaded = quantized(key.removeprefix("ct:"), base, calibration)
    out = workdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '-', key)}"
    shutil.rmtree(out, ignore_errors=True)
    result = export_model(loaded, ["compressed-tensors"], out)[0]
    seconds = time.perf_counter() - start
    folder = out / "compressed-tensors"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    # transformers 5.23 runs symmetric packed and int8 W8A8 checkpoints compressed; asymmetric ones only
    # decompressed at load (dequantize=True)
    asymmetric = any(not (g.get("weights") or {}).get("symmetric", True) for g in config["config_groups"].values())
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    compressed = any(type(m).__name__ == "CompressedLinear" for m in theirs.modules())
    scored = evaluate_quality({"modelpress": loaded.model, "transformers": theirs}, windows, reference=base.model)
    with torch.no_grad():
        between = evaluate_quality({"transformers": theirs}, windows, reference=loaded.model)["transformers"]
    ours, hf = scored["modelpress"], scored["transformers"]
    return {"row": key, "lossless": result.lossless, "export_kl": result.kl_divergence,
            "loaded_compressed": compressed, "bits_per_weight": result.linear_bits_per_weight,
            "folder_mb": result.file_bytes / 1e6, "perplexity": hf.perplexity, "kl_divergence": hf.kl_divergence,
            "top1_agreement": hf.top1_agreement, "modelpress_perplexity": ours.perplexity,
            "modelpress_kl_divergence": ours.kl_divergence, "kl_transformers_vs_modelpress": between.kl_divergence,
            "make_seconds": round(seconds, 1)}


def merged(path: Path, header: dict, key: str, rows: list[dict]) -> list[dict]:
    """Rows kept from an earlier run with the same header, with this run's rows in place of same-named ones."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return rows
    if any(old.get(k) != v for k, v in header.items()):
        return rows
    ours = {r["row"] for r in rows}
    return [r for r in old.get(key, []) if r["row"] not in ours] + rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="*", default=list(DEFAULT_ROWS), metavar="ROW")
    p.add_argument("--ct-rows", nargs="*", default=list(DEFAULT_CT_ROWS), metavar="ROW")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/modelpress-bench-export")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "export.json"), metavar="OUT")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    base = load_model(None)
    calibration = CalibrationSettings(samples=args.calib_samples, eval_tokens=args.windows * args.seq_len)
    text = workdir / "evaluation.txt"
    text.write_text(load_text(None).text)
    f32 = float_gguf(base, workdir)
    base_logits = workdir / f"float-{args.windows}x{args.seq_len}.kld"
    if not base_logits.exists():
        llamacpp.run([llamacpp.tool("llama-perplexity"), "-m", f32, "-f", text, "-c", args.seq_len, "--chunks",
                      args.windows, "-t", "2", "--kl-divergence-base", base_logits])
    calibration_ids = calibration_windows(base.tokenizer, calibration)
    calibration_text = "".join(base.tokenizer.decode(ids) for ids in calibration_ids)
    imatrix = None
    rows, ct_rows = [], []
    header = {"model": base.source, "windows": args.windows, "seq_len": args.seq_len,
              "calibration_windows": args.calib_samples}

    def save() -> None:
        write_json(Path(args.json), {**header, "scored_by": "llama-perplexity",
                                     "llama_cpp": "llama-cpp-python 0.3.36 (vendored llama.cpp)",
                                     "rows": merged(Path(args.json), header, "rows", rows),
                                     "compressed_tensors": merged(Path(args.json), header, "compressed_tensors", ct_rows)})

    for key in args.rows:
        if key.startswith("llamacpp:"):
            if imatrix is None and key.endswith("+imatrix"):
                imatrix = importance_matrix(f32, calibration_text, args.calib_samples, args.seq_len, workdir)
            path, seconds = llamacpp_row(key, f32, imatrix, workdir)
        else:
            path, seconds = modelpress_row(key, base, calibration, workdir)
        row = {"row": key, "make_seconds": round(seconds, 1),
               **score(path, base_logits, text, args.windows, args.seq_len, workdir)}
        log.info("%s: %.3f b/w, PPL %.3f, KL %.4f", key, row["bits_per_weight"], row["perplexity"], row["kl_divergence"])
        rows.append(row)
        save()
    if args.ct_rows:
        eval_windows = make_windows(base.tokenizer, load_text(None), args.seq_len, args.windows,
                                    bos=tokenizer_bos(base.tokenizer)).eval
    for key in args.ct_rows:
        row = ct_row(key, base, calibration, eval_windows, workdir)
        log.info("%s: %.3f b/w, PPL %.3f, KL %.4f (transformers vs ours %.2e)", key, row["bits_per_weight"],
                 row["perplexity"], row["kl_divergence"], row["kl_transformers_vs_modelpress"])
        ct_rows.append(row)
        save()
    if rows:
        columns = [("row", "row"), ("bits_per_weight", "linear b/w"), ("file_mb", "file MB"), ("perplexity", "PPL"),
                   ("kl_divergence", "KL"), ("top1_agreement", "top-1"), ("make_seconds", "make s")]
        print(f"float PPL (llama.cpp, second half of {args.windows} x {args.seq_len}): {rows[0]['float_perplexity']:.3f}")
        print(table(sorted(rows, key=lambda r: r["bits_per_weight"]), columns, left=1))
        print(json.dumps({r["row"]: r["linear_types"] for r in rows}))
    if ct_rows:
        columns = [("row", "row"), ("bits_per_weight", "linear b/w"), ("perplexity", "PPL (transformers)"),
                   ("kl_divergence", "KL"), ("top1_agreement", "top-1"), ("modelpress_kl_divergence", "KL (ours)"),
                   ("kl_transformers_vs_modelpress", "KL theirs||ours"), ("loaded_compressed", "compressed")]
        print(f"compressed-tensors in transformers, our windows ({args.windows} x {args.seq_len}, all positions):")
        print(table(ct_rows, columns, left=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
