"""The rows of `python -m bench.peers`, and building one of them in a process of its own.

Each row is built in a fresh Python process (`python -m bench.peers.rows KEY --out DIR ...`): it loads the
float model, resets the kernel's peak-RSS counter (/proc/self/clear_refs), quantizes, and records wall
time, CPU time and the process's peak resident memory during quantization (the loaded float model
included), then the row's stored bytes. It writes the weights the row really stores, dequantized to
float32 by the library's own code (see bench/scoring.materialize), for the parent process to score with
every other row on the same windows. One process per row also keeps one library's global patches from
reaching the next.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger("bench.peers.rows")


@dataclass(frozen=True)
class BuildContext:
    calib_samples: int
    calib_seq_len: int
    workdir: Path


@dataclass(frozen=True)
class Row:
    key: str
    library: str
    build: Callable  # (LoadedModel, BuildContext) -> (model with a float32 forward, row fields)


def vm_peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def reset_vm_peak() -> None:
    """Set the process's peak RSS (VmHWM) back to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def measured(fields: dict) -> Iterator[None]:
    """Wall time, CPU time and peak RSS of the block, into `fields`."""
    reset_vm_peak()
    wall, cpu = time.perf_counter(), cpu_seconds()
    yield
    fields.update(quantize_seconds=time.perf_counter() - wall, quantize_cpu_seconds=cpu_seconds() - cpu,
                  peak_mb=vm_peak_mb())


def modelpress_row(method: str, spec: str) -> Row:
    def build(loaded, ctx: BuildContext):
        from modelpress.algorithms.quantize import config_for_method
        from modelpress.api import CalibrationSettings, quantize_model
        from modelpress.eval.size import measure_size

        config = config_for_method(method, spec)
        calibration = CalibrationSettings(samples=ctx.calib_samples, seq_len=ctx.calib_seq_len)
        fields: dict = {}
        with measured(fields):
            report = quantize_model(loaded, config, calibration).to_json()
        size = measure_size(loaded.model)
        notes = []
        if "calibration" in report:
            c = report["calibration"]
            notes.append(f"calibration {c['samples']} x {c['seq_len']} tokens, disjoint from the eval windows")
        fallback = report.get("rtn_fallback_layers") or {}
        if fallback:
            notes.append(f"{len(fallback)} layers fell back to RTN")
        return loaded.model, {
            **fields, "method": method, "scheme": scheme.spec, "group": str(scheme.group_size),
            "bits_per_weight": size.bits_per_weight, "weight_bytes": size.weight_bytes,
            "quantized_weight_bytes": size.quantized_weight_bytes, "notes": notes,
            "eval_path": "PackedWeight.dequantize() once, float32 matmul",
        }

    return Row(f"modelpress/{method}/{spec}", "modelpress", build)


def peer_row(key: str, peer: str, *args) -> Row:
    def build(loaded, ctx: BuildContext):
        module = importlib.import_module(f"bench.peers.{peer}")  # quanto, hqq, bnb, torchao
        fields: dict = {}
        with measured(fields):
            model, info = module.quantize(loaded.model, *args)
        row = info.to_dict()
        return model, {
            **fields, "method": info.scheme, "scheme": info.scheme, "group": info.group_size,
            "bits_per_weight": info.bits_per_weight, "weight_bytes": info.weight_bytes,
            "quantized_weight_bytes": info.quantized_weight_bytes, "notes": row["notes"],
            "eval_path": info.eval_path, "version": info.version,
        }

    return Row(key, peer, build)


def llamacpp_row(quant_type: str, imatrix: bool) -> Row:
    def build(loaded, ctx: BuildContext):
        from bench.peers import llamacpp

        from modelpress.api import CalibrationSettings, calibration_windows

        hf_dir = hf_directory(loaded)
        workdir = ctx.workdir / "llama.cpp" / hf_dir.name
        workdir.mkdir(parents=True, exist_ok=True)
        matrix = None
        if imatrix:
            # one window more than --chunks: llama.cpp re-tokenizes the text and puts a BOS in each chunk
            ids = calibration_windows(loaded.tokenizer, CalibrationSettings(samples=ctx.calib_samples + 1,
                                                                            seq_len=ctx.calib_seq_len))
            text = "".join(loaded.tokenizer.decode(row) for row in ids.tolist())
            matrix = llamacpp.importance_matrix(llamacpp.float_gguf(hf_dir, workdir), text, ctx.calib_samples,
                                                ctx.calib_seq_len, workdir)
        model, info, extra = llamacpp.quantize(hf_dir, quant_type, workdir, matrix)
        row = info.to_dict()
        return model, {
            "quantize_seconds": info.seconds, "quantize_cpu_seconds": extra["cpu_seconds"], "peak_mb": extra["peak_mb"],
            "method": info.scheme, "scheme": info.scheme, "group": info.group_size,
            "bits_per_weight": info.bits_per_weight, "weight_bytes": info.weight_bytes,
            "quantized_weight_bytes": info.quantized_weight_bytes, "notes": row["notes"],
            "eval_path": info.eval_path, "version": info.version, "tensor_types": extra["tensor_types"],
        }

    return Row(f"llama.cpp/{quant_type}{'+imatrix' if imatrix else ''}", "llama.cpp", build)


def hf_directory(loaded) -> Path:
    """The Hugging Face directory of the float model (for the default GGUF: its dequantized cache)."""
    from modelpress.io.model import gguf_float_cache

    source = Path(loaded.source)
    if source.suffix == ".gguf":
        return gguf_float_cache(source)
    if (source / "config.json").exists():
        return source
    raise ValueError(f"llama.cpp rows need a local model directory or GGUF, not {loaded.source!r}")


# The default rows, 4-bit group-128 comparison first (a run cut short still has it).
ROWS = [
    modelpress_row("rtn", "int4/g128"),
    modelpress_row("rtn", "int4-asym/g128"),
    modelpress_row("gptq", "int4/g128"),
    modelpress_row("gptq", "int4-asym/g128"),
    modelpress_row("awq", "int4/g128"),
    modelpress_row("awq-gptq", "int4/g128"),
    peer_row("quanto/int4", "quanto", 4, None),
    peer_row("hqq/4/g128", "hqq", 4, 128),
    peer_row("bnb/nf4/b64", "bnb", "nf4", 64),
    peer_row("torchao/int4/g128", "torchao", 4, 128),
    llamacpp_row("Q4_K_M", False),
    llamacpp_row("Q4_K_M", True),
    llamacpp_row("Q4_K_S", False),
    llamacpp_row("Q4_K_S", True),
    llamacpp_row("Q4_0", False),
    llamacpp_row("Q4_0", True),
    modelpress_row("gptq", "int3/g128"),
    modelpress_row("gptq", "int3-asym/g128"),
    modelpress_row("awq-gptq", "int3-asym/g128"),
    peer_row("hqq/3/g128", "hqq", 3, 128),
    llamacpp_row("Q3_K_M", False),
    llamacpp_row("Q3_K_M", True),
]
# Rows that run only when named with --rows.
EXTRA_ROWS = [
    llamacpp_row("F32", False),  # sanity: the F32 GGUF read back must score KL ~ 0
    modelpress_row("awq", "int4-asym/g128"),
    modelpress_row("awq-gptq", "int4-asym/g128"),
    peer_row("torchao/8/channel", "torchao", 8, None),
]
ALL_ROWS = {row.key: row for row in ROWS + EXTRA_ROWS}


def stored_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model but the input embedding (never quantized here) and any tensor tied to it."""
    embedding = model.get_input_embeddings().weight
    tied = embedding.untyped_storage().data_ptr()
    return {name: t.detach().contiguous() for name, t in model.state_dict().items()
            if t.untyped_storage().data_ptr() != tied}


def build_main(argv=None) -> int:
    p = argparse.ArgumentParser(description="build one row of bench.peers in this process")
    p.add_argument("key", choices=sorted(ALL_ROWS))
    p.add_argument("--out", required=True, help="directory for row.json and weights.pt")
    p.add_argument("--model", default=None)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--workdir", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # quanto's int4 wants no_grad rather than inference_mode

    from bench.scoring import materialize

    from modelpress.io.model import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    row = ALL_ROWS[args.key]
    loaded = load_model(args.model)
    ctx = BuildContext(args.calib_samples, args.calib_seq_len, Path(args.workdir))
    model, fields = row.build(loaded, ctx)
    materialize(model)
    torch.save(stored_weights(model), out / "weights.pt")
    (out / "row.json").write_text(json.dumps({"key": row.key, "library": row.library, **fields}, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(build_main())
