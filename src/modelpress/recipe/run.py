"""Running a recipe: each stage on the previous stage's saved model, each result kept, a killed run resumed.

Output directory:
    recipe.json                 the run's fingerprint: model, its weights' digest, the recipe, the data
    reference/                  the float model's distributions on the evaluation windows (eval/reference.py)
    stages/01-structured/       a finished stage, renamed into place whole (atomic): stage.json, model/
    stages/.02-gptq.resume/     a calibrated stage in progress: the engine's per-block state (engine/resume.py)
    stages/05-export/export/    an export stage's targets (only once the quality gate has passed)
    report.md, report.json, report.png
A stage is done when its folder exists. Every stage starts from the saved model of the last stage that
changed the model (the float model for the first), loaded from disk also in an uninterrupted run, so a run
resumed after a kill walks exactly the path an uninterrupted one does and writes the same bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelpress.api import Calibration, CalibrationSettings, EvalSettings, calibration_ids, prune_model, quantize_model
from modelpress.engine.resume import plain_data
from modelpress.errors import ModelpressError
from modelpress.eval.reference import (
    ReferenceCache,
    ReferenceLogits,
    model_fingerprint,
    reference_perplexity,
    score_against,
)
from modelpress.eval.size import measure_size
from modelpress.io.atomic import atomic_directory, atomic_file
from modelpress.io.model import LoadedModel, load_model
from modelpress.recipe.gate import GateResult, check_gate
from modelpress.recipe.stages import Export, Recipe, stage_name, stage_type

RECIPE_FILE = "recipe.json"
STAGE_FILE = "stage.json"


class GateFailed(ModelpressError):
    """The result missed the recipe's quality gate: nothing was exported. `report` says what and why."""

    def __init__(self, report: CompressReport) -> None:
        super().__init__(report.gate.describe() if report.gate else "quality gate missed")   # type: ignore[union-attr]
        self.report = report


@dataclass
class StageResult:
    index: int
    name: str
    kind: str
    config: dict
    seconds: float
    report: dict                       # the stage's own report (quantizer, pruner, training, export, evaluation)
    quality: dict | None = None        # perplexity, kl_divergence, top1_agreement, perplexity_ratio, ...
    size: dict | None = None           # weight_bytes, bits_per_weight, parameters

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CompressReport:
    model: str
    out: str
    reference: dict                                    # the float model's perplexity and size
    stages: list[StageResult] = field(default_factory=list)
    gate: GateResult | None = None
    seconds: float = 0.0
    resumed_stages: int = 0                            # stages found finished in `out` and not run again
    model_dir: str | None = None                       # the final model as saved (None: no stage changed it)
    loaded: LoadedModel | None = field(default=None, repr=False)   # the final model, from Python (not serialised)

    def to_json(self) -> dict:
        return {"model": self.model, "out": self.out, "reference": self.reference,
                "stages": [s.to_json() for s in self.stages],
                "gate": None if self.gate is None else self.gate.to_json(),
                "seconds": round(self.seconds, 2), "resumed_stages": self.resumed_stages, "model_dir": self.model_dir}


def compress_model(original: LoadedModel, recipe: Recipe, data: Calibration, out: str | Path) -> CompressReport:
    """Run `recipe` on `original` (left unchanged) into the directory `out`, resuming what `out` holds."""
    from modelpress.python_api import eval_windows
    from modelpress.recipe.report import write_reports

    from modelpress.algorithms.quantize import HeadConfig
    from modelpress.algorithms.quantize.head import check_head

    start = time.perf_counter()
    out = Path(out)
    for stage in recipe.stages:            # a head stage that must fail fails before the stages ahead of it run
        if isinstance(stage, HeadConfig):
            check_head(original.model, stage)
    fingerprint = model_fingerprint(original.model)
    needs_calibration = any(stage_type(s).calibrated for s in recipe.stages)
    ids, data_info = (calibration_ids(original.tokenizer, _calibration(recipe, data), original.model) if needs_calibration
                      else (None, None))
    stages = plain_data(dataclasses.replace(recipe, gate=None))   # the gate changes no output: relaxing it resumes
    _claim(out, {"model": original.source, "weights": fingerprint, "recipe": stages, "data": plain_data(data_info),
                 "calibration": None if ids is None else plain_data(ids)})
    cache = ReferenceCache(out / "reference")
    windows = eval_windows(original.tokenizer, recipe.evaluation.text, recipe.evaluation)[1].eval
    reference = cache.get(original.model, fingerprint, windows, recipe.reference_top_k)
    size = measure_size(original.model)
    report = CompressReport(original.source, str(out), {
        "perplexity": reference_perplexity(reference, recipe.evaluation.score), "weight_bytes": size.weight_bytes,
        "parameters": size.parameters})
    run = _Run(original, recipe, ids, data, out, cache, fingerprint, reference, report)
    for index, stage in enumerate(recipe.stages, 1):
        run.stage(index, stage)
    run.check_gate_once()
    report.model_dir = None if run.model_dir is None else str(run.model_dir)
    report.seconds = time.perf_counter() - start
    write_reports(report, out)
    return report


def final_model(report: CompressReport, original: LoadedModel) -> LoadedModel:
    """The model the run ended with: loaded from its stage folder (the float model if no stage changed it)."""
    if report.model_dir is None:
        return original
    return load_model(report.model_dir)


def _calibration(recipe: Recipe, data: Calibration) -> Calibration:
    """The data calibrated stages and training read: the recipe's settings, or what the caller gave."""
    if data is None:
        return recipe.calibration
    return dataclasses.replace(recipe.calibration, text=data) if isinstance(data, str) else data


def _claim(out: Path, fingerprint: dict) -> None:
    """Start `out`, or check that the run it holds is this one (same model, weights, recipe and data)."""
    fingerprint = json.loads(json.dumps(fingerprint))
    file = out / RECIPE_FILE
    if file.exists():
        try:
            saved = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelpressError(f"{file} is damaged ({err}); delete {out} to start over") from None
        if saved != fingerprint:
            changed = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
            raise ModelpressError(f"{out} holds a run of another {' and '.join(changed)}; give another output "
                                  f"directory or delete this one")
        return
    if out.exists() and any(out.iterdir()):
        raise ModelpressError(f"{out} exists and is not a compress run's directory; give a new or empty directory")
    with atomic_file(file) as handle:
        json.dump(fingerprint, handle, indent=1)


@dataclass
class _Run:
    original: LoadedModel
    recipe: Recipe
    ids: torch.Tensor | None
    data: Calibration
    out: Path
    cache: ReferenceCache
    fingerprint: str
    reference: ReferenceLogits
    report: CompressReport
    model_dir: Path | None = None          # the last saved model; None: the float model
    last_quality: dict | None = None
    gate_checked: bool = False

    def current(self) -> LoadedModel:
        """A fresh copy of the model the next stage starts from."""
        if self.model_dir is None:
            o = self.original
            return LoadedModel(copy.deepcopy(o.model), o.tokenizer, o.source, o.float_source)
        return load_model(str(self.model_dir))

    def stage(self, index: int, config: object) -> None:
        name, kind = stage_name(config), stage_type(config).kind
        folder = self.out / "stages" / f"{index:02d}-{name}"
        if (folder / STAGE_FILE).exists():
            result = _read_stage(folder)
            self.report.resumed_stages += 1
            shutil.rmtree(_resume_dir(folder), ignore_errors=True)   # killed between the rename and this clean-up
        else:
            if kind == "export":
                self.check_gate_once()
            start = time.perf_counter()
            with atomic_directory(folder, overwrite=folder.exists()) as tmp:
                result = StageResult(index, name, kind, plain_data(config), 0.0, {})   # type: ignore[arg-type]
                self._run(config, kind, folder, tmp, result)
                result.seconds = round(time.perf_counter() - start, 3)
                (tmp / STAGE_FILE).write_text(json.dumps(result.to_json(), indent=1))
            shutil.rmtree(_resume_dir(folder), ignore_errors=True)
        if (folder / "model").is_dir():
            self.model_dir = folder / "model"
        if result.quality is not None:
            self.last_quality = result.quality
        self.report.stages.append(result)

    def _run(self, config: object, kind: str, folder: Path, tmp: Path, result: StageResult) -> None:
        if kind == "export":
            from modelpress.export import export_model

            assert isinstance(config, Export)
            loaded = self.current()
            results = export_model(loaded, list(config.targets), tmp / "export", config.options(),
                                   windows=self.reference.windows)
            result.report = {"targets": [r.to_json() for r in results]}
            return
        if kind == "evaluate":
            assert isinstance(config, EvalSettings)
            loaded = self.current()
            result.report, result.quality = self.evaluate(loaded, config)
            result.size = _size(loaded)
            return
        loaded = self.current()
        if kind == "transform":
            from modelpress.algorithms.rotate import rotate_residual

            result.report = dataclasses.asdict(rotate_residual(loaded.model, config))   # type: ignore[arg-type]
        elif kind == "recover":
            from modelpress.train.recover import recover

            result.report = recover(loaded.model, config, self.original.model, self._ids())   # type: ignore[arg-type]
        else:
            function = prune_model if kind == "prune" else quantize_model
            result.report = function(loaded, config, self._calibration(folder)).to_json()
        loaded.model.eval()
        result.quality = _quality(score_against(loaded.model, self.reference, self.recipe.evaluation.score),
                                  self.report.reference["perplexity"])
        result.size = _size(loaded)
        from modelpress.io.save import save_compressed

        saved = LoadedModel(loaded.model, loaded.tokenizer, str(folder / "model"), self.original.float_source)
        save_compressed(saved, tmp / "model", report={"stage": result.name, **result.report})

    def _calibration(self, folder: Path) -> Calibration:
        """Settings holding the run's windows `ids` (cut, or sampled from the float model, once before the first
        stage) and the stage's resume directory: a killed calibrated stage goes on from its last block. Ids or
        texts given from Python go as they are (no mid-stage resume)."""
        data = _calibration(self.recipe, self.data)
        if isinstance(data, CalibrationSettings):
            return dataclasses.replace(data, resume_dir=str(_resume_dir(folder)), windows=self.ids)
        return self.ids

    def _ids(self) -> torch.Tensor:
        if self.ids is None:
            raise ModelpressError("this stage needs calibration windows")
        return self.ids

    def evaluate(self, loaded: LoadedModel, settings: EvalSettings) -> tuple[dict, dict]:
        """An explicit evaluate stage: its own windows (the reference's distributions cached for them too)."""
        from modelpress.eval.speed import measure_speed
        from modelpress.python_api import eval_windows

        source, windows = eval_windows(self.original.tokenizer, settings.text, settings)
        reference = self.cache.get(self.original.model, self.fingerprint, windows.eval, self.recipe.reference_top_k)
        quality = _quality(score_against(loaded.model, reference, settings.score),
                           reference_perplexity(reference, settings.score))
        details = {"text": f"{source.name} sha256:{source.digest}", "windows": int(windows.eval.shape[0]),
                   "seq_len": int(windows.eval.shape[1]), "score": settings.score}
        if settings.speed:
            speed = measure_speed(loaded.model, windows.eval[:1], settings.decode_tokens)
            details.update(prefill_tokens_per_s=speed.prefill_tokens_per_s,
                           decode_tokens_per_s=speed.decode_tokens_per_s)
        return details, quality

    def check_gate_once(self) -> None:
        """Before the first export (or at the end): the latest evaluation against the gate; a miss stops the run."""
        gate = self.recipe.gate
        if gate is None or self.gate_checked:
            return
        self.gate_checked = True
        if self.last_quality is None:
            raise ModelpressError("the quality gate needs a stage that changes the model before it")
        from modelpress.eval.quality import QualityResult

        q = self.last_quality
        quality = QualityResult(q["perplexity"], q["kl_divergence"], q["top1_agreement"], q["scored_tokens"],
                                q["windows"])
        reference_ppl = q["perplexity"] / q["perplexity_ratio"]
        verdict = check_gate(gate, quality, reference_ppl)
        if not verdict.passed:
            compressed = self.current().model
            verdict = check_gate(gate, quality, reference_ppl, self.original.model, compressed, self.reference)
        self.report.gate = verdict
        if not verdict.passed:
            from modelpress.recipe.report import write_reports

            write_reports(self.report, self.out)
            raise GateFailed(self.report)


def _resume_dir(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.resume"


def _quality(q, reference_ppl: float) -> dict:
    return {"perplexity": q.perplexity, "kl_divergence": q.kl_divergence, "top1_agreement": q.top1_agreement,
            "perplexity_ratio": q.perplexity / reference_ppl, "scored_tokens": q.scored_tokens, "windows": q.windows}


def _size(loaded: LoadedModel) -> dict:
    s = measure_size(loaded.model)
    return {"weight_bytes": s.weight_bytes, "bits_per_weight": s.bits_per_weight, "parameters": s.parameters}


def _read_stage(folder: Path) -> StageResult:
    try:
        return StageResult(**json.loads((folder / STAGE_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ModelpressError(f"{folder / STAGE_FILE} is damaged ({err}); delete {folder} to run the stage again"
                              ) from None
