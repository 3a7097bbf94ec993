"""llama.cpp as the judge of our GGUF files: its logits, perplexity and KL divergence, from its own tools.

The tools are built by scripts/install_llamacpp.sh into $MODELPRESS_LLAMA_CPP (default
$MODELPRESS_CACHE/llama.cpp, i.e. ~/.cache/modelpress/llama.cpp): `bin/llama-perplexity`, `bin/llama-quantize`,
`bin/llama-imatrix` from llama.cpp's sources, and `bin/modelpress-logits` (scripts/llamacpp/logits.cpp), a
40-line program on llama.cpp's public C API that writes a model's logits for given token windows.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from modelpress.errors import ModelpressError
from modelpress.io.model import cache_dir


def install_dir() -> Path:
    return Path(os.environ.get("MODELPRESS_LLAMA_CPP", cache_dir() / "llama.cpp"))


def tool(name: str) -> Path:
    path = install_dir() / "bin" / name
    if not path.exists():
        raise ModelpressError(f"llama.cpp tool {path} not found: run `bash scripts/install_llamacpp.sh` "
                              "(or set MODELPRESS_LLAMA_CPP to a folder holding bin/)")
    return path


def available() -> bool:
    return all((install_dir() / "bin" / name).exists() for name in ("modelpress-logits", "llama-perplexity"))


def run(command: list, timeout: float = 1800) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ModelpressError(f"{Path(str(command[0])).name} failed ({result.returncode}): {tail}")
    return result.stdout + result.stderr


def logits(gguf: str | Path, windows: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """(W, T, V) float32 logits llama.cpp computes for each window of token ids (W, T)."""
    count, length = windows.shape
    with tempfile.TemporaryDirectory(prefix="modelpress-llamacpp-") as tmp:
        tokens = Path(tmp) / "tokens.i32"
        out = Path(tmp) / "logits.f32"
        windows.to(torch.int32).numpy().tofile(tokens)
        run([tool("modelpress-logits"), gguf, tokens, count, length, threads or os.cpu_count() or 1, out])
        values = np.fromfile(out, dtype=np.float32)
    return torch.from_numpy(values).reshape(count, length, -1)


def perplexity(gguf: str | Path, text: str | Path, seq_len: int, chunks: int, threads: int | None = None) -> float:
    """llama-perplexity's final estimate on a text file: `chunks` windows of `seq_len` tokens of its own
    tokenization, the first token of each replaced by BOS when the GGUF's tokenizer adds one, the second
    half of every window scored."""
    output = run([tool("llama-perplexity"), "-m", gguf, "-f", text, "-c", seq_len, "--chunks", chunks,
                  "-t", threads or os.cpu_count() or 1])
    found = re.search(r"Final estimate: PPL = ([\d.]+)", output)
    if found is None:
        raise ModelpressError(f"llama-perplexity printed no final estimate for {gguf}: {output.strip()[-300:]}")
    return float(found.group(1))


def decode(gguf: str | Path, prompt: torch.Tensor, new_tokens: int, threads: int) -> tuple[float, float, list[int]]:
    """llama.cpp's batch-1 greedy decode of a GGUF (modelpress-decode): (prefill seconds for the prompt, seconds
    per decoded token after the first, the greedy tokens). For speed comparisons on the same thread count."""
    with tempfile.TemporaryDirectory(prefix="modelpress-llamacpp-") as tmp:
        tokens = Path(tmp) / "prompt.i32"
        prompt.reshape(-1).to(torch.int32).numpy().tofile(tokens)
        output = run([tool("modelpress-decode"), gguf, tokens, prompt.numel(), new_tokens, threads])
    found = re.search(r"^([\d.]+) ([\d.]+)((?: \d+)*)$", output, re.MULTILINE)   # its one line on stdout
    if found is None:
        raise ModelpressError(f"modelpress-decode printed no timings for {gguf}: {output.strip()[-300:]}")
    return float(found.group(1)), float(found.group(2)), [int(t) for t in found.group(3).split()]
