"""Benchmark: modelpress's GGUF k-quant encoders (export/kquants.py) against llama.cpp's, tensor by tensor.

For each tensor and type, both encoders quantize the same float32 weight; both results are decoded with
gguf-py's reference dequantizer and compared with the float weight:
- rmse: plain root-mean-square error (llama.cpp's encoder without an importance matrix)
- imatrix rmse: sqrt(mean(importance_k · (w − ŵ)²)), both encoders given the same per-column importance
  (llama.cpp's imatrix path, quantize_row_*_impl). The importance is a random log-normal vector here; a
  calibrated one plays the same role.
llama.cpp runs through `ggml_quantize_chunk` of its libggml-base (what `llama-quantize --pure` calls for
every tensor), loaded with ctypes from LLAMA_CPP_BIN (default: the vendored llama-cpp-python build);
`--check-llama-quantize` first confirms that the `llama-quantize --pure` binary writes the same bytes for a
one-tensor F32 GGUF (it does for Q4_K, Q5_K and Q6_K).

Tensors: Gaussian and Student-t (ν=3, heavy tails) 256 × 4096, and three ffn_down matrices (576 × 1536,
the default model's only k-quant-eligible shape) read from the default model's GGUF. Last, the time to
encode all 30 of those layers to Q4_K.

    .venv/bin/python bench/kquants.py                       # prints a table, writes bench/results/kquants.json
    .venv/bin/python bench/kquants.py --check-llama-quantize --types Q4_K
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from modelpress.export.kquants import KQUANTS, dequantize_kquant, kquant_codes, kquant_grid, pack_kquant

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BIN = "/tmp/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"


def llama_quantizer():
    """ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix) from llama.cpp's ggml."""
    lib = ctypes.CDLL(str(Path(os.environ.get("LLAMA_CPP_BIN", DEFAULT_BIN)) / "libggml-base.so"))
    function = lib.ggml_quantize_chunk
    function.restype = ctypes.c_size_t
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p]

    def quantize(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None) -> np.ndarray:
        ggml_type = gguf.GGMLQuantizationType[qtype]
        src = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        dst = np.zeros((src.shape[0], src.shape[1] // block_weights * block_bytes), np.uint8)
        imatrix = None if importance is None else np.ascontiguousarray(importance.numpy(), np.float32)
        function(int(ggml_type), src.ctypes.data, dst.ctypes.data, 0, src.shape[0], src.shape[1],
                 None if imatrix is None else imatrix.ctypes.data)
        return dst

    return quantize


def llama_quantize_matches(qtype: str, folder: Path) -> bool:
    """Does `llama-quantize --pure` write the bytes that ggml_quantize_chunk gives, for one tensor?"""
    weight = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2))
    source, target = folder / "one-f32.gguf", folder / f"one-{qtype}.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")   # the hyperparameters the quantize tool insists on
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(1024)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(32)
    writer.add_tensor("blk.0.ffn_down.weight", weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tool = Path(os.environ.get("LLAMA_CPP_BIN", DEFAULT_BIN)) / "llama-quantize"
    subprocess.run([str(tool), "--pure", str(source), str(target), qtype, "1"], check=True, capture_output=True)
    written = np.array(gguf.GGUFReader(target).tensors[0].data).reshape(256, -1)
    return bool(np.array_equal(written, llama_quantizer()(weight, qtype, None)))


def ours(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None) -> np.ndarray:
    grid = kquant_grid(weight, qtype, importance)
    return pack_kquant(kquant_codes(weight, grid), grid)


def decoded(data: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]))


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"gaussian 256x4096": torch.randn(256, 4096, generator=g),
           "student-t3 256x4096": torch.distributions.StudentT(3.0).sample((256, 4096)) * 0.02}
    for layer, weight in default_ffn_down(layers=(0, 15, 29)).items():
        out[f"default {layer} 576x1536"] = weight
    return out


def default_ffn_down(layers=None) -> dict[str, torch.Tensor]:
    from modelpress.io.model import default_gguf_path

    reader = gguf.GGUFReader(default_gguf_path())
    found = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[-2:] == ["ffn_down", "weight"] and (layers is None or int(parts[1]) in layers):
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            found[f"blk.{parts[1]}.ffn_down"] = torch.from_numpy(np.array(values, dtype=np.float32))
    return found


def compare(weight: torch.Tensor, qtype: str, importance: torch.Tensor, llama) -> dict:
    row = {}
    for label, imp in (("rmse", None), ("imatrix_rmse", importance)):
        scale = torch.ones_like(importance) if imp is None else imp
        for who, encode in (("ours", ours), ("llama", llama)):
            start = time.process_time()
            data = encode(weight, qtype, imp)
            row[f"{who}_seconds" if imp is None else f"{who}_imatrix_seconds"] = time.process_time() - start
            row[f"{who}_{label}"] = ((decoded(data, qtype) - weight).pow(2) * scale).mean().sqrt().item()
        row[f"{label}_ratio"] = row[f"ours_{label}"] / row[f"llama_{label}"]
    return row


def encode_time_all_layers(qtype: str) -> dict:
    weights = default_ffn_down()
    start, cpu = time.perf_counter(), time.process_time()
    for weight in weights.values():
        grid = kquant_grid(weight, qtype)
        dequantize_kquant(grid, kquant_codes(weight, grid))
    return {"qtype": qtype, "layers": len(weights), "weights": sum(w.numel() for w in weights.values()),
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=list(KQUANTS))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "kquants.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-llama-quantize", action="store_true")
    args = parser.parse_args()
    if args.check_llama_quantize:
        with tempfile.TemporaryDirectory() as folder:
            for qtype in args.types:
                print(f"llama-quantize --pure {qtype} == ggml_quantize_chunk: "
                      f"{llama_quantize_matches(qtype, Path(folder))}")
    llama = llama_quantizer()
    rows = []
    for name, weight in tensors(args.seed).items():
        importance = torch.exp(1.5 * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1)))
        for qtype in args.types:
            row = {"tensor": name, "qtype": qtype, **compare(weight, qtype, importance, llama)}
            rows.append(row)
            print(f"{name:24s} {qtype}  rmse ours/llama {row['rmse_ratio']:.3f}  "
                  f"imatrix ours/llama {row['imatrix_rmse_ratio']:.3f}  "
                  f"({row['ours_rmse']:.4g} vs {row['llama_rmse']:.4g}; {row['ours_seconds']:.2f} s vs "
                  f"{row['llama_seconds']:.2f} s cpu)", flush=True)
    timing = encode_time_all_layers("Q4_K")
    print(f"all {timing['layers']} k-quant-eligible default-model layers to Q4_K: {timing['seconds']:.2f} s "
          f"({timing['cpu_seconds']:.2f} s cpu, {timing['torch_threads']} torch threads)")
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "gguf": gguf.__version__ if hasattr(gguf, "__version__") else None, "rows": rows,
              "default_model_q4_k": timing}
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
