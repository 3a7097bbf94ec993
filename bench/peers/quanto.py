"""optimum-quanto weight-only quantization (int8 / int4 / int2), as a peer for the benchmarks.

quanto's public API is `quantize(model, weights=qintN, exclude=...)` then `freeze(model)`. It has no
group-size argument: int8 is one scale per output row (absmax, symmetric); int4/int2 use min/max with a
shift in groups of 128, or the largest multiple of 32 below 128 that divides the row (96 for K=576), or
one group per row if none does. `group_size` here overrides that choice by setting each quantized
module's `weight_group_size` attribute before freezing (not a public option; off by default).

Scales and shifts are kept in the model's dtype (float32 for a float32 model). Evaluation multiplies with
quanto's own `dequantize()` of the frozen weight: its CPU int4 matmul took ~22 s per 512-token window of
SmolLM2-135M on 2 cores (against ~1.2 s float), too slow for a 40-window benchmark. quanto's int4 needs
`torch.no_grad` rather than `torch.inference_mode` on CPU.
"""

from __future__ import annotations

import time

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

LIBRARY = "optimum-quanto"
BITS = (8, 4, 2)
DEFAULT_SCHEMES = ((8, None), (4, None), (2, None))   # (bits, group_size): quanto's own grouping


def available() -> str:
    """The installed version; raises ImportError when quanto cannot be imported."""
    import optimum.quanto  # noqa: F401

    return package_version(LIBRARY)


def _qtype(bits: int):
    from optimum.quanto import qint2, qint4, qint8

    try:
        return {8: qint8, 4: qint4, 2: qint2}[bits]
    except KeyError:
        raise ValueError(f"optimum-quanto quantizes weights to 8, 4 or 2 bits, not {bits}") from None


def _stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The frozen weight's inner tensors (codes, scale, shift) plus the module's two scalar buffers."""
    state = module.state_dict()
    return nested_tensors({k: v for k, v in state.items() if k != "bias"})


def quantize(model: nn.Module, bits: int, group_size: int | None = None) -> tuple[nn.Module, PeerInfo]:
    """Quantize `model` in place with quanto; returns it ready for float32 evaluation, and what it stores."""
    from optimum.quanto import freeze
    from optimum.quanto import quantize as quanto_quantize

    qtype = _qtype(bits)
    plan = plan_layers(model)
    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in plan.layers]
    start = time.perf_counter()
    with torch.no_grad():
        quanto_quantize(model, weights=qtype, exclude=skip or None)
        if group_size is not None and bits < 8:
            for name in plan.layers:
                layer = model.get_submodule(name)
                if layer.in_features % group_size:
                    raise ValueError(f"group size {group_size} does not divide {name}'s {layer.in_features} inputs")
                layer.weight_group_size = group_size
        freeze(model)
    seconds = time.perf_counter() - start

    qlayers = {name: model.get_submodule(name) for name in plan.layers}
    used = {}
    for layer in qlayers.values():
        used.setdefault(layer.in_features, layer.weight_group_size)
    stored = sum(tensor_bytes(_stored_tensors(layer)) for layer in qlayers.values())
    swap_layers(model, {
        name: DequantizedLinear(layer, layer.weight.dequantize, layer.bias, layer.in_features, layer.out_features)
        for name, layer in qlayers.items()
    })
    scale_dtype = str(next(iter(qlayers.values())).weight._scale.dtype).replace("torch.", "")
    notes = [f"scales{' and shifts' if bits < 8 else ''} stored as {scale_dtype} (the model's dtype)",
             "symmetric absmax per output row" if bits == 8 else "asymmetric min/max (scale + shift) per group"]
    if group_size is not None and bits < 8:
        notes.append("group size forced through the weight_group_size attribute (not a quanto option)")
    return model, PeerInfo(
        library=LIBRARY,
        version=package_version(LIBRARY),
        scheme=f"quanto qint{bits}",
        bits=bits,
        group_size=_describe_groups(used),
        quantized_layers=len(qlayers),
        quantized_parameters=plan.parameters,
        quantized_weight_bytes=stored,
        weight_bytes=plan.other_bytes + stored,
        seconds=seconds,
        eval_path="quanto WeightQBitsTensor/QBytesTensor.dequantize() + float32 matmul",
        notes=tuple(notes),
    )


def _describe_groups(used: dict[int, int | None]) -> str:
    sizes = {g for g in used.values()}
    if sizes == {None}:
        return "channel"
    if len(sizes) == 1:
        return str(sizes.pop())
    return " / ".join(f"{'channel' if g is None else g} (K={k})" for k, g in sorted(used.items()))
