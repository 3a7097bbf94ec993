"""Streaming and data-parallel calibration on the CPU (issue 15): figures for docs/distributed.md.

    python bench/distributed.py memory  [--depths 8 24] [--json OUT]   peak host RSS of GPTQ, plain vs streamed
    python bench/distributed.py memory --shape 70b --depths 2 4 --device cuda [--samples 128 --seq-len 512]
                                      the same, streamed only, on random bf16 checkpoints of a real shape, with
                                      the solver on the GPU: peak host RSS, peak GPU memory, seconds per block
    python bench/distributed.py scaling [--ranks 1 2] [--json OUT]     wall time of `modelpress quantize --method
                                                                       gptq` with 1 process and under torchrun
    python bench/distributed.py save --shape 7b|70b [--layers N] --out DIR
                                      a random bf16 checkpoint of that shape (sharded safetensors + a byte
                                      tokenizer) for the multi-GPU runs in docs/distributed.md

Models are Llama-shaped, random, built from a config (no downloads). Memory is the kernel's peak resident
set (VmHWM, reset through /proc/self/clear_refs after imports) of a child process, with glibc's mmap threshold
pinned (MALLOC_MMAP_THRESHOLD_=65536) so freed multi-MB tensors are returned as 100+ MB tensors always are.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=320, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2,
             head_dim=64, max_position_embeddings=256, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def save_model(path: Path, layers: int, shape: dict = SHAPE) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=layers)).eval()
    model.save_pretrained(path)
    return {"layers": layers, "block_bytes": sum(p.numel() * 4 for p in model.model.layers[0].parameters()),
            "model_bytes": sum(p.numel() * 4 for p in model.parameters())}


BIG = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000),
       "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=32000)}


def save_big(shape: str, layers: int | None, out: Path) -> dict:
    """Random (std 0.02) bf16 weights of a Llama shape, saved in 2 GB shards; `layers` cuts the depth."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**BIG[shape], "max_position_embeddings": 4096, "architectures": ["LlamaForCausalLM"]}
    if layers:
        fields["num_hidden_layers"] = layers
    torch.manual_seed(0)
    config = LlamaConfig(**fields)
    config.initializer_range = 0.02
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="2GB")
    _char_tokenizer(out)
    return {"layers": config.num_hidden_layers,
            "block_bytes": sum(p.numel() * 4 for p in model.model.layers[0].parameters()),
            "model_bytes": sum(p.numel() * 4 for p in model.parameters())}


def child_env(threads: int = 1) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "65536"}


def memory(depths: list[int], shape: str = "small", device: str = "cpu", samples: int = 8,
           seq_len: int = 128) -> list[dict]:
    """Peak host RSS growth of GPTQ int4/g128 per depth: streamed (and, for the small shape's deepest model,
    loaded whole). Big shapes are random bf16 checkpoints (save_big), streamed only."""
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for layers in depths:
            path = Path(tmp) / f"m{layers}"
            if shape == "small":
                info = save_model(path, layers)
            else:
                clock = time.perf_counter()
                info = {"shape": shape, **save_big(shape, layers, path),
                        "save_seconds": round(time.perf_counter() - clock, 1)}
            modes = ("streamed", "plain") if shape == "small" and layers == max(depths) else ("streamed",)
            for mode in modes:
                done = subprocess.run([sys.executable, __file__, "_child", mode, str(path), str(Path(tmp) / f"w{layers}{mode}"),
                                       device, str(samples), str(seq_len)], env=child_env(1 if device == "cpu" else 8),
                                      capture_output=True,
                                      text=True)
                if done.returncode:
                    raise SystemExit(f"child failed ({mode}, {layers} blocks):\n{done.stderr[-4000:]}")
                rows.append({**info, "device": device, "samples": samples, "seq_len": seq_len,
                             **json.loads(done.stdout.strip().splitlines()[-1])})
                print(json.dumps(rows[-1]), flush=True)
            if shape != "small":
                shutil.rmtree(path)
    return rows


def _child(mode: str, model_dir: str, work: str, device: str = "cpu", samples: str = "8", seq_len: str = "128") -> None:
    import torch

    from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
    from modelpress.engine.stream import open_streamed
    from modelpress.io.model import load_hf

    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    from transformers import LlamaConfig, LlamaForCausalLM

    ids = torch.randint(0, 256, (int(samples), int(seq_len)), generator=torch.Generator().manual_seed(1))
    warm = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "hidden_size": 64, "intermediate_size": 128, "head_dim": 8,
                                           "num_hidden_layers": 1})).eval()
    quantize_gptq(warm, GPTQConfig("int4/g32"), ids[:2, :16], device=device, batch_size=2)   # imports, thread pools, CUDA context
    del warm
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")
    start, clock = status("VmRSS:"), time.perf_counter()
    model = load_hf(model_dir).model if mode == "plain" else open_streamed(model_dir, work)
    # the small shape skips the scale search to keep the CPU run short; real shapes run GPTQ's defaults
    config = GPTQConfig("int4/g128", shrink_steps=1) if int(seq_len) <= 128 else GPTQConfig("int4/g128")
    quantize_gptq(model, config, ids, device=device, batch_size=8)
    row = {"mode": mode, "peak_growth_bytes": status("VmHWM:") - start, "seconds": round(time.perf_counter() - clock, 1)}
    if device != "cpu":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        row["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(row))


def scaling(ranks: list[int], layers: int, samples: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m"
        save_model(model, layers)
        from modelpress.io.text import default_corpus
        (Path(tmp) / "text.txt").write_text(default_corpus()[:200_000])
        _char_tokenizer(model)
        for n in ranks:
            argv = ["quantize", str(model), "--method", "gptq", "--format", "int4", "--group-size", "128",
                    "--calib-text", str(Path(tmp) / "text.txt"), "--calib-samples", str(samples),
                    "--calib-seq-len", "128", "--calib-batch-size", "4", "--out", str(Path(tmp) / f"out{n}")]
            launch = [sys.executable, "-m", "modelpress"] if n == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
                str(_free_port()), "-m", "modelpress"]
            clock = time.perf_counter()
            subprocess.run([*launch, *argv], env=child_env(), check=True, capture_output=True)
            rows.append({"ranks": n, "layers": layers, "samples": samples, "seconds": round(time.perf_counter() - clock, 1),
                         "load_average": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _char_tokenizer(path: Path) -> None:
    """A byte-level tokenizer the CLI can cut calibration text with (ids < 256 fit the 320-token vocabulary)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    if sys.argv[1] == "_child":
        _child(*sys.argv[2:8])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("memory", "scaling", "save"))
    parser.add_argument("--shape", choices=["small", *sorted(BIG)], default=None,
                        help="save: 7b (default) or 70b; memory: small (default), 7b or 70b")
    parser.add_argument("--device", default="cpu", help="memory: where the blocks are calibrated (cpu, cuda)")
    parser.add_argument("--seq-len", type=int, default=None, help="memory: calibration window length")
    parser.add_argument("--out", default=None)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (scaling: 32; memory on a "
                        "real shape: 128; the small shape always 8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.what == "save":
        save_big(args.shape or "7b", args.layers, Path(args.out))
        return
    if args.what == "memory":
        big = (args.shape or "small") != "small"
        rows = memory(args.depths, args.shape or "small", args.device, (args.samples or 128) if big else 8,
                      args.seq_len or (512 if big else 128))
    else:
        rows = scaling(args.ranks, args.layers or 8, args.samples or 32)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
