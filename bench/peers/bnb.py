"""bitsandbytes as a peer for the benchmarks: NF4/FP4 (`Linear4bit`) and LLM.int8 (`Linear8bitLt`), on CPU.

4-bit: blocks of `group_size` (default 64) consecutive weights of the flattened matrix share one absmax;
with `double_quant=True` (bitsandbytes' `compress_statistics`, on by default in `Linear4bit`) the absmax
values are themselves quantized to 8 bits in blocks of 256 with a float32 scale each plus one offset.
Bytes counted: packed codes + every tensor of `quant_state.as_dict(packed=True)` (what bitsandbytes
serializes: absmax, nested absmax, the 16- and 256-entry code tables, offset, a small packed header).
Evaluation multiplies float32 activations with `dequantize_4bit` of the stored weight, which is what
`Linear4bit.forward` does on CPU (outputs identical in a check on a 1536x576 layer).

int8: `Linear8bitLt(has_fp16_weights=False, threshold=6.0)`, the transformers default: weights int8 per
output row (absmax) with a float32 scale per row; its forward also casts activations to fp16 and
quantizes them per token to int8, keeping columns with |x| > threshold in fp16 (W8A8 with outliers),
so its quality is not a weight-only number.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from bench.peers.common import (
    DequantizedLinear,
    PeerInfo,
    nested_tensors,
    package_version,
    plan_layers,
    swap_layers,
    tensor_bytes,
)
from torch import nn

LIBRARY = "bitsandbytes"
# LLM.int8 (bits=8) runs too, but its forward is W8A8 and slow on this CPU: not a default row.
DEFAULT_SCHEMES = (("nf4", 64),)


def available() -> str:
    import bitsandbytes  # noqa: F401

    return package_version(LIBRARY)


def quantize(model: nn.Module, bits: int | str, group_size: int | None = 64, double_quant: bool = True,
             threshold: float = 6.0) -> tuple[nn.Module, PeerInfo]:
    """`bits`: "nf4", "fp4" (4-bit codebooks) or 8 / "int8" (LLM.int8). Quantizes in place."""
    kind = str(bits).lower()
    if kind in ("nf4", "fp4"):
        return _quantize_4bit(model, kind, group_size or 64, double_quant)
    if kind in ("8", "int8"):
        return _quantize_int8(model, threshold)
    raise ValueError(f"bitsandbytes peer takes bits 'nf4', 'fp4' or 8, not {bits!r}")


def _quantize_4bit(model: nn.Module, quant_type: str, blocksize: int, double_quant: bool):
    import bitsandbytes as bnb

    plan = plan_layers(model)
    start = time.perf_counter()
    done = {}
    with torch.no_grad():
        for name, module in plan.layers.items():
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=double_quant,
                                      quant_type=quant_type)
            layer.weight.blocksize = blocksize
            layer.load_state_dict(module.state_dict())
            layer = layer.to("cpu")  # quantizes the weight
            done[name] = layer
            swap_layers(model, {name: layer})
    seconds = time.perf_counter() - start
    stored = 0
    for layer in done.values():
        state = layer.weight.quant_state.as_dict(packed=True)
        stored += tensor_bytes([layer.weight.data, *nested_tensors(state)])
    swap_layers(model, {
        name: DequantizedLinear(layer, partial(_dequantize_4bit, layer), layer.bias, layer.in_features,
                                layer.out_features)
        for name, layer in done.items()
    })
    first = next(iter(done.values())).weight.quant_state
    notes = [f"absmax {'double-quantized to 8 bits (blocks of 256, float32 scale + offset)' if double_quant else 'float32'}",
             "blocks run over the flattened weight (row ends ignored)",
             f"code tables and header counted per layer ({first.code.numel()} + nested entries)"]
    return model, PeerInfo(
        library=LIBRARY,
        version=package_version(LIBRARY),
        scheme=f"bnb {quant_type}{' dq' if double_quant else ''}",
        bits=4,
        group_size=str(blocksize),
        quantized_layers=len(done),
        quantized_parameters=plan.parameters,
        quantized_weight_bytes=stored,
        weight_bytes=plan.other_bytes + stored,
        seconds=seconds,
        eval_path="bitsandbytes.functional.dequantize_4bit + float32 matmul (what Linear4bit.forward does on CPU)",
        notes=tuple(notes),
    )


def _dequantize_4bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def _quantize_int8(model: nn.Module, threshold: float):
    import bitsandbytes as bnb

    plan = plan_layers(model)
    start = time.perf_counter()
    done = {}
    with torch.no_grad():
        for name, module in plan.layers.items():
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False, threshold=threshold)
            layer.load_state_dict(module.state_dict())
            layer = layer.to("cpu")  # quantizes the weight
            layer.eval()
            done[name] = layer
            swap_layers(model, {name: layer})
    seconds = time.perf_counter() - start
    stored = sum(tensor_bytes([layer.weight.data, layer.weight.SCB]) for layer in done.values())
    return model, PeerInfo(
        library=LIBRARY,
        version=package_version(LIBRARY),
        scheme=f"bnb LLM.int8 (t={threshold:g})",
        bits=8,
        group_size="channel",
        quantized_layers=len(done),
        quantized_parameters=plan.parameters,
        quantized_weight_bytes=stored,
        weight_bytes=plan.other_bytes + stored,
        seconds=seconds,
        eval_path="Linear8bitLt.forward: activations cast to fp16 and quantized to int8 per token (W8A8), "
                  f"fp16 outlier columns above {threshold:g}",
        notes=("int8 weights with a float32 absmax scale per output row",
               "activations quantized too: not a weight-only number"),
    )
