"""Benchmark: GPTQ of a Llama-2-7B-shaped model on one GPU with the layer-by-layer engine: wall time and peak
GPU memory (issue 3 item 8).

The weights are RANDOM (normal, std 0.02) and so are the calibration tokens: this measures time and memory,
not quality. The model lives in host memory in bfloat16 (13.5 GB); the engine moves one decoder block at a
time to the GPU, with the calibration activations (128 x 512 tokens by default).

    PYTHONPATH=src python bench/gptq_gpu.py                        # 7B shape, 128 x 512 calibration, int4/g128
    PYTHONPATH=src python bench/gptq_gpu.py --tiny --device cpu    # the same code path on a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.quant_linear import QuantLinear

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}


def random_model(shape: str, device: str) -> LlamaForCausalLM:
    """A Llama model of the given shape in bfloat16 host memory, random weights drawn on `device` (fast)."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                values = torch.empty(param.shape, device=device, dtype=torch.bfloat16)
                param.copy_(values.normal_(0, 0.02, generator=generator).cpu())
    model.to(torch.bfloat16)
    for buffer_name, buffer in model.named_buffers():  # rotary inverse frequencies were left empty on meta
        if "inv_freq" in buffer_name:
            dim = buffer.shape[0] * 2
            base = getattr(config, "rope_theta", 10000.0)
            buffer.copy_(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--format", default="int4/g128", help="weight scheme spec")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "7b"
    cuda = args.device.startswith("cuda")

    start = time.perf_counter()
    model = random_model(shape, args.device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = quantize_gptq(model, GPTQConfig(scheme=WeightScheme.parse(args.format)), ids, device=args.device,
                           batch_size=args.batch_size)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None
    layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    rtn = len(report.rtn_fallbacks())
    result = {"shape": shape, "parameters": params, "format": args.format, "samples": args.samples,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "device": args.device,
              "gpu": torch.cuda.get_device_name() if cuda else None, "weights": "random normal(0, 0.02)",
              "build_s": round(build_s, 1), "quantize_s": round(seconds, 1),
              "peak_gpu_gb": None if peak is None else round(peak / 1e9, 2), "quantized_layers": layers,
              "rtn_fallback_layers": rtn, "torch": torch.__version__, "python": platform.python_version()}
    print(f"GPTQ {args.format} of a {shape} Llama ({params / 1e9:.2f} B params, random weights), "
          f"{args.samples} x {args.seq_len} calibration tokens on {result['gpu'] or args.device}:")
    print(f"  {seconds / 60:.2f} min, peak GPU memory {result['peak_gpu_gb']} GB, {layers} layers "
          f"({rtn} kept RTN as better on the layer objective)")
    out = args.json or (os.path.join(os.environ["OUT"], f"gptq_gpu_{shape}.json") if os.environ.get("OUT")
                        else f"bench/results/gptq_gpu_{shape}.json")
    Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
