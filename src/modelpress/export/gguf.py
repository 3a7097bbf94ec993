"""GGUF export for llama.cpp and Ollama: `modelpress export MODEL --to gguf`.

Writes folder/model.gguf and folder/Modelfile. Per weight:
- a packed layer whose codes fit a GGML block type (gguf_blocks.LOSSLESS_TYPES) is copied bit for bit;
- any other compressed layer is dequantized and re-quantized to the nearest GGML type its row length allows
  (FALLBACK, or ExportOptions.gguf_fallback), recorded as re-rounded, with the weight llama.cpp will compute
  with kept for measuring the KL;
- float matrices take the smallest of Q8_0 / F16 that reproduces them exactly (a GGUF source's Q8_0 embedding
  stays Q8_0), else ExportOptions.gguf_float_type; norms and biases are F32.
Tensor names come from gguf-py's name map for the architecture, hyperparameters and RoPE row order from
gguf_arch, the tokenizer from gguf_vocab.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, get_tensor_name_map
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.export import gguf_arch, gguf_blocks, gguf_vocab
from modelpress.export.dense import dense_layer, dense_layers, plain_state
from modelpress.export.gguf_kv import read_kv
from modelpress.export.hf_config import expected_shapes, fit_config
from modelpress.export.base import ExportOptions, ExportResult, LayerExport, folder_bytes, register_exporter
from modelpress.export.modelfile import write_modelfile
from modelpress.formats.packed import PackedWeight
from modelpress.io.model import LoadedModel
from modelpress.nn.layers import output_head_names
from modelpress.nn.registry import compressed_module_kind

Q = GGMLQuantizationType
GGUF_FILE = "model.gguf"

# bits of our scheme -> GGML types to re-quantize into, best first; a k-quant needs rows of whole 256-blocks
FALLBACK: dict[int, tuple[str, ...]] = {
    8: ("Q8_0",), 6: ("Q6_K", "Q8_0"), 5: ("Q5_K", "Q5_1", "Q8_0"), 4: ("Q4_K", "Q4_1", "Q5_1", "Q8_0"),
    3: ("Q3_K", "Q4_K", "Q4_1", "Q8_0"), 2: ("Q2_K", "Q3_K", "Q4_K", "Q4_1", "Q8_0"),
}
OWN_GENERAL_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
FLOAT_KINDS = ("resized_linear",)   # compressed kinds that are plain float layers of another shape
FILE_TYPES = {"Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K"}


@dataclass
class GGUFTensor:
    name: str                      # GGUF tensor name
    data: np.ndarray               # float array (F32/F16) or (N, row_bytes) uint8 blocks
    qtype: GGMLQuantizationType
    elements: int
    linear: bool                   # a decoder linear layer (counted in linear bits per weight)


@register_exporter("gguf")
def export_gguf(loaded: LoadedModel, folder: Path, options: ExportOptions) -> ExportResult:
    model = loaded.model
    config = model.config
    arch = gguf_arch.arch_for(config)
    config = fitted_config(model)
    names = get_tensor_name_map(arch.arch, int(config.num_hidden_layers))
    tensors: list[GGUFTensor] = []
    layers: list[LayerExport] = []
    runtime: dict[str, torch.Tensor] = {}
    owned = set()
    tables = table_names(model)
    written: dict[int, str] = {}     # id of a packed qdata tensor -> the layer written with it
    notes: list[str] = []
    for name, module in model.named_modules():
        if compressed_module_kind(module) in (None, *FLOAT_KINDS):
            continue
        owned.update(f"{name}.{p}" for p, _ in module.named_parameters())
        qdata = module._buffers.get("qdata")
        if qdata is not None and id(qdata) in written:
            # a head tied to its embedding: llama.cpp reads token_embd for the output when `output` is absent
            notes.append(f"{name}: tied to {written[id(qdata)]}, written once as its tensor")
            if written[id(qdata)] in runtime:
                runtime[name] = runtime[written[id(qdata)]]
            continue
        if qdata is not None:
            written[id(qdata)] = name
        tensor, layer, weight = compressed_tensor(name, module, options)
        if name in tables:
            tensor.linear = False    # the embedding and output head, float or not, are not decoder linear layers
            notes.append(f"{name}: {layer.source} -> {layer.target}, "
                         + ("bit for bit" if layer.lossless else f"re-rounded ({layer.reason})"))
        tensors.append(tensor)
        layers.append(layer)
        if weight is not None:
            runtime[name] = weight
        bias = getattr(module, "bias", None)
        if bias is not None:
            tensors.append(float_tensor(f"{name}.bias", bias.detach().float(), Q.F32))
    for pname, param in model.named_parameters():
        if pname in owned:
            continue
        tensor, layer = parameter_tensor(pname, param.detach(), options)
        tensors.append(tensor)
        if layer is not None:
            layers.append(layer)
            if not layer.lossless:
                runtime.update(float_runtime(model, pname, tensor))
    for tensor in tensors:
        hf_name = tensor.name
        tensor.name = gguf_name(names, hf_name)
        if arch.permute_qk:
            permute_for_rope(tensor, hf_name, config)
    path = folder / GGUF_FILE
    write_file(path, loaded, config, arch, tensors, options)
    write_modelfile(folder, loaded.tokenizer, GGUF_FILE)
    linear = [t for t in tensors if t.linear]
    bits = 8 * sum(t.data.nbytes for t in linear) / max(1, sum(t.elements for t in linear))
    mix = Counter(t.qtype.name for t in linear)
    notes.insert(0, f"linear layers: {', '.join(f'{count} {kind}' for kind, count in mix.most_common())}; "
                    f"{bits:.3f} bits per weight as stored in the file")
    return ExportResult(target="gguf", files=[GGUF_FILE, "Modelfile"], layers=layers, file_bytes=folder_bytes(folder),
                        linear_bits_per_weight=bits, notes=notes, runtime_weights=runtime)


def table_names(model: nn.Module) -> set[str]:
    """Module names of the input embedding and the output head (quantized by `quantize --head` or not)."""
    names = set(output_head_names(model))
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    names.update(name for name, module in model.named_modules() if embedding is not None and module is embedding)
    return names


def fitted_config(model: nn.Module):
    """The config whose sizes the model really has: a structurally pruned model (layers cut to one new width,
    whatever holds them now) gets its new widths, as the hf export writes them; differing widths are refused."""
    expected = expected_shapes(type(model), model.config)
    if all(expected.get(f"{name}.weight") == (m.out_features, m.in_features)
           for name, m in model.named_modules() if hasattr(m, "out_features") and hasattr(m, "in_features")):
        return model.config
    shapes = {key: tuple(value.shape) for key, value in plain_state(model, dense_layers(model)).items()}
    return fit_config(type(model), model.config, shapes)[0]


def compressed_tensor(name: str, module: nn.Module, options: ExportOptions):
    """(GGUFTensor, LayerExport, runtime weight or None) for a compressed layer."""
    packed: PackedWeight | None = getattr(module, "packed", None)
    smooth = getattr(module, "smooth", None)
    if packed is not None and smooth is None:
        # a k-quant header first where the scales factor into one (fewer bytes than 32-blocks of fp16 scales)
        kquant = gguf_blocks.encode_kquant_lossless(packed)
        qtype, reason = kquant[0] if kquant else None, ""
        if kquant is None:
            qtype, reason = gguf_blocks.lossless_type(packed)
        if qtype is not None:
            blocks = kquant[1] if kquant else gguf_blocks.encode_lossless(packed, qtype)
            layer = LayerExport(name, packed.scheme.spec, qtype.name, lossless=True)
            return GGUFTensor(f"{name}.weight", blocks, qtype, packed.shape[0] * packed.shape[1], True), layer, None
        source = packed.scheme.spec
        bits = packed.scheme.bits
        weight = packed.dequantize(torch.float32)
    else:
        reason = "in-layer SmoothQuant factors have no GGUF equivalent" if smooth is not None else \
            f"{type(module).__name__} has no GGML block type"
        weight = dense_weight(module)
        source = getattr(getattr(module, "scheme", None), "spec", type(module).__name__)
        bits = getattr(getattr(module, "scheme", None), "bits", 16)
    qtype = fallback_type(bits, weight.shape[1], options)
    blocks = gguf_blocks.encode_float(weight, qtype)
    runtime = gguf_blocks.decode(blocks, qtype, tuple(weight.shape))
    layer = LayerExport(name, source, qtype.name, lossless=False, reason=reason)
    return GGUFTensor(f"{name}.weight", blocks, qtype, weight.numel(), True), layer, runtime


def dense_weight(module: nn.Module) -> torch.Tensor:
    """(N, K) float32 weight a compressed layer computes with (its input scaling folded in)."""
    layer = dense_layer(module)
    if layer is None or "weight" not in layer.tensors:
        raise ModelpressError(f"GGUF export cannot read the weight of a {type(module).__name__} layer")
    return layer.tensors["weight"]


def fallback_type(bits: int, k: int, options: ExportOptions) -> GGMLQuantizationType:
    choices = FALLBACK.get(bits, ("Q8_0",)) if options.gguf_fallback == "nearest" else (options.gguf_fallback,)
    for choice in choices:
        try:
            qtype = Q[choice]
        except KeyError:
            raise ModelpressError(f"unknown GGML type {choice!r} for --gguf-fallback") from None
        if k % gguf_blocks.block_size(qtype) == 0 and writable(qtype):
            return qtype
    return Q.F16


def writable(qtype: GGMLQuantizationType) -> bool:
    return qtype.name in gguf_blocks.LEGACY_TYPES + gguf_blocks.K_TYPES


def parameter_tensor(pname: str, value: torch.Tensor, options: ExportOptions):
    """A float parameter: vectors as F32; matrices in the smallest type that holds them exactly."""
    value = value.float()
    if value.dim() == 1:
        return float_tensor(pname, value, Q.F32), None
    module_name = pname.rsplit(".", 1)[0]
    source = "float32"
    for qtype in (Q.Q8_0, Q.F16):
        if value.shape[-1] % gguf_blocks.block_size(qtype):
            continue
        data = gguf_blocks.encode_float(value, qtype)
        if torch.equal(gguf_blocks.decode(data, qtype, tuple(value.shape)), value):
            tensor = GGUFTensor(pname, data, qtype, value.numel(), False)
            return tensor, LayerExport(module_name, source, qtype.name, lossless=True)
    qtype = Q[options.gguf_float_type]
    data = gguf_blocks.encode_float(value, qtype) if qtype != Q.BF16 else _bf16(value)
    tensor = GGUFTensor(pname, data, qtype, value.numel(), False)
    lossless = qtype == Q.F32
    return tensor, LayerExport(module_name, source, qtype.name, lossless,
                               "" if lossless else f"float32 values are not all exact in {qtype.name}")


def _bf16(value: torch.Tensor) -> np.ndarray:
    return value.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(value.shape[0], -1)


def float_tensor(name: str, value: torch.Tensor, qtype: GGMLQuantizationType) -> GGUFTensor:
    return GGUFTensor(name, gguf_blocks.encode_float(value, qtype), qtype, value.numel(), False)


def float_runtime(model: nn.Module, pname: str, tensor: GGUFTensor) -> dict[str, torch.Tensor]:
    """Runtime weights of a re-rounded float matrix: its own module, and a head tied to it."""
    shape = tuple(model.get_parameter(pname).shape)
    if tensor.qtype == Q.BF16:
        weight = torch.from_numpy(tensor.data.copy()).view(torch.bfloat16).reshape(shape).float()
    else:
        weight = gguf_blocks.decode(tensor.data, tensor.qtype, shape)
    owners = [name for name, module in model.named_modules()
              if getattr(module, "weight", None) is model.get_parameter(pname)]
    return {owner: weight for owner in owners if isinstance(model.get_submodule(owner), (nn.Linear, nn.Embedding))}


def gguf_name(names, hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ModelpressError(f"GGUF export has no llama.cpp name for tensor {hf_name!r}")
    return found


def permute_for_rope(tensor: GGUFTensor, hf_name: str, config) -> None:
    gguf_part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}.get(gguf_part)
    if heads is None:
        return
    order = gguf_arch.permute_rows(tensor.data.shape[0], heads).numpy()
    tensor.data = np.ascontiguousarray(tensor.data[order])


def write_file(path: Path, loaded: LoadedModel, config, arch: gguf_arch.GGUFArch, tensors: list[GGUFTensor],
               options: ExportOptions) -> None:
    writer = GGUFWriter(str(path), arch.name)
    source_gguf = _gguf_source(loaded)
    if source_gguf is not None:
        copy_general_keys(source_gguf, writer, skip=("general.name",) if options.name else ())
    if options.name is not None or source_gguf is None:
        writer.add_name(options.name or Path(loaded.source).name or "model")
    for method, value in gguf_arch.hyperparameters(config, arch):
        getattr(writer, method)(value)
    linear = Counter(t.qtype.name for t in tensors if t.linear)
    if linear:
        main = linear.most_common(1)[0][0]
        file_type = FILE_TYPES.get(main, f"MOSTLY_{main}")
        if file_type in LlamaFileType.__members__:
            writer.add_file_type(LlamaFileType[file_type])
    writer.add_quantization_version(2)
    if source_gguf is not None:
        gguf_vocab.copy_tokenizer_keys(source_gguf, writer, loaded.tokenizer)
    elif loaded.tokenizer is not None:
        gguf_vocab.write_hf_tokenizer(loaded.tokenizer, writer, int(config.vocab_size))
    else:
        raise ModelpressError("GGUF export needs the model's tokenizer; this model was loaded without one")
    for tensor in tensors:
        raw = tensor.qtype if tensor.qtype not in (Q.F32, Q.F16) else None
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_source(loaded: LoadedModel) -> Path | None:
    """The GGUF file the float model came from, when it did (its tokenizer keys are then copied)."""
    for candidate in (loaded.float_source, loaded.source):
        path = Path(candidate)
        if path.suffix == ".gguf" and path.is_file():
            return path
    return None


def copy_general_keys(source_gguf: Path, writer: GGUFWriter, skip: tuple[str, ...] = ()) -> None:
    """The source's descriptive keys (name, license, organization, ...), not those this export decides."""
    for key, vtype, sub_type, value in read_kv(source_gguf):
        if key.startswith("general.") and key not in OWN_GENERAL_KEYS + skip:
            writer.add_key_value(key, value, vtype, sub_type)

