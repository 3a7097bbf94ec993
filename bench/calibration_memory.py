"""`modelpress estimate --calibrate` against the device memory a calibrated run really takes.

Models are built from configs with random weights (memory does not depend on the values) in float32, as
`modelpress quantize` loads them, with a few blocks (the peak is one block's); each run is the engine's
(engine/runner.py). On CUDA the peak is torch.cuda.max_memory_allocated above what was allocated before the
run. On the CPU (`--device cpu`) each row runs in its own process, first on two windows of 16 tokens (so the
libraries' code is resident); the peak is the resident high-water mark (VmHWM, reset through
/proc/self/clear_refs) above the resident memory just before the real run. The host is then the calibration
device, so the block and the modules outside the blocks are not copied: the figure compared is the estimate's
device total less one block and, for the capture phase, less the modules outside. Each CPU row is the median
of three processes. Printed per row: the estimate's parts, the estimate in all, the measured peak and their
ratio.

    PYTHONPATH=src python bench/calibration_memory.py --json bench/results/calibration_memory_h100.json
    PYTHONPATH=src python bench/calibration_memory.py --device cpu --json bench/results/calibration_memory_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import transformers

from modelpress.algorithms.prune.calibrated import SparseGPTPruner
from modelpress.algorithms.prune.sparsegpt import SparseGPTConfig
from modelpress.algorithms.quantize.awq import AWQ, AWQConfig
from modelpress.algorithms.quantize.gptq import GPTQ, GPTQConfig
from modelpress.engine.blocks import find_blocks
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.estimate import ModelShapes, block_layout, estimate_calibration
from modelpress.formats.scheme import WeightScheme

MODELS = {   # name -> (config class, fields); depth cut to a few blocks
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    "llama2-7b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=32000)),
    "qwen2-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2-1.5b": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
}
# (model, method, float target, offload, samples, seq_len)
ROWS = [
    ("smollm2-135m", "gptq", True, False, 128, 512),
    ("qwen2-1.5b", "gptq", True, False, 128, 512),
    ("qwen2-1.5b", "gptq", False, False, 128, 512),
    ("llama2-7b", "gptq", True, False, 128, 512),
    ("llama2-7b", "gptq", True, True, 128, 512),
    ("llama2-7b", "gptq", False, False, 128, 512),
    ("llama2-7b", "gptq", True, False, 64, 2048),
    ("llama2-7b", "gptq", True, True, 64, 2048),
    ("llama2-7b", "awq", False, False, 128, 512),
    ("llama2-7b", "sparsegpt", False, False, 128, 512),
]
CPU_ROWS = [   # what two cores calibrate in 1-4 minutes a process (a 1.5B-shaped row took over 8)
    ("smollm2-135m", "gptq", True, False, 128, 512),
    ("smollm2-135m", "gptq", False, False, 128, 512),
    ("smollm2-135m", "awq", False, False, 128, 512),
    ("smollm2-135m", "sparsegpt", False, False, 128, 512),
    ("qwen2-0.5b", "gptq", True, False, 64, 512),
    ("qwen2-0.5b", "gptq", False, False, 64, 512),
]


def build(name: str, layers: int) -> tuple[Callable[[], torch.nn.Module], object]:
    """(a function making the model of `name` cut to `layers` blocks, its config)."""
    cls_name, fields = MODELS[name]
    config = getattr(transformers, cls_name)(num_hidden_layers=layers, **fields)
    make = lambda: transformers.AutoModelForCausalLM.from_config(config)   # noqa: E731
    return make, config


def algorithm(method: str, float_target: bool, model):
    scheme = WeightScheme.parse("int4/g128")
    stack = find_blocks(model)
    if method == "gptq":
        return GPTQ(GPTQConfig(scheme, float_target=float_target), stack=stack)
    if method == "awq":
        return AWQ(AWQConfig(scheme), stack=stack)
    return SparseGPTPruner(stack, 0.5, None, compress=False, config=SparseGPTConfig(sparsity=0.5, compress=False))


def resident_bytes(field: str = "VmRSS:") -> int:
    """The process's resident memory (VmRSS) or its high-water mark (VmHWM), in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(row: tuple, device: torch.device, layers: int, batch_size: int) -> dict:
    name, method, float_target, offload, samples, seq_len = row
    make, config = build(name, layers)
    torch.manual_seed(0)
    model = make().float().eval()
    shapes = ModelShapes(sum(p.numel() for p in model.parameters()), block=block_layout(make),
                         blocks=len(find_blocks(model)))
    est = estimate_calibration(shapes, method, samples, seq_len, batch_size, float_target, offload)
    compared = est.device_bytes
    if device.type == "cpu":   # nothing is copied to the device: the block and the outside modules stay put
        in_place = dataclasses.replace(est, outside_bytes=0,
                                       block_bytes=est.block_bytes - shapes.block.parameters * est.element_size)
        compared = in_place.device_bytes
    ids = torch.randint(0, config.vocab_size, (samples, seq_len))
    if device.type == "cpu":   # touch every code path once on a few tokens: the libraries' pages enter the RSS
        warm = make().float().eval()
        run_sequential(warm, algorithm(method, float_target, warm), ids[:2, :16], device,
                       settings=EngineSettings(batch_size=batch_size), offload=offload)
        del warm
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:   # the high-water mark restarts here (the warm-up and the model's construction are not counted)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        base = resident_bytes()
    start = time.perf_counter()
    run_sequential(model, algorithm(method, float_target, model), ids, device,
                   settings=EngineSettings(batch_size=batch_size), offload=offload)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resident_bytes("VmHWM:") - base
    return {"model": name, "method": method, "float_target": est.float_target, "offload": offload,
            "samples": samples, "seq_len": seq_len, "estimate": est.to_dict(), "compared_bytes": compared,
            "measured_bytes": peak, "ratio": compared / peak, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="CPU: processes per row (the median is reported)")
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)   # one CPU row, in its own process
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = ROWS if device.type == "cuda" else CPU_ROWS
    if args.row is not None:
        print(json.dumps(measure(rows[args.row], device, args.layers, args.batch_size)))
        return
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}, transformers {transformers.__version__}")
    header = ("model", "method", "ft", "offload", "windows", "block", "hidden", "stats", "solve", "act",
              "estimate", "measured", "est/meas", "s")
    print(" | ".join(header))
    results = []
    for index, row in enumerate(rows):
        if device.type == "cuda":
            found = measure(row, device, args.layers, args.batch_size)
        else:   # resident memory drifts from run to run: the median of --repeat processes
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, __file__, "--device", "cpu", "--layers", str(args.layers),
                                      "--batch-size", str(args.batch_size), "--row", str(index)],
                                     check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            runs.sort(key=lambda r: r["measured_bytes"])
            found = {**runs[len(runs) // 2], "measured_runs": [r["measured_bytes"] for r in runs]}
        results.append(found)
        est = found["estimate"]
        gb = lambda b: f"{b / 1e9:.2f}"   # noqa: E731
        print(" | ".join([found["model"], found["method"], "y" if found["float_target"] else "n",
                          "y" if found["offload"] else "n", f"{found['samples']}x{found['seq_len']}",
                          gb(est["block_bytes"]), gb(est["hidden_bytes"]), gb(est["statistics_bytes"]),
                          gb(est["solve_bytes"]), gb(est["activation_bytes"]), gb(found["compared_bytes"]),
                          gb(found["measured_bytes"]), f"{found['ratio']:.2f}", f"{found['seconds']:.1f}"]),
              flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": where, "torch": torch.__version__, "rows": results}, handle, indent=1)


if __name__ == "__main__":
    main()
