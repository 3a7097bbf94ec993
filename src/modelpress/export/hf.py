"""`--to hf`: a plain float Hugging Face directory that transformers loads with no modelpress installed.

Every compressed layer becomes the plain module (or parameter) its architecture expects, holding the weight
modelpress computes with (export/dense.py), in float16 (default), bfloat16 or float32; the config loses any
quantization entry and gets the sizes of a structurally pruned model (export/hf_config.py); tokenizer and
generation config come along. Each module of the model is one LayerExport: lossless when its tensors are
exactly representable in the chosen dtype, else the largest rounding error, and, for linear layers, the
weight the runtime computes with (for the caller's KL measurement). Layers whose activations modelpress
quantizes at run time (W8A8, dynamic int8) are never lossless: the export multiplies in float.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.export.base import (ExportOptions, ExportResult, LayerExport, conv1d_names, folder_bytes,
                                     register_exporter)
from modelpress.export.dense import Adapters, DenseLayer, dense_layers, plain_state
from modelpress.export.hf_config import fit_config
from modelpress.io.model import LoadedModel, quiet_loading
from modelpress.nn.layers import is_conv1d, is_linear
from modelpress.train.lora import lora_layers

HF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def hf_dtype(name: str) -> torch.dtype:
    try:
        return HF_DTYPES[name]
    except KeyError:
        raise ModelpressError(f"unknown hf export dtype {name!r}; choose from {', '.join(HF_DTYPES)}") from None


@dataclass
class FloatExport:
    layers: list[LayerExport]
    runtime_weights: dict[str, torch.Tensor]        # module name -> (N, K) float32 weight, re-rounded layers only
    notes: list[str] = field(default_factory=list)


def _rounding_error(tensor: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest |t - t in dtype|; 0.0 when `tensor` is exactly representable (non-float tensors always are)."""
    if not tensor.is_floating_point():
        return 0.0
    return float((tensor.to(dtype).double() - tensor.double()).abs().max()) if tensor.numel() else 0.0


def _module_groups(state: dict[str, torch.Tensor], layers: dict[str, DenseLayer]) -> dict[str, list[str]]:
    """State keys grouped by the module that owns them (a replaced parameter is its own group)."""
    groups: dict[str, list[str]] = {}
    for key in state:
        owner = key if key in layers else key.rpartition(".")[0]
        groups.setdefault(owner, []).append(key)
    return groups


def _report(model: nn.Module, state: dict[str, torch.Tensor], layers: dict[str, DenseLayer],
            dtype: torch.dtype) -> FloatExport:
    target = str(dtype).removeprefix("torch.")
    result = FloatExport([], {})
    unmeasured = []
    for owner, keys in _module_groups(state, layers).items():
        layer = layers.get(owner)
        errors = {key: _rounding_error(state[key], dtype) for key in keys}
        worst = max(errors.values())
        source = layer.source if layer else str(state[keys[0]].dtype).removeprefix("torch.")
        reasons = [f"max abs error {worst:.3g} rounding to {target}"] if worst > 0 else []
        if layer is not None and layer.runtime_differs:
            reasons.append(layer.runtime_differs)
        result.layers.append(LayerExport(owner, source, target, not reasons, "; ".join(reasons)))
        if not reasons:
            continue
        linear = layer.linear if layer is not None else bool(owner) and is_linear(model.get_submodule(owner))
        weight_key = f"{owner}.weight"
        if linear and weight_key in state:
            weight = state[weight_key]
            if layer is None and is_conv1d(model.get_submodule(owner)):
                weight = weight.t()   # runtime weights are (N, K)
            result.runtime_weights[owner] = weight.to(dtype).float()
        else:
            unmeasured.append(owner)
    if unmeasured:
        result.notes.append(f"{len(unmeasured)} re-rounded non-linear tensors ({', '.join(unmeasured[:3])}"
                            f"{' ...' if len(unmeasured) > 3 else ''}) are not in the measured KL, which swaps "
                            f"linear layers only")
    return result


def _orient(state: dict[str, torch.Tensor], layers: dict[str, DenseLayer], conv1d: set[str]) -> None:
    """Dense (N, K) weights go into a transformers Conv1D as (K, N)."""
    for name, layer in layers.items():
        if layer.linear and name in conv1d:
            state[f"{name}.weight"] = state[f"{name}.weight"].t()


def _build(cls: type[nn.Module], config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """The plain architecture holding `state` (in its layout) in `dtype`, with no tensor allocated twice."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        target = cls(config)
    converted = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in state.items()}
    target.load_state_dict(converted, strict=True, assign=True)
    if callable(getattr(target, "tie_weights", None)):
        target.tie_weights()
    meta = [n for n, t in (*target.named_parameters(), *target.named_buffers()) if t.is_meta]
    if meta:
        raise ModelpressError(f"the exported model has tensors with no value: {meta[:4]}")
    return target.eval()


def plain_config(model: nn.Module, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
    """The model's config without quantization entries, with the sizes `shapes` need, in `dtype`."""
    config = copy.deepcopy(model.config)
    for name in ("quantization_config", "compression_config"):
        if hasattr(config, name):
            delattr(config, name)
    config, changes = fit_config(type(model), config, shapes)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    return config, changes


def write_hf(loaded: LoadedModel, folder: Path, dtype: torch.dtype, adapters: Adapters = "merge") -> FloatExport:
    """Write `loaded` as a plain float HF directory into `folder` (LoRA adapters merged or dropped)."""
    model = loaded.model
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ModelpressError(f"{type(model).__name__} is not a transformers model; the hf export needs one")
    layers = dense_layers(model, adapters)
    state = plain_state(model, layers)
    result = _report(model, state, layers, dtype)   # on (N, K) weights, as modelpress computes with them
    _orient(state, layers, conv1d_names(model))
    config, changes = plain_config(model, {k: tuple(v.shape) for k, v in state.items()}, dtype)
    target = _build(type(model), config, state, dtype)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        target.generation_config = copy.deepcopy(generation)
    with quiet_loading():  # transformers' per-shard progress bar
        target.save_pretrained(folder)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    if changes:
        result.notes.append("config sizes written for the pruned model: " +
                            ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in changes.items()))
    merged = lora_layers(model)
    if merged and adapters == "merge":
        result.notes.append(f"{len(merged)} LoRA adapters merged into their dequantized bases in float32")
    return result


def written_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@register_exporter("hf")
def export_hf(loaded: LoadedModel, folder: Path, options: ExportOptions) -> ExportResult:
    dtype = hf_dtype(options.hf_dtype)
    written = write_hf(loaded, folder, dtype)
    return ExportResult(target="hf", files=written_files(folder), layers=written.layers,
                        file_bytes=folder_bytes(folder), linear_bits_per_weight=float(dtype.itemsize * 8),
                        notes=written.notes, runtime_weights=written.runtime_weights)
