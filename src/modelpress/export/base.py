"""What every exporter returns and how the command finds it.

An exporter writes one target format (a GGUF file, a compressed-tensors directory, ...) into a folder it is
given (a temporary one that the caller renames into place only when every target succeeded), and returns an
ExportResult: per layer, what it stored and whether that is bit for bit what modelpress evaluates. A layer
the target cannot hold exactly is re-rounded to the target's nearest type, never silently: the result then
carries the float weight the runtime will compute with (`runtime_weights`), so the caller can measure the
KL divergence of the export against our own model (measure.py).

Exporters register by name (`register_exporter`); the CLI's `--to` choices read this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modelpress.errors import ModelpressError


@dataclass(frozen=True)
class LayerExport:
    name: str            # module name in the model, e.g. model.layers.0.self_attn.q_proj
    source: str          # what modelpress holds: a scheme spec ("int4/g128") or a dtype ("float32")
    target: str          # what the export stores: "Q4_0", "F16", "pack-quantized int4 g128", ...
    lossless: bool       # the export decodes to exactly the weight modelpress evaluates
    reason: str = ""     # why it was re-rounded, when it was


@dataclass
class ExportResult:
    target: str                                  # the exporter's name: gguf, compressed-tensors, hf, peft
    files: list[str]                             # paths written, relative to the export's folder
    layers: list[LayerExport]
    file_bytes: int                              # all files written
    linear_bits_per_weight: float | None = None  # stored bits per weight of the linear layers, as the file has them
    notes: list[str] = field(default_factory=list)
    kl_divergence: float | None = None           # measured against our model when a layer was re-rounded
    # float (N, K) weights the runtime computes with, for every re-rounded layer (not serialised)
    runtime_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def lossless(self) -> bool:
        return all(layer.lossless for layer in self.layers)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("runtime_weights")
        data["lossless"] = self.lossless
        data["re_rounded_layers"] = sum(not layer.lossless for layer in self.layers)
        return data


@dataclass(frozen=True)
class ExportOptions:
    """Options shared by the exporters; each reads the ones that concern it."""

    gguf_float_type: str = "F16"       # GGUF type for float tensors that are matrices (embeddings, float layers)
    gguf_fallback: str = "nearest"     # GGML type for a layer with no lossless GGUF type ("nearest": by its bits)
    name: str | None = None            # model name written into the metadata (default: from the source)
    hf_dtype: str = "float16"          # float dtype of the hf export and the peft base: float16, bfloat16, float32


EXPORT_MARKER_FILE = "modelpress_export.json"   # in an export folder: {"float_source": ..., "source": ..., "target": ...}

Exporter = Callable[..., ExportResult]   # (loaded: LoadedModel, folder: Path, options: ExportOptions)

_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str):
    def decorate(function: Exporter) -> Exporter:
        if name in _EXPORTERS:
            raise ValueError(f"exporter {name!r} is already registered")
        _EXPORTERS[name] = function
        return function

    return decorate


def exporter(name: str) -> Exporter:
    load_exporters()
    try:
        return _EXPORTERS[name]
    except KeyError:
        raise ModelpressError(f"unknown export target {name!r}; choose from {', '.join(export_targets())}") from None


def export_targets() -> list[str]:
    load_exporters()
    return sorted(_EXPORTERS)


def load_exporters() -> None:
    """Import the exporter modules (each registers itself); cheap after the first call."""
    import importlib

    for module in EXPORTER_MODULES:
        importlib.import_module(f"modelpress.export.{module}")


EXPORTER_MODULES: tuple[str, ...] = ("gguf", "compressed_tensors", "hf", "peft")   # each exporter module adds its name


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def conv1d_names(model: torch.nn.Module) -> set[str]:
    """Where the model's plain architecture has a transformers Conv1D (GPT-2 style, weight (in, out)): a layer
    modelpress replaced no longer says, so an empty skeleton of the architecture is built to ask."""
    config = getattr(model, "config", None)
    if config is None:
        return set()
    from accelerate import init_empty_weights

    from modelpress.nn.layers import is_conv1d

    with init_empty_weights(include_buffers=False):
        skeleton = type(model)(config)
    return {name for name, module in skeleton.named_modules() if is_conv1d(module)}

