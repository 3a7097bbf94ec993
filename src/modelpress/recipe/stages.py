"""What a recipe is made of: stage configs (frozen dataclasses) and the one table that names them.

A stage is any config registered with a kind of stage:
- prune:    algorithms/prune's PRUNERS        (magnitude, wanda, sparsegpt, structured, experts)
- quantize: algorithms/quantize's QUANTIZERS  (rtn, gptq, awq, awq-gptq, smoothquant, mixed)
- recover:  train/recover.py's RECOVERERS     (distill, lora, qat)
- transform: RotateConfig (algorithms/rotate.py), registered here as `rotate`: the same function, other weights
- evaluate: EvalSettings (api.py), registered here as `evaluate`
- export:   Export below, registered here as `export`
`stage_names()` reads those registries, so a method added there is a recipe stage with no edit here; the
YAML loader, `modelpress compress` and the reports name stages only through it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelpress.api import CalibrationSettings, EvalSettings
from modelpress.errors import ModelpressError

KINDS = ("transform", "prune", "quantize", "recover", "evaluate", "export")


@dataclass(frozen=True)
class Export:
    """Write the model to each target (gguf, compressed-tensors, hf, peft; export/) in the stage's folder.
    Runs only once the quality gate has passed."""

    targets: tuple[str, ...] = ("gguf", "compressed-tensors")
    gguf_float_type: str = "F16"
    gguf_fallback: str = "nearest"
    hf_dtype: str = "float16"

    def __post_init__(self) -> None:
        from modelpress.export.base import export_targets

        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        unknown = [t for t in self.targets if t not in export_targets()]
        if not self.targets or unknown:
            raise ModelpressError(f"export targets must be some of {', '.join(export_targets())}, got "
                                  f"{list(self.targets)}")
        if len(set(self.targets)) != len(self.targets):
            raise ModelpressError(f"export target given twice: {list(self.targets)}")

    def options(self):
        from modelpress.export.base import ExportOptions

        return ExportOptions(self.gguf_float_type, self.gguf_fallback, None, self.hf_dtype)


@dataclass(frozen=True)
class Gate:
    """The quality a result must reach before anything is exported: KL divergence against the float model at
    most `max_kl` (nats/token), perplexity at most `max_ppl_ratio` times the float model's, top-1 agreement at
    least `min_top1`. `attribution_layers`: how many of the layers that cost most KL a failure lists."""

    max_kl: float | None = None
    max_ppl_ratio: float | None = None
    min_top1: float | None = None
    attribution_layers: int = 10

    def __post_init__(self) -> None:
        if self.max_kl is None and self.max_ppl_ratio is None and self.min_top1 is None:
            raise ModelpressError("a gate needs at least one of max_kl, max_ppl_ratio, min_top1")
        if self.max_kl is not None and not self.max_kl >= 0:
            raise ModelpressError(f"max_kl must be >= 0, got {self.max_kl}")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio >= 1:
            raise ModelpressError(f"max_ppl_ratio must be >= 1 (a ratio to the float model's perplexity), got "
                                  f"{self.max_ppl_ratio}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ModelpressError(f"min_top1 must be in [0, 1], got {self.min_top1}")
        if not isinstance(self.attribution_layers, int) or self.attribution_layers < 0:
            raise ModelpressError(f"attribution_layers must be a non-negative integer, got {self.attribution_layers}")

    def misses(self, kl: float, ppl_ratio: float, top1: float) -> list[str]:
        """What the measured quality misses, one phrase each (empty: it passes)."""
        missed = []
        if self.max_kl is not None and not kl <= self.max_kl:
            missed.append(f"KL {kl:.4f} > max_kl {self.max_kl}")
        if self.max_ppl_ratio is not None and not ppl_ratio <= self.max_ppl_ratio:
            missed.append(f"perplexity ratio {ppl_ratio:.4f} > max_ppl_ratio {self.max_ppl_ratio}")
        if self.min_top1 is not None and not top1 >= self.min_top1:
            missed.append(f"top-1 agreement {top1:.4f} < min_top1 {self.min_top1}")
        return missed


def _evaluation_default() -> EvalSettings:
    return EvalSettings(windows=8, speed=False)


@dataclass(frozen=True)
class Recipe:
    """Ordered stages, the data they share and how each result is measured.
    `calibration`: the windows calibrated stages and training read (disjoint from the evaluation text);
    `evaluation`: how the model is scored after every stage (against the float model; the reference's
    distributions are computed once, exactly or as their `reference_top_k`); `gate`: see Gate."""

    stages: tuple = ()
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    evaluation: EvalSettings = field(default_factory=_evaluation_default)
    gate: Gate | None = None
    reference_top_k: int | None = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ModelpressError("a recipe needs at least one stage")
        for index, stage in enumerate(self.stages):
            stage_name(stage, f"stage {index + 1}")
        if self.calibration.resume_dir is not None:
            raise ModelpressError("calibration.resume_dir is set by the pipeline (its output directory); leave it out")
        if self.calibration.windows is not None:
            raise ModelpressError("calibration.windows is set by the pipeline (the windows it cuts once); give "
                                  "calibration.text, or token ids as the run's data from Python")
        if self.reference_top_k is not None and (not isinstance(self.reference_top_k, int) or self.reference_top_k < 1):
            raise ModelpressError(f"reference_top_k must be a positive integer or null, got {self.reference_top_k!r}")
        _check_pruned_widths(self.stages)


GGUF_BLOCK = 32     # every GGUF quantized type stores rows in whole blocks of 32 (k-quants: 256)


def _check_pruned_widths(stages: tuple) -> None:
    """Structured neuron pruning before a GGUF export must keep whole blocks of 32 inputs per row: a pruned
    down_proj with 1456 inputs has no quantized GGUF type and would be written as F16 (re-rounded, 3.5x the
    bytes). Refused before any work, with the value that works."""
    for index, stage in enumerate(stages):
        multiple = getattr(stage, "multiple_of", None)
        if stage_type(stage).kind != "prune" or getattr(stage, "target", None) != "neurons" or multiple is None:
            continue
        for later in stages[index + 1:]:
            if isinstance(later, Export) and "gguf" in later.targets and multiple % GGUF_BLOCK:
                raise ModelpressError(
                    f"stage {index + 1} ({stage_name(stage)}): multiple_of {multiple} keeps neuron counts that are "
                    f"not whole GGUF blocks of {GGUF_BLOCK}, and a later stage exports to gguf (pruned layers "
                    f"would be written as F16); set multiple_of to {math.lcm(multiple, GGUF_BLOCK)}")


@dataclass(frozen=True)
class StageType:
    kind: str                              # one of KINDS
    config_type: type
    fixed: Mapping[str, object]            # fields the name fixes (awq-gptq: solver="gptq")
    calibrated: bool = False               # reads the recipe's calibration windows


def stage_names() -> dict[str, StageType]:
    """Every stage name a recipe can use, read from the registries, in a fixed order."""
    from modelpress.algorithms.prune import PRUNERS
    from modelpress.algorithms.quantize import QUANTIZERS
    from modelpress.algorithms.rotate import RotateConfig
    from modelpress.train.recover import RECOVERERS

    names: dict[str, StageType] = {"rotate": StageType("transform", RotateConfig, {})}
    for config_type, pruner in PRUNERS.items():
        names[pruner.name] = StageType("prune", config_type, {}, pruner.calibrated)
    for config_type, quantizer in QUANTIZERS.items():
        names[quantizer.name] = StageType("quantize", config_type, {}, quantizer.calibrated)
        for variant, fixed in quantizer.variants.items():
            names[variant] = StageType("quantize", config_type, dict(fixed), quantizer.calibrated)
    for config_type, recoverer in RECOVERERS.items():
        names[recoverer.name] = StageType("recover", config_type, {}, True)
    names["evaluate"] = StageType("evaluate", EvalSettings, {})
    names["export"] = StageType("export", Export, {})
    return names


def stage_name(config: object, where: str = "stage") -> str:
    """The name a stage config stands for (a quantizer's variant when its fields say so)."""
    candidates = [(name, t) for name, t in stage_names().items() if t.config_type is type(config)]
    if not candidates:
        known = ", ".join(sorted({t.config_type.__name__ for t in stage_names().values()}))
        raise ModelpressError(f"{where}: {type(config).__name__} is not a stage config; stages take {known}")
    for name, t in candidates:
        if t.fixed and all(getattr(config, k) == v for k, v in t.fixed.items()):
            return name
    return next(name for name, t in candidates if not t.fixed)


def stage_type(config: object) -> StageType:
    return stage_names()[stage_name(config)]


def config_fields(config_type: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_type)}
