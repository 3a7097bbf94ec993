"""modelpress: make trained models smaller and faster, and measure what it costs.

The Python API (docs/api.md), imported on first use so that `import modelpress` stays cheap:

    load(spec=None) -> LoadedModel                   quantize(model, GPTQ("int4/g128"), calibration=...)
    rotate(model, Rotate()) -> RotationReport        (the residual stream rotated into the weights)
    prune(model, SparseGPT(0.5), calibration=...)    evaluate(model, reference=..., text=...) -> EvalReport
    save(model, path)                                export(model, ["gguf"], path)
    compress(model, Recipe([Structured(...), GPTQ("int4/g32"), LoRA(), Evaluate(), Export()]), data, out)
    generate(model, "prompt", GenerationSettings(max_new_tokens=64), draft="int4/g32") -> GenerationResult
    with session(model, settings, draft="int4/g32") as s: s.generate("prompt")   (prepared once, graphs kept)

Configs: Rotate (a recipe stage too), RTN, GPTQ, AWQ, SmoothQuant, FP8Dynamic, Mixed, Head (the output head; quantizers, registered in algorithms/quantize) and Magnitude,
Wanda, SparseGPT, Structured, ExpertPrune (pruners, algorithms/prune). `modelpress.export` is also the
exporters' package; calling it exports (see export/__init__.py). `ModelpressConfig` (modelpress.hf) is the
transformers quantization config: using it, or importing modelpress.hf, registers the "modelpress" method.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, str | None]] = {
    "load": ("modelpress.python_api", "load"),
    "quantize": ("modelpress.python_api", "quantize"),
    "rotate": ("modelpress.python_api", "rotate"),
    "prune": ("modelpress.python_api", "prune"),
    "evaluate": ("modelpress.python_api", "evaluate"),
    "save": ("modelpress.python_api", "save"),
    "export": ("modelpress.export", None),           # the package, callable (export/__init__.py)
    "compress": ("modelpress.python_api", "compress"),
    "generate": ("modelpress.python_api", "generate"),
    "session": ("modelpress.python_api", "session"),
    "DecodeSession": ("modelpress.inference.session", "DecodeSession"),
    "GenerationSettings": ("modelpress.inference.decoding", "GenerationSettings"),
    "SamplingConfig": ("modelpress.inference.sampling", "SamplingConfig"),
    "SpeculativeConfig": ("modelpress.inference.speculative", "SpeculativeConfig"),
    "Recipe": ("modelpress.recipe.stages", "Recipe"),
    "Gate": ("modelpress.recipe.stages", "Gate"),
    "Export": ("modelpress.recipe.stages", "Export"),
    "Evaluate": ("modelpress.api", "EvalSettings"),
    "Distill": ("modelpress.train.recover", "Distill"),
    "LoRA": ("modelpress.train.recover", "LoRA"),
    "QAT": ("modelpress.train.recover", "QAT"),
    "RTN": ("modelpress.algorithms.quantize", "RTNConfig"),
    "GPTQ": ("modelpress.algorithms.quantize", "GPTQConfig"),
    "AWQ": ("modelpress.algorithms.quantize", "AWQConfig"),
    "SmoothQuant": ("modelpress.algorithms.quantize", "SmoothQuantConfig"),
    "FP8Dynamic": ("modelpress.algorithms.quantize", "Fp8DynamicConfig"),
    "Mixed": ("modelpress.algorithms.quantize", "MixedConfig"),
    "Head": ("modelpress.algorithms.quantize", "HeadConfig"),
    "Rotate": ("modelpress.algorithms.rotate", "RotateConfig"),
    "Magnitude": ("modelpress.algorithms.prune", "MagnitudeConfig"),
    "Wanda": ("modelpress.algorithms.prune", "WandaConfig"),
    "SparseGPT": ("modelpress.algorithms.prune", "SparseGPTConfig"),
    "Structured": ("modelpress.algorithms.prune", "StructuredConfig"),
    "ExpertPrune": ("modelpress.algorithms.prune", "ExpertPruneConfig"),
    "CalibrationSettings": ("modelpress.api", "CalibrationSettings"),
    "EvalSettings": ("modelpress.api", "EvalSettings"),
    "EvalReport": ("modelpress.api", "EvalReport"),
    "QuantizeReport": ("modelpress.api", "QuantizeReport"),
    "PruningReport": ("modelpress.api", "PruningReport"),
    "LoadedModel": ("modelpress.io.model", "LoadedModel"),
    "WeightScheme": ("modelpress.formats.scheme", "WeightScheme"),
    "ExportOptions": ("modelpress.export.base", "ExportOptions"),
    "plan": ("modelpress.planner", "plan_model"),
    "Budget": ("modelpress.planner", "Budget"),
    "ModelpressConfig": ("modelpress.hf", "ModelpressConfig"),   # importing modelpress.hf registers it (hf.py)
    "hf": ("modelpress.hf", None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'modelpress' has no attribute {name!r}") from None
    imported = importlib.import_module(module)
    return imported if attribute is None else getattr(imported, attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from modelpress.algorithms.prune import ExpertPruneConfig as ExpertPrune
    from modelpress.algorithms.prune import MagnitudeConfig as Magnitude
    from modelpress.algorithms.prune import SparseGPTConfig as SparseGPT
    from modelpress.algorithms.prune import StructuredConfig as Structured
    from modelpress.algorithms.prune import WandaConfig as Wanda
    from modelpress.algorithms.quantize import AWQConfig as AWQ
    from modelpress.algorithms.quantize import Fp8DynamicConfig as FP8Dynamic
    from modelpress.algorithms.quantize import GPTQConfig as GPTQ
    from modelpress.algorithms.quantize import HeadConfig as Head
    from modelpress.algorithms.quantize import MixedConfig as Mixed
    from modelpress.algorithms.quantize import RTNConfig as RTN
    from modelpress.algorithms.quantize import SmoothQuantConfig as SmoothQuant
    from modelpress.algorithms.rotate import RotateConfig as Rotate
    from modelpress.api import CalibrationSettings, EvalReport, EvalSettings, PruningReport, QuantizeReport
    from modelpress.export.base import ExportOptions
    from modelpress.formats.scheme import WeightScheme
    from modelpress.hf import ModelpressConfig
    from modelpress.io.model import LoadedModel
    from modelpress.api import EvalSettings as Evaluate
    from modelpress.planner import Budget
    from modelpress.planner import plan_model as plan
    from modelpress.inference.decoding import GenerationSettings
    from modelpress.inference.sampling import SamplingConfig
    from modelpress.inference.speculative import SpeculativeConfig
    from modelpress.inference.session import DecodeSession
    from modelpress.python_api import compress, evaluate, generate, load, prune, quantize, rotate, save, session
    from modelpress.recipe.stages import Export, Gate, Recipe
    from modelpress.train.recover import QAT, Distill, LoRA
