"""torchao weight-only integer quantization as a peer for the benchmarks, on CPU.

torchao 0.18's `Int4WeightOnlyConfig` does not run here: its plain packing needs the `mslk` CUDA library,
its tile packing needs CUDA, and it silently leaves any layer whose K is not a multiple of the group size
in float (K=576 with group 128 in SmolLM2). The CPU path is `IntxWeightOnlyConfig(weight_dtype=torch.intN,
granularity=PerGroup(g))`: symmetric per-group codes with a float scale and an int8 zero point per group.
It keeps every code unpacked in an int8 (`IntxUnpackedToInt8Tensor`), so the bytes it really stores are
~8.3 bits per weight whatever N is; `nominal_bits_per_weight` in the notes is what the same codes would
weigh packed. torchao needs K divisible by the group: where g does not divide K, the largest multiple of
32 below g that does is used (96 for K=576, as optimum-quanto does), else one group per row.
Evaluation multiplies with torchao's own `dequantize()` of the stored weight.
"""

from __future__ import annotations

import time

import torch
from bench.peers.common import DequantizedLinear, PeerInfo, package_version, plan_layers, swap_layers, tensor_bytes
from torch import nn

LIBRARY = "torchao"
DEFAULT_SCHEMES = ((4, 128),)


def available() -> str:
    import torchao.quantization  # noqa: F401

    return package_version(LIBRARY)


def group_for(in_features: int, group_size: int | None) -> int | None:
    """The group torchao can use for K=in_features: `group_size` if it divides K, else the largest
    multiple of 32 below it that does, else None (one group per row)."""
    if group_size is None:
        return None
    for g in range(group_size, 0, -32):
        if in_features % g == 0:
            return g
    return None


def quantize(model: nn.Module, bits: int, group_size: int | None = 128) -> tuple[nn.Module, PeerInfo]:
    """Quantize every linear layer but the output head in place with IntxWeightOnlyConfig."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if not 1 <= bits <= 8:
        raise ValueError(f"torchao intx weights take 1 to 8 bits, not {bits}")
    plan = plan_layers(model)
    groups = {name: group_for(m.in_features, group_size) for name, m in plan.layers.items()}
    start = time.perf_counter()
    with torch.no_grad():
        for g in sorted(set(groups.values()), key=lambda v: v or 0):
            names = {n for n, v in groups.items() if v == g}
            config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                          granularity=PerAxis(0) if g is None else PerGroup(g))
            quantize_(model, config, filter_fn=lambda module, fqn, names=names: fqn in names)
    seconds = time.perf_counter() - start

    done = {name: model.get_submodule(name) for name in plan.layers}
    stored = 0
    for layer in done.values():
        weight = layer.weight
        stored += tensor_bytes([getattr(weight, n) for n in weight.tensor_data_names
                                if getattr(weight, n, None) is not None])
    packed = sum(m.weight.shape[0] * m.weight.shape[1] * bits / 8 for m in done.values())
    overhead = stored - sum(m.weight.qdata.numel() for m in done.values())  # scales + zero points
    swap_layers(model, {
        name: DequantizedLinear(layer, layer.weight.dequantize, layer.bias, layer.in_features, layer.out_features)
        for name, layer in done.items()
    })
    used = {}
    for name, m in plan.layers.items():
        used.setdefault(m.in_features, groups[name])
    described = " / ".join(f"{'channel' if g is None else g} (K={k})" for k, g in sorted(used.items()))
    nominal = 8 * (packed + overhead) / plan.parameters
    notes = ("IntxWeightOnlyConfig, symmetric; codes stored unpacked, one int8 each",
             f"nominal_bits_per_weight {nominal:.3f} if the codes were packed",
             "Int4WeightOnlyConfig unusable on CPU: needs mslk (plain) or CUDA (tile packing)")
    return model, PeerInfo(
        library=LIBRARY,
        version=package_version(LIBRARY),
        scheme=f"torchao intx int{bits}",
        bits=bits,
        group_size=described if len(set(used.values())) > 1 else str(next(iter(used.values()))),
        quantized_layers=len(done),
        quantized_parameters=plan.parameters,
        quantized_weight_bytes=stored,
        weight_bytes=plan.other_bytes + stored,
        seconds=seconds,
        eval_path="IntxUnpackedToInt8Tensor.dequantize() + float32 matmul",
        notes=notes,
    )
