"""modelpress export MODEL --to compressed-tensors: a Hugging Face directory that transformers (with the
`compressed-tensors` package) and vLLM load without modelpress.

The folder holds config.json with a `quantization_config` (quant_method "compressed-tensors": one config group
per distinct scheme, the layers it targets, `ignore` for the float ones, and a `sparsity_config` naming the
layers whose weights are 2:4 sparse), model.safetensors, the tokenizer, the generation config, and
modelpress_export.json recording the float model it descends from (so `modelpress eval` compares with it).
Which layer becomes what is ct_layers.py's business; this file walks the model and writes files.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.export.base import (EXPORT_MARKER_FILE, ExportOptions, ExportResult, LayerExport, conv1d_names,
                                     folder_bytes, register_exporter)
from modelpress.export.ct_layers import (ASYM_FORMATS, DYNAMIC_TOKEN_FP8, CTLayer, CTScheme, convert_packed,
                                         float_layer, folded_w8a8, fp8_e4m3, natural_group_size, uniform_group_size,
                                         w8a8_int)
from modelpress.formats.packed import quantize_weight
from modelpress.io.model import LoadedModel
from modelpress.nn.dynamic import DynamicInt8Linear
from modelpress.nn.dynamic_fp8 import DynamicFp8Linear
from modelpress.nn.layers import is_linear, linear_weight, output_head_names
from modelpress.nn.quant_embedding import QuantEmbedding
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.registry import compressed_module_kind
from modelpress.nn.sparse_linear import SparseLinear, is_semi_structured
from modelpress.nn.w8a8_linear import W8A8Linear

WEIGHTS_FILE = "model.safetensors"


@register_exporter("compressed-tensors")
def export_compressed_tensors(loaded: LoadedModel, folder: Path, options: ExportOptions) -> ExportResult:
    model = loaded.model
    layers, sparse = convert_layers(model)
    tables = packed_tables(model)
    config = quantization_config(model, layers, sparse)
    files = write_folder(loaded, folder, layers, config, tables)
    exports = [LayerExport(name, source_label(model.get_submodule(name)), layer.target, layer.lossless, layer.reason)
               for name, layer in layers.items()]
    exports += [table.export for table in tables.values()]
    weights = sum(_weight_count(layer) for layer in layers.values())
    stored = sum(layer.stored_bytes for layer in layers.values())
    return ExportResult(target="compressed-tensors", files=files, layers=exports, file_bytes=folder_bytes(folder),
                        linear_bits_per_weight=8 * stored / weights if weights else None,
                        notes=export_notes(model, layers, sparse) + [t.note for t in tables.values()],
                        runtime_weights={**{n: layer.runtime_weight for n, layer in layers.items()
                                            if layer.runtime_weight is not None},
                                         **{n: t.runtime for n, t in tables.items() if t.runtime is not None}})


@dataclass
class FloatTable:
    """A quantized output head or embedding (`quantize --head`), written as the float `weight` its
    architecture has: compressed-tensors quantizes Linear modules it targets, never an embedding, and a tied
    head shares the embedding's tensor."""

    weight: torch.Tensor               # (N, K) in the model's dtype, as written
    export: LayerExport
    note: str
    runtime: torch.Tensor | None       # float32 weight the runtime computes with, when the dtype rounded it


def packed_tables(model: nn.Module) -> dict[str, FloatTable]:
    heads = output_head_names(model)
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    dtype = model_dtype(model)
    target = str(dtype).removeprefix("torch.")
    tables = {}
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, QuantEmbedding)) or (name not in heads and module is not embedding):
            continue
        exact = module.dequantized_weight(torch.float32)
        weight = exact.to(dtype)
        error = float((weight.float() - exact).abs().max())
        lossless = error == 0
        reason = "" if lossless else f"max abs error {error:.3g} rounding to {target}"
        export = LayerExport(name, module.scheme.spec, target, lossless, reason)
        what = "bit for bit" if lossless else reason
        note = (f"{name}: {module.scheme.spec} written dequantized as {target} ({what}); compressed-tensors keeps "
                f"the output head and embeddings float")
        runtime = None if lossless or isinstance(module, QuantEmbedding) else weight.float()
        tables[name] = FloatTable(weight, export, note, runtime)
    return tables


# ---- which layer becomes what ----------------------------------------------------------------------------

def convert_layers(model: nn.Module) -> tuple[dict[str, CTLayer], list[str]]:
    """Every linear layer but the output head, converted; and the names of those whose weight is 2:4 sparse."""
    heads = output_head_names(model)
    refuse_conv1d(model, heads)
    asym_size = asymmetric_group_size(model, heads)
    layers, sparse = {}, []
    for name, module in model.named_modules():
        if name in heads or isinstance(module, QuantEmbedding):   # written float (packed_tables)
            continue
        layer = convert_module(name, module, asym_size)
        if layer is None:
            continue
        layers[name] = layer
        dense = layer.runtime_weight if layer.runtime_weight is not None else dense_weight(module)
        if is_semi_structured(dense):
            sparse.append(name)
    return layers, sparse


def refuse_conv1d(model: nn.Module, heads) -> None:
    """compressed-tensors swaps only nn.Linear modules for its quantized ones: a quantized layer where the
    architecture has a transformers Conv1D (GPT-2's c_attn, c_fc, ...) would be left out, and transformers would
    fill it with random weights. Refused before anything is written."""
    conv1d = conv1d_names(model)
    compressed = [name for name, module in model.named_modules() if name in conv1d and name not in heads
                  and not is_linear(module)]
    if compressed:
        raise ModelpressError(f"{len(compressed)} compressed layer(s) (e.g. {compressed[0]}) sit where "
                              f"{type(model).__name__} has a Conv1D, which compressed-tensors cannot quantize "
                              "(it replaces nn.Linear modules only; transformers would load random weights "
                              "there); export this model as hf instead")


def asymmetric_group_size(model: nn.Module, heads: set[str] | list[str]) -> int | None:
    """The one group size every asymmetric layer is written with when their own sizes differ (else None)."""
    sizes = [natural_group_size(m.packed.scheme, m.packed.shape[1]) for name, m in model.named_modules()
             if isinstance(m, QuantLinear) and name not in heads and m.packed.scheme.format in ASYM_FORMATS]
    if None in sizes:   # a per-tensor asymmetric layer cannot share a config group with grouped ones
        return None
    return uniform_group_size(sizes)  # type: ignore[arg-type]


def convert_module(name: str, module: nn.Module, asym_group_size: int | None = None) -> CTLayer | None:
    if isinstance(module, W8A8Linear) and module.smooth is not None:
        return folded_w8a8(module.packed, module.smooth)
    if isinstance(module, DynamicInt8Linear):   # W8A8Linear without in-layer factors included
        return w8a8_int(module.packed)
    if isinstance(module, DynamicFp8Linear):
        return fp8_e4m3(module.packed, activations=DYNAMIC_TOKEN_FP8)
    if isinstance(module, QuantLinear):
        return convert_packed(module.packed, asym_group_size)
    if isinstance(module, SparseLinear):
        return sparse_layer(module)
    kind = compressed_module_kind(module)
    if kind is not None:
        raise ModelpressError(f"layer {name} is a {kind} layer, which compressed-tensors cannot hold in the "
                              "model's own architecture; export this model as gguf or hf instead")
    if is_linear(module):
        return float_layer(module.weight)   # as stored (Conv1D keeps its (in, out) layout)
    return None


def sparse_layer(module: SparseLinear) -> CTLayer:
    """A pruned layer is written dense (compressed-tensors' sparse formats are legacy); float kept values are
    exact, quantized ones (groups over kept values only) are re-quantized as a dense weight."""
    packed = module.packed_values
    if packed is None:
        return float_layer(module.dense_weight())
    requantized = quantize_weight(module.dense_weight(), packed.scheme)
    layer = convert_packed(requantized)
    layer.lossless = False
    reason = f"kept values quantized in groups of kept weights ({packed.scheme.spec}); re-quantized as a dense weight"
    layer.reason = f"{reason}; {layer.reason}" if layer.reason else reason
    if layer.runtime_weight is None:
        layer.runtime_weight = requantized.dequantize()
    return layer


def dense_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, QuantLinear):
        return module.dequantized_weight()
    if isinstance(module, SparseLinear):
        return module.dense_weight()
    return linear_weight(module).detach()


def source_label(module: nn.Module) -> str:
    if isinstance(module, QuantLinear):
        smooth = isinstance(module, W8A8Linear) and module.smooth is not None
        act = "+a8" if isinstance(module, (DynamicInt8Linear, DynamicFp8Linear)) else ""
        perm = "+act-order" if module.input_perm is not None else ""
        return f"{module.scheme.spec}{act}{perm}{'+smooth' if smooth else ''}"
    if isinstance(module, SparseLinear):
        pattern = f"{module.pattern[0]}:{module.pattern[1]} " if module.pattern else ""
        return f"sparse {pattern}{module.scheme.spec if module.scheme else module.values.dtype}"
    return str(module.weight.dtype).removeprefix("torch.")


def _weight_count(layer: CTLayer) -> int:
    if "weight_shape" in layer.tensors:
        return int(layer.tensors["weight_shape"].prod())
    return layer.tensors["weight"].numel()


# ---- config.json -----------------------------------------------------------------------------------------

def quantization_config(model: nn.Module, layers: dict[str, CTLayer], sparse: list[str]) -> dict:
    groups: dict[CTScheme, list[str]] = {}
    for name, layer in layers.items():
        if layer.scheme is not None:
            groups.setdefault(layer.scheme, []).append(name)
    heads = output_head_names(model)   # float in the file, quantized by `--head` or not: never a target
    linear_names = [name for name, module in model.named_modules()
                    if is_linear(module) or name in layers or name in heads]
    quantized = {name for names in groups.values() for name in names}
    ignore = [name for name in linear_names if name not in quantized]
    if len(groups) == 1:   # one scheme for every quantized layer: the usual "Linear" target
        scheme = next(iter(groups))
        groups[scheme] = ["Linear"]
    formats = sorted({scheme.format for scheme in groups})
    config = {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": scheme.config(targets) for i, (scheme, targets) in enumerate(groups.items())},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    if sparse:
        config["sparsity_config"] = sparsity_config(model, layers, sparse)
    return config


def sparsity_config(model: nn.Module, layers: dict[str, CTLayer], sparse: list[str]) -> dict:
    """2:4 layers stored dense (the `dense` sparsity format: metadata for runtimes with 2:4 kernels)."""
    zeros = total = 0
    for name in sparse:
        weight = layers[name].runtime_weight
        if weight is None:
            weight = dense_weight(model.get_submodule(name))
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return {"format": "dense", "sparsity_structure": "2:4", "targets": sparse,
            "ignore": [name for name in layers if name not in sparse], "global_sparsity": zeros / total}


# ---- files -----------------------------------------------------------------------------------------------

def write_folder(loaded: LoadedModel, folder: Path, layers: dict[str, CTLayer], qconfig: dict,
                 tables: dict[str, FloatTable]) -> list[str]:
    model = loaded.model
    tensors = checkpoint_tensors(model, layers, tables)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "producer": "modelpress"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = model_dtype(model)
    config.save_pretrained(folder)
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    data["quantization_config"] = qconfig
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
        generation.save_pretrained(folder)
    marker = {"exporter": "modelpress", "target": "compressed-tensors", "source": loaded.source,
              "float_source": resolved_source(loaded.float_source)}
    (folder / EXPORT_MARKER_FILE).write_text(json.dumps(marker, indent=1))
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def checkpoint_tensors(model: nn.Module, layers: dict[str, CTLayer],
                       tables: dict[str, FloatTable] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every converted layer's own tensors replaced by its compressed-tensors ones
    (its bias kept), and quantized head / embedding tables by their float `weight`; a tensor tied to an
    earlier one is written once when the config ties them."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tables = tables or {}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    written_tables: set[int] = set()
    for name, tensor in model.state_dict().items():
        owner, _, local = name.rpartition(".")
        if owner in layers and local != "bias":
            continue
        if owner in tables and local != "bias":
            qdata = model.get_submodule(owner)._buffers["qdata"]
            if local == "qdata" and not (tied and id(qdata) in written_tables):
                out[f"{owner}.weight"] = tables[owner].weight
                written_tables.add(id(qdata))
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            if tied:
                continue
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor
    for owner, layer in layers.items():
        for local, tensor in layer.tensors.items():
            out[f"{owner}.{local}"] = tensor
    return {name: tensor.detach().contiguous().cpu() for name, tensor in out.items()}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float tensors (its embeddings and norms): what transformers builds it in."""
    for tensor in model.parameters():   # not packed buffers: a QuantEmbedding's float16 scales come first
        if tensor.is_floating_point() and tensor.dtype.itemsize >= 2:
            return tensor.dtype
    return torch.float32


def resolved_source(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def export_notes(model: nn.Module, layers: dict[str, CTLayer], sparse: list[str]) -> list[str]:
    notes = []
    labels = {layer.scheme.label for layer in layers.values() if layer.scheme is not None}
    if any(label.startswith("int-quantized") for label in labels):
        notes.append("W8A8 layers: activations are quantized per token at run time by the runtime "
                     "(compressed-tensors rounds with absmax/127.5 over [-128, 127], modelpress with absmax/127 over "
                     "[-127, 127]); the int8 weights are exact")
    if any(label.startswith("float-quantized") and "per-token" in label for label in labels):
        notes.append("FP8 dynamic layers: activations are quantized to fp8-e4m3 per token at run time by the runtime, "
                     "with absmax/448 as modelpress does; the fp8 weights are exact")
    bits = {dict(layer.scheme.weights)["num_bits"] for layer in layers.values()
            if layer.scheme is not None and layer.scheme.format == "pack-quantized"}
    if bits - {4, 8}:
        notes.append(f"pack-quantized {sorted(bits - {4, 8})}-bit weights load in transformers; vLLM's int kernels "
                     "run 4 and 8 bits")
    regrouped = [name for name, layer in layers.items() if layer.regrouped]
    if regrouped:
        notes.append(f"{len(regrouped)} layer(s) written with groups smaller than their own (e.g. {regrouped[0]}: rows "
                     "the group size does not divide, or asymmetric layers sharing one group size), each scale "
                     "repeated: exact, with more scale bytes")
    odd = [name for name, layer in layers.items() if layer.scheme is not None
           and dict(layer.scheme.weights)["group_size"] not in (None, 32, 64, 128)]
    if odd:
        notes.append(f"{len(odd)} layer(s) use group sizes other than 32/64/128 (e.g. {odd[0]}): transformers runs "
                     "them; vLLM's kernels may not")
    if any(not dict(layer.scheme.weights)["symmetric"] for layer in layers.values() if layer.scheme is not None):
        notes.append("asymmetric layers: transformers 5.23 with compressed-tensors 0.20 loads zero points only with "
                     "CompressedTensorsConfig(dequantize=True) (modelpress eval does this), and then only when one "
                     "config group covers every quantized layer (asymmetric layers are written with one group size "
                     "for that)" + ("" if len(labels) == 1
                                    else "; this model has several config groups, so it will not load that way"))
    if sparse:
        notes.append(f"{len(sparse)} layer(s) are 2:4 sparse, stored dense with a 2:4 sparsity_config")
    dtype = model_dtype(model)
    scale_dtypes = {layer.tensors["weight_scale"].dtype for layer in layers.values() if "weight_scale" in layer.tensors}
    lossy_casts = sorted(str(d).removeprefix("torch.") for d in scale_dtypes
                         if d != dtype and torch.finfo(d).bits >= torch.finfo(dtype).bits)
    if lossy_casts:
        notes.append(f"transformers casts scales to the model dtype {str(dtype).removeprefix('torch.')}: "
                     f"{', '.join(lossy_casts)} scales may round at run time (the file holds them exactly)")
    return notes
