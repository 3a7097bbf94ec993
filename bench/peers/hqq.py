"""HQQ (half-quadratic quantization) as a peer for the benchmarks: 8/4/3/2-bit asymmetric weights whose
scale and zero point are refined by HQQ's proximal solver (no calibration data).

Settings are HQQ's defaults from `BaseQuantizeConfig(nbits, group_size)`: groups along the input axis
(axis=1), `optimize=True`, zero rounded to an integer only at 4 bits, scales and zeros NOT quantized
(quantizing them is deprecated in this version and ignored), kept in the compute dtype, float16 here.
HQQ groups are consecutive runs of the row-major flattened weight, so with K=576 and group 128 a group
spans the end of one row and the start of the next. 3-bit codes are packed 10 to an int32 (3.2 bits).

Install: `DISABLE_CUDA=1 pip install hqq` (it builds from source). Its forward wants fp16 activations
on this path, and `HQQLinear.dequantize()` does its arithmetic in fp16, which is very slow on CPU (~40 s
per 128-token forward of SmolLM2-135M under load). Evaluation therefore rebuilds the weight with HQQ's
own unpacking and formula, (codes - zero) * scale, in float32 with each step rounded to fp16 as HQQ's
fp16 arithmetic rounds it (`dequantize_like_hqq`, bit-identical to `dequantize()`), and multiplies
float32 activations with it.
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

LIBRARY = "hqq"
BITS = (8, 4, 3, 2)
# (bits, group_size), most informative first: a run cut short still has the 4- and 3-bit rows
DEFAULT_SCHEMES = ((4, 64), (4, 128), (3, 64), (3, 128), (2, 64), (2, 128), (8, 64), (8, 128))


def available() -> str:
    import hqq.core.quantize  # noqa: F401

    return package_version(LIBRARY)


def stored_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Packed codes plus every tensor in HQQ's meta dict (scale, zero; quantized variants if present)."""
    return [layer.W_q, *nested_tensors(layer.meta)]


def dequantize_like_hqq(layer: nn.Module) -> torch.Tensor:
    """HQQLinear.dequantize() computed in float32 with HQQ's compute-dtype rounding after each step:
    the same values, without fp16 arithmetic on CPU. (out_features, in_features) float32."""
    from hqq.core.quantize import Quantizer

    meta = layer.meta
    if meta.get("quant_zero") or meta.get("quant_scale") or "zero_scale" in meta or not meta["packing"]:
        return layer.dequantize().float()
    codes = Quantizer.unpack[meta["packing"]](layer.W_q, dtype=torch.float32)
    if meta["nbits"] == 3:  # 3-bit packing pads the group count up to a multiple of 10
        groups = meta["group_size"] if meta["axis"] == 0 else meta["shape"][0] * meta["shape"][1] // meta["group_size"]
        codes = codes[:groups]
    dtype = meta["scale"].dtype
    weight = (codes - meta["zero"].float()).to(dtype).float()
    weight = (weight * meta["scale"].float()).to(dtype).float()
    return weight.reshape(meta["shape"])


def quantize(model: nn.Module, bits: int, group_size: int | None = 64,
             compute_dtype: torch.dtype = torch.float16) -> tuple[nn.Module, PeerInfo]:
    """Quantize every linear layer but the output head in place; returns the model and what HQQ stores.
    `group_size=None` is one group per output row."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    if bits not in BITS:
        raise ValueError(f"hqq benchmark takes bits in {BITS}, not {bits}")
    plan = plan_layers(model)
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    start = time.perf_counter()
    done = {}
    with torch.no_grad():
        for name, module in plan.layers.items():
            done[name] = HQQLinear(module, config, compute_dtype=compute_dtype, device="cpu", del_orig=True)
            swap_layers(model, {name: done[name]})  # frees the float weight as we go
    seconds = time.perf_counter() - start

    stored = sum(tensor_bytes(stored_tensors(layer)) for layer in done.values())
    swap_layers(model, {
        name: DequantizedLinear(layer, partial(dequantize_like_hqq, layer), layer.bias, layer.in_features,
                                layer.out_features)
        for name, layer in done.items()
    })
    weight_params = config["weight_quant_params"]
    first = next(iter(done.values()))
    scale_dtype = str(first.meta["scale"].dtype).replace("torch.", "")
    notes = [f"scale and zero stored unquantized as {scale_dtype}",
             f"optimize={weight_params['optimize']}, round_zero={weight_params['round_zero']}, axis={weight_params['axis']}"]
    if bits == 3:
        notes.append("3-bit codes packed 10 per int32 (3.2 bits/code)")
    widths = {m.in_features for m in done.values()}
    if group_size is not None and any(k % group_size for k in widths):
        notes.append(f"groups of {group_size} run across row ends where K in {sorted(widths)} is not a multiple")
    return model, PeerInfo(
        library=LIBRARY,
        version=package_version(LIBRARY),
        scheme=f"hqq {bits}-bit",
        bits=bits,
        group_size="channel" if group_size is None else str(group_size),
        quantized_layers=len(done),
        quantized_parameters=plan.parameters,
        quantized_weight_bytes=stored,
        weight_bytes=plan.other_bytes + stored,
        seconds=seconds,
        eval_path="HQQ's unpack + (codes - zero) * scale with HQQ's fp16 rounding, float32 matmul",
        notes=tuple(notes),
    )
