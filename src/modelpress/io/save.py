"""Saving and loading compressed models: safetensors + JSON, never pickle.

A saved directory holds
- model.safetensors   every tensor of the model; compressed layers as their packed tensors
                      (`<layer>.qdata`, `<layer>.scale`, ...); tied tensors stored once
- modelpress.json     what each compressed layer is (kind, scheme, shape), tied names, the float model it
                      was made from, and the report of the run that made it
- config.json + tokenizer files, as transformers writes them
Loading rebuilds the architecture from config.json with empty weights, swaps in empty compressed layers
from modelpress.json, and assigns the stored tensors: nothing is randomly initialised and then thrown away.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import modelpress
from modelpress.errors import ModelpressError
from modelpress.io.atomic import atomic_directory
from modelpress.io.model import MODELPRESS_FILE, LoadedModel, is_causal_lm
from modelpress.nn.layers import replace_module
from modelpress.nn.registry import compressed_module_kind, module_for_kind

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def save_compressed(loaded: LoadedModel, out_dir: str | Path, overwrite: bool = False,
                    report: dict | None = None) -> Path:
    model = loaded.model
    layers = {}
    for name, module in model.named_modules():
        kind = compressed_module_kind(module)
        if kind is not None:
            layers[name] = {"kind": kind, **module.record()}
    tensors, tied = _dedupe_tied(model.state_dict())
    meta = {
        "format_version": FORMAT_VERSION,
        "library": f"modelpress {modelpress.__version__}",
        "model_class": "causal_lm" if is_causal_lm(model.config) else "base",
        "float_source": loaded.float_source,
        "layers": layers,
        "tied": tied,
        "report": report or {},
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "producer": "modelpress"})
        (tmp / MODELPRESS_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return Path(out_dir)


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    seen: dict[tuple, str] = {}
    kept, tied = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor
    return kept, tied


def read_metadata(path: str | Path) -> dict:
    file = Path(path) / MODELPRESS_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelpressError(f"{path} is not a saved modelpress model (no {MODELPRESS_FILE})") from None
    except json.JSONDecodeError as err:
        raise ModelpressError(f"{file} is corrupt: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelpressError(f"{file} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def load_compressed(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ModelpressError(f"cannot read {path / WEIGHTS_FILE}: {err}") from None
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if meta["model_class"] == "causal_lm" else AutoModel
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config)
    for name, record in meta["layers"].items():
        replace_module(model, name, module_for_kind(record["kind"]).from_record(record, device="meta"))
    for name, original in meta["tied"].items():
        tensors[name] = tensors[original]
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise ModelpressError(f"{path / WEIGHTS_FILE} does not match {MODELPRESS_FILE}: {err}") from None
    left = [n for n, t in _all_tensors(model) if t.is_meta]
    if left:
        raise ModelpressError(f"{path}: tensors missing from {WEIGHTS_FILE}: {left[:5]}")
    for kind in sorted({record["kind"] for record in meta["layers"].values()}):
        prepare = getattr(module_for_kind(kind), "prepare_model", None)  # e.g. QuantExperts: eager expert loop
        if prepare is not None:
            prepare(model)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return LoadedModel(model.to(device), tokenizer, source=str(path), float_source=meta["float_source"])


def _all_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()
