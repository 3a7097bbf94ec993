"""llama.cpp quantization (k-quants and legacy block formats, optionally with an importance matrix) as a
peer for the benchmarks, through llama.cpp's own tools.

The float model is written once as an F32 GGUF by llama.cpp's `convert_hf_to_gguf.py`; `llama-quantize`
turns it into the asked type with `--token-embedding-type f32 --output-tensor-type f32`, so the embedding
(and the head it is tied to) stays float like every other row's; `llama-imatrix` over the calibration text
gives the importance matrix for the `+imatrix` rows. Bits per weight are the GGUF's own tensor sizes over
the linear layers. k-quants work on super-blocks of 256 along K: a layer whose K is not a multiple of 256
(K=576 in SmolLM2) silently falls back to a legacy type (q4_K -> q5_0, q6_K -> q8_0, q3_K -> q4_0 ...),
so `tensor_types` reports the real mix. For scoring, transformers reads the quantized GGUF back
(`gguf_file=`, dequantizing every tensor with gguf-py's reference code) into a float32 model.

Tools: LLAMA_CPP_DIR (a llama.cpp source tree, for the convert script) and LLAMA_CPP_BIN (its build/bin
with llama-quantize and llama-imatrix). Build them from the llama-cpp-python sdist:
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build -j2 --target llama-quantize llama-imatrix llama-perplexity
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.peers.common import PeerInfo, package_version
from torch import nn

LIBRARY = "llama.cpp"
DEFAULT_DIR = "/tmp/peers/llama_cpp_python-0.3.36/vendor/llama.cpp"
VENDOR_VERSION = "llama-cpp-python 0.3.36 (vendored llama.cpp)"
LINEAR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
DEFAULT_SCHEMES = (("Q4_K_M", False), ("Q4_K_M", True), ("Q4_K_S", False), ("Q4_K_S", True),
                   ("Q4_0", False), ("Q4_0", True), ("Q3_K_M", False), ("Q3_K_M", True))


def source_dir() -> Path:
    return Path(os.environ.get("LLAMA_CPP_DIR", DEFAULT_DIR))


def tool(name: str) -> Path:
    path = Path(os.environ.get("LLAMA_CPP_BIN", source_dir() / "build" / "bin")) / name
    if not path.exists():
        raise ImportError(f"{path} not found; build llama.cpp's tools (see bench/peers/llamacpp.py) "
                          "or set LLAMA_CPP_BIN")
    return path


def available() -> str:
    tool("llama-quantize")
    tool("llama-imatrix")
    if not (source_dir() / "convert_hf_to_gguf.py").exists():
        raise ImportError(f"no convert_hf_to_gguf.py in {source_dir()}; set LLAMA_CPP_DIR")
    return f"{VENDOR_VERSION}, gguf {package_version('gguf')}"


@dataclass(frozen=True)
class ToolRun:
    seconds: float
    cpu_seconds: float   # user + system time of the tool process
    peak_mb: float       # the tool process's own peak resident memory


def run_tool(command: list[str], log_path: Path) -> ToolRun:
    """Run one llama.cpp tool; its output goes to log_path. Raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
        raise RuntimeError(f"{Path(command[0]).name} exited with {process.returncode}: {tail}")
    return ToolRun(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def cached(path: Path, make) -> tuple[Path, dict]:
    """`path`, made once by `make(path) -> dict` (its record kept beside it as JSON)."""
    record = path.with_suffix(".json")
    if path.exists() and record.exists():
        return path, json.loads(record.read_text())
    info = make(path)
    record.write_text(json.dumps(info))
    return path, info


def float_gguf(hf_dir: Path, workdir: Path) -> Path:
    def make(path: Path) -> dict:
        run = run_tool([sys.executable, source_dir() / "convert_hf_to_gguf.py", hf_dir, "--outtype", "f32",
                        "--outfile", path], workdir / "convert.log")
        return {"seconds": run.seconds, "peak_mb": run.peak_mb, "source": str(hf_dir)}

    return cached(workdir / "float-f32.gguf", make)[0]


def importance_matrix(f32: Path, calibration_text: str, chunks: int, seq_len: int, workdir: Path) -> tuple[Path, dict]:
    def make(path: Path) -> dict:
        text = workdir / f"calibration-{chunks}x{seq_len}.txt"
        text.write_text(calibration_text)
        run = run_tool([tool("llama-imatrix"), "-m", f32, "-f", text, "-c", str(seq_len), "--chunks", str(chunks),
                        "-o", path, "-t", str(os.cpu_count() or 1)], workdir / "imatrix.log")
        found = re.search(r"computing over (\d+) chunks", (workdir / "imatrix.log").read_text(errors="replace"))
        return {"seconds": run.seconds, "cpu_seconds": run.cpu_seconds, "peak_mb": run.peak_mb,
                "chunks": int(found.group(1)) if found else None,
                "seq_len": seq_len}

    return cached(workdir / f"imatrix-{chunks}x{seq_len}.gguf", make)


def tensor_mix(path: Path) -> dict:
    """Per GGUF type, the linear layers' weights and bytes; plus all tensors' bytes."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    mix: dict[str, Counter] = {}
    total = 0
    for t in reader.tensors:
        total += int(t.n_bytes)
        if LINEAR.match(t.name):
            entry = mix.setdefault(t.tensor_type.name, Counter())
            entry.update(tensors=1, parameters=int(t.n_elements), bytes=int(t.n_bytes))
    return {"types": {k: dict(v) for k, v in sorted(mix.items())}, "total_bytes": total}


def quantize(hf_dir: Path, quant_type: str, workdir: Path, imatrix: tuple[Path, dict] | None = None
             ) -> tuple[nn.Module, PeerInfo, dict]:
    """Quantize the float model in `hf_dir` to `quant_type`; returns the GGUF read back as a float32 model,
    what it stores, and the per-type tensor mix of its linear layers."""
    from modelpress.io.model import read_gguf_with_transformers

    workdir.mkdir(parents=True, exist_ok=True)
    f32 = float_gguf(hf_dir, workdir)
    name = f"{quant_type}{'-imatrix' if imatrix else ''}"
    out = workdir / f"{name}.gguf"
    command = [tool("llama-quantize"), "--token-embedding-type", "f32", "--output-tensor-type", "f32"]
    if imatrix:
        command += ["--imatrix", imatrix[0]]
    run = run_tool(command + [f32, out, quant_type, str(os.cpu_count() or 1)], workdir / f"{name}.log")
    mix = tensor_mix(out)
    parameters = sum(v["parameters"] for v in mix["types"].values())
    stored = sum(v["bytes"] for v in mix["types"].values())
    model, _ = read_gguf_with_transformers(out)
    seconds = run.seconds + (imatrix[1]["seconds"] if imatrix else 0.0)
    shares = ", ".join(f"{k} {100 * v['parameters'] / parameters:.0f}%" for k, v in mix["types"].items())
    notes = [f"linear weights by type: {shares}",
             "token embedding (tied head) kept f32 by --token-embedding-type/--output-tensor-type f32",
             f"peak MB is the llama.cpp tool's own process (llama-quantize {run.peak_mb:.0f} MB)"]
    if imatrix:
        notes.append(f"imatrix from {imatrix[1]['chunks']} x {imatrix[1]['seq_len']} calibration tokens: "
                     f"{imatrix[1]['seconds']:.1f} s (in quant s), {imatrix[1]['peak_mb']:.0f} MB")
    info = PeerInfo(
        library=LIBRARY,
        version=f"{VENDOR_VERSION}, gguf {package_version('gguf')}",
        scheme=f"{quant_type}{' + imatrix' if imatrix else ''}",
        bits=float(re.search(r"[QF](\d+)", quant_type).group(1)),
        group_size="256 super-blocks (k-quants) / 32 (legacy)",
        quantized_layers=sum(v["tensors"] for v in mix["types"].values()),
        quantized_parameters=parameters,
        quantized_weight_bytes=stored,
        weight_bytes=mix["total_bytes"],
        seconds=seconds,
        eval_path="GGUF read back by transformers (gguf-py dequantization) into float32, float32 matmul",
        notes=tuple(notes),
    )
    return model, info, {"tensor_types": mix["types"],
                         "cpu_seconds": run.cpu_seconds + (imatrix[1]["cpu_seconds"] if imatrix else 0.0),
                         "peak_mb": max(run.peak_mb, imatrix[1]["peak_mb"] if imatrix else 0.0)}
