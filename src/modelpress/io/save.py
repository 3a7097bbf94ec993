"""Saving and loading compressed models: safetensors + JSON, never pickle.

A saved directory holds
- model.safetensors   every tensor of the model; compressed layers as their packed tensors
                      (`<layer>.qdata`, `<layer>.scale`, ...); tied tensors stored once
- modelpress.json     what each compressed layer is (kind, scheme, shape), tied names, the float model it
                      was made from, the size and sha256 of model.safetensors (`files`, see io/integrity.py)
                      and the report of the run that made it
- config.json + tokenizer files, as transformers writes them; config.json's `quantization_config` names the
                      "modelpress" method with the same layer records, so that transformers'
                      `from_pretrained` loads the directory once modelpress.hf is imported (hf.py)
Loading rebuilds the architecture from config.json with empty weights, swaps in empty compressed layers
from modelpress.json, and assigns the stored tensors: nothing is randomly initialised and then thrown away.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError   # transformers' configs validate through it
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import modelpress
from modelpress.errors import ModelpressError
from modelpress.io.atomic import atomic_directory
from modelpress.io.integrity import check_tensors_match, describe_files, verify_files
from modelpress.io.model import MODELPRESS_FILE, LoadedModel, check_remote_code, first_line, is_causal_lm, read_json
from modelpress.nn.layers import replace_module
from modelpress.nn.registry import compressed_module_kind, module_for_kind

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CHECKED_FILES = (WEIGHTS_FILE, "config.json")   # recorded in `files`: a changed value in either changes the model


def save_compressed(loaded: LoadedModel, out_dir: str | Path, overwrite: bool = False,
                    report: dict | None = None) -> Path:
    model = loaded.model
    if not getattr(model.config, "architectures", None):   # a model built from its config: as save_pretrained does
        model.config.architectures = [type(model).__name__]
    layers = {}
    for name, module in model.named_modules():
        kind = compressed_module_kind(module)
        if kind is not None:
            layers[name] = {"kind": kind, **module.record()}
    state = model.state_dict()
    streamed = {n for n, t in state.items() if t.is_meta}     # blocks a streamed run left on disk (engine/stream.py)
    tensors, tied = _dedupe_tied({n: t for n, t in state.items() if n not in streamed})
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
        if layers:
            config.quantization_config = hf_quantization_config(layers)
        try:
            config.save_pretrained(tmp)
        finally:
            if layers:
                del config.quantization_config
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if streamed:
            _save_streamed(model, {n: t for n, t in state.items() if n in tensors or n in streamed},
                           tmp / WEIGHTS_FILE)
        else:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt", "producer": "modelpress"})
        meta["files"] = describe_files(tmp, list(CHECKED_FILES))
        (tmp / MODELPRESS_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return Path(out_dir)


HF_QUANT_METHOD = "modelpress"   # the quantization method modelpress.hf registers with transformers


def hf_quantization_config(layers: dict[str, dict]) -> dict:
    """config.json's `quantization_config` for a saved model (modelpress.hf.ModelpressConfig reads it)."""
    return {"quant_method": HF_QUANT_METHOD, "scheme": None, "skip": [], "layers": layers}


def _save_streamed(model: nn.Module, specs: dict[str, torch.Tensor], file: Path) -> None:
    """model.safetensors written tensor by tensor; meta tensors read back from the blocks' files."""
    from modelpress.engine.stream import source_of
    from modelpress.io.streamed_safetensors import write_streamed

    source = source_of(model)
    stored = getattr(source, "stored_tensor", None)
    if stored is None:
        raise ModelpressError("the model has weights on the meta device and no streamed source holding them; "
                              "only a model opened with --stream (engine/stream.py) can be saved that way")
    write_streamed(file, specs, lambda name: specs[name] if not specs[name].is_meta else stored(name),
                   metadata={"format": "pt", "producer": "modelpress"})


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
    if not file.exists():
        raise ModelpressError(f"{path} is not a saved modelpress model (no {MODELPRESS_FILE})")
    meta = read_json(file)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelpressError(f"{file} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    check_metadata(meta, file)
    return meta


METADATA_FIELDS = {"model_class": str, "float_source": str, "layers": dict, "tied": dict}
RECORD_ERRORS = (LookupError, TypeError, ValueError, AttributeError, ArithmeticError)   # a record of wrong types


def check_metadata(meta: dict, file: Path) -> None:
    """Every field loading relies on is there with the right type; every layer names a known kind."""
    for key, kind in METADATA_FIELDS.items():
        if not isinstance(meta.get(key), kind):
            found = repr(meta.get(key))[:60]
            raise ModelpressError(f"{file} is damaged: `{key}` should be a {kind.__name__}, found {found}")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        raise ModelpressError(f"{file} is damaged: `files` should map file names to their size and sha256")
    for name, record in meta["layers"].items():
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            raise ModelpressError(f"{file} is damaged: layer {name} has no `kind`")
        try:
            module_for_kind(record["kind"])
        except ModelpressError as err:
            raise ModelpressError(f"{file}: layer {name}: {err}") from None


# what transformers raises on a config.json whose values it cannot build a model from (a zero head count, a
# string where a number goes, an odd head_dim...): found by tests/io/test_fuzz.py, one type per kind of value
CONFIG_ERRORS = (OSError, ValueError, LookupError, TypeError, ArithmeticError, AttributeError, RuntimeError,
                 StrictDataclassError)


def read_config(path: Path, trust_remote_code: bool = False):
    """The transformers config of a saved directory, or an error naming its config.json."""
    from transformers import AutoConfig

    read_json(path / "config.json")   # invalid JSON is named as such
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except CONFIG_ERRORS as err:
        raise ModelpressError(f"{path / 'config.json'} does not describe a model transformers knows: "
                              f"{first_line(err)}") from None


def build_empty_model(path: Path, config, model_class: str, trust_remote_code: bool = False) -> nn.Module:
    """The architecture of config.json with empty (meta) weights, or an error naming config.json."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if model_class == "causal_lm" else AutoModel
    try:
        with init_empty_weights(include_buffers=False):
            return auto.from_config(config, trust_remote_code=trust_remote_code)
    except CONFIG_ERRORS as err:
        raise ModelpressError(f"{path / 'config.json'} does not describe a model that can be built "
                              f"({type(err).__name__}: {first_line(err)}); restore it or save the model again"
                              ) from None


def install_layer(model: nn.Module, name: str, record: dict, file: Path) -> None:
    """Swap an empty compressed layer in for `name`; an error names a layer the model does not have."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is None or (child not in parent._modules and child not in parent._parameters):
        raise ModelpressError(f"{file} names layer {name}, which the model in config.json does not have")
    try:
        module = module_for_kind(record["kind"]).from_record(record, device="meta")
    except RECORD_ERRORS as err:
        raise ModelpressError(f"{file} is damaged: layer {name}'s record does not build a "
                              f"{record['kind']} ({type(err).__name__}: {first_line(err)})") from None
    replace_module(model, name, module)


def load_compressed(path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                    verify_checksums: bool = False) -> LoadedModel:
    """Load a saved directory; its own code (an auto_map in config.json) runs only with trust_remote_code.
    Files are checked against their recorded sizes (and, with verify_checksums, sha256: ~0.5 s per 200 MB on
    one core, +10-35% of a load, hence off by default), every tensor against its layer's record."""
    from transformers import AutoTokenizer

    path = Path(path)
    trust_remote_code = bool(trust_remote_code)   # never None: None makes transformers prompt on stdin
    check_remote_code(path, trust_remote_code)
    meta = read_metadata(path)
    files = meta.get("files", {})   # sizes always for the weights; config.json (which people edit) with checksums
    verify_files(path, files if verify_checksums else {k: v for k, v in files.items() if k == WEIGHTS_FILE},
                 checksums=verify_checksums)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ModelpressError(f"cannot read {path / WEIGHTS_FILE}: {err}") from None
    config = read_config(path, trust_remote_code)
    qconfig = getattr(config, "quantization_config", None)
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == HF_QUANT_METHOD:
        del config.quantization_config   # the layers come from modelpress.json; a later export must not carry it
    model = build_empty_model(path, config, meta["model_class"], trust_remote_code)
    for name, record in meta["layers"].items():
        install_layer(model, name, record, path / MODELPRESS_FILE)
    for name, original in meta["tied"].items():
        if original not in tensors:
            raise ModelpressError(f"{path / MODELPRESS_FILE} ties {name} to {original}, which {WEIGHTS_FILE} lacks")
        tensors[name] = tensors[original]
    check_tensors_match(model, tensors, meta["layers"], path / WEIGHTS_FILE)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise ModelpressError(f"{path / WEIGHTS_FILE} does not match {MODELPRESS_FILE}: {first_line(err)}") from None
    left = [n for n, t in _all_tensors(model) if t.is_meta]
    if left:
        raise ModelpressError(f"{path}: tensors missing from {WEIGHTS_FILE}: {left[:5]}")
    _retie(model, meta["tied"])
    for kind in sorted({record["kind"] for record in meta["layers"].values()}):
        prepare = getattr(module_for_kind(kind), "prepare_model", None)  # e.g. QuantExperts: eager expert loop
        if prepare is not None:
            prepare(model)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return LoadedModel(model.to(device), tokenizer, source=str(path), float_source=meta["float_source"])


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """load_state_dict(assign=True) gives each name its own Parameter, even over one storage; tied names get
    their original's Parameter back, so the model is tied as it was (an exporter or optimizer that walks
    named_parameters() then sees one tensor, not two: a GGUF export would otherwise write the head twice).
    Tied buffers (a QuantEmbedding sharing its packed table with the head) get the original's tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, original in tied.items():
        owner, _, attr = name.rpartition(".")
        if name in params and original in params:
            setattr(model.get_submodule(owner), attr, params[original])
        elif name in buffers and original in buffers:
            model.get_submodule(owner)._buffers[attr] = buffers[original]


def _all_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()
