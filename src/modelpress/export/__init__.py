"""Export a compressed model to the formats runtimes load: GGUF (llama.cpp, Ollama), compressed-tensors
(transformers, vLLM), plain float HF directories, PEFT adapters.

    export_model(loaded, ["gguf", "compressed-tensors"], "out/")  ->  out/gguf/..., out/compressed-tensors/...

Every target goes into its own folder of one output directory, written atomically (all targets or none),
with `export.json` saying per layer what each target stored and whether it is lossless; a target that had
to re-round a layer carries the KL divergence that cost, measured against our own model.

`modelpress.export` is this package, and calling it is the Python API's export (python_api.export):
`modelpress.export(model, ["gguf"], "out/")`. A function of that name in `modelpress` could not work: importing
this package binds the name `export` in `modelpress` to the package, whatever was there before.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch

from modelpress.errors import ModelpressError
from modelpress.export.base import (EXPORT_MARKER_FILE, ExportOptions, ExportResult, LayerExport, export_targets,
                                   exporter, register_exporter)
from modelpress.export.measure import export_kl
from modelpress.io.atomic import atomic_directory
from modelpress.io.model import LoadedModel

REPORT_FILE = "export.json"

__all__ = ["ExportOptions", "ExportResult", "LayerExport", "export_model", "export_targets", "register_exporter"]


def export_model(loaded: LoadedModel, targets: Sequence[str], out: str | Path, options: ExportOptions = ExportOptions(),
                 overwrite: bool = False, windows: torch.Tensor | None = None) -> list[ExportResult]:
    """Write each target into out/<target>/; `windows` (token ids, (W, T)) measure re-rounded targets' KL."""
    if not targets:
        raise ModelpressError(f"nothing to export: name at least one target ({', '.join(export_targets())})")
    if len(set(targets)) != len(targets):
        raise ModelpressError(f"export target given twice: {list(targets)}")
    functions = [exporter(target) for target in targets]  # unknown names fail before any work
    check_finite_model(loaded.model)
    results = []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for target, function in zip(targets, functions):
            folder = tmp / target
            folder.mkdir()
            result = function(loaded, folder, options)
            write_marker(folder, loaded, target)
            if result.runtime_weights and windows is not None:
                result.kl_divergence = export_kl(loaded.model, result.runtime_weights, windows)
            results.append(result)
        report = {"source": loaded.source, "float_source": loaded.float_source,
                  "targets": [result.to_json() for result in results]}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return results


def write_marker(folder: Path, loaded: LoadedModel, target: str) -> None:
    """Each target's folder names the float model it descends from, so `modelpress eval` compares against it."""
    marker = folder / EXPORT_MARKER_FILE
    if not marker.exists():
        marker.write_text(json.dumps({"float_source": loaded.float_source, "source": loaded.source, "target": target}))


def check_finite_model(model: torch.nn.Module) -> None:
    """Refuse to export a model whose float tensors hold NaN or Inf (packed codes cannot)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelpressError(f"{name} has {bad} NaN/Inf values; refusing to export a broken model")


class _CallablePackage(types.ModuleType):
    """This package, callable as `modelpress.export(model, targets, path, ...)`: python_api.export."""

    def __call__(self, *args, **kwargs) -> list[ExportResult]:
        from modelpress.python_api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
