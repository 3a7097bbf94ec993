"""Orchestration: quantize, evaluate and compare. The math lives in formats/ and algorithms/, the measuring
in eval/; this file only wires them together for the CLI and for Python users."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from modelpress.engine.states import offload_policy
from modelpress.errors import ModelpressError
from modelpress.eval.quality import evaluate_quality, first_scored
from modelpress.eval.size import measure_size
from modelpress.eval.speed import measure_speed
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.corpora import mix_parts
from modelpress.io.generated import GENERATED, generated_windows
from modelpress.io.text import (TextSource, TokenWindows, check_bos_mode, load_text, make_windows, tokenizer_bos,
                                window_stride)
from modelpress.nn.layers import DEFAULT_SKIP


@dataclass
class EvalReport:
    model: str
    reference: str | None
    text: str
    windows: int
    seq_len: int
    perplexity: float
    kl_divergence: float | None
    top1_agreement: float | None
    weight_bytes: int
    bits_per_weight: float | None
    parameters: int
    quantized_weight_bytes: int
    quantized_parameters: int
    reference_perplexity: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    bos: bool = False                  # every window started with the tokenizer's BOS token
    bos_mode: str = "overwrite"        # how text follows that BOS (io/text.py): llama.cpp's "overwrite" or "prepend"
    score: str = "all"                 # scored positions: "all" but the first, or llama.cpp's "second-half"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalSettings:
    """`bos`: start every window with the BOS token when the tokenizer adds one, `bos_mode`: llama.cpp's
    "overwrite" or "prepend" (io/text.py); `score`: which
    positions are scored (eval/quality.py: "all" or llama.cpp's "second-half"); `tasks`: lm-eval task files or
    names whose accuracy joins the report (`extra["tasks"]`, eval/tasks.py; needs the `tasks` extra)."""

    text: str | None = None
    windows: int = 40
    seq_len: int = 512
    speed: bool = True
    decode_tokens: int = 32
    bos: bool = True
    bos_mode: str = "overwrite"
    score: str = "all"
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        first_scored(self.seq_len, self.score)      # validates the name
        check_bos_mode(self.bos_mode)
        if isinstance(self.tasks, str):
            raise ModelpressError(f"tasks is a tuple of task files or names, e.g. ({self.tasks!r},)")


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration data for methods that need it (gptq). Windows are cut after the first `eval_tokens` tokens
    of the text, so they never overlap the evaluation windows (40 x 512 tokens by default)."""

    text: str | None = None
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    device: str = "cpu"
    resume_dir: str | None = None
    eval_tokens: int = 40 * 512
    bos: bool = True                   # start every window with the BOS token when the tokenizer adds one
    bos_mode: str = "overwrite"        # how text follows that BOS (io/text.py), as for evaluation
    offload_hidden: bool | None = None  # hidden states between blocks in host memory; None: when the GPU is short
    # token ids already cut from these settings (a recipe cuts, or samples, them once for all its stages)
    windows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_bos_mode(self.bos_mode)


def calibration_windows(tokenizer, settings: CalibrationSettings, model: nn.Module | None = None) -> torch.Tensor:
    """(samples, seq_len) token ids for calibration, disjoint from the evaluation windows; text `generated`:
    windows sampled from `model` itself (io/generated.py), which must then be given, still in float."""
    if settings.windows is not None:
        return settings.windows
    if tokenizer is None:
        raise ModelpressError("the model has no tokenizer; calibration needs one to cut text into windows")
    parts = mix_parts(settings.text) if settings.text else None
    names = [settings.text] if parts is None else list(parts)
    if GENERATED in names and model is None:
        raise ModelpressError("calibration text 'generated' is sampled from the model: pass the model")
    bos = tokenizer_bos(tokenizer) if settings.bos else None
    step = window_stride(settings.seq_len, bos, settings.bos_mode)     # text tokens from one window to the next
    reserved = -(-settings.eval_tokens // step)               # whole calibration windows covering the eval text
    share = -(-settings.samples // len(names))                # a generated part samples only its turns
    # a mix: each corpus cut after its own evaluation windows, then one window of each in turn
    each = [generated_windows(model, tokenizer, share, settings.seq_len, device=settings.device) if name == GENERATED
            else make_windows(tokenizer, load_text(name), settings.seq_len, reserved, settings.samples, bos,
                              settings.bos_mode).calibration for name in names]
    if parts is None:
        return each[0]
    return interleave(each, settings.samples)


def interleave(parts: list[torch.Tensor], count: int) -> torch.Tensor:
    """Up to `count` rows taken in turn from each (n_i, L) tensor: row 0 of each, then row 1 of each, ...;
    a part that runs out leaves its turns to the others."""
    rows = [part[i] for i in range(max(p.shape[0] for p in parts)) for part in parts if i < part.shape[0]]
    return torch.stack(rows[:count])


Calibration = CalibrationSettings | torch.Tensor | Sequence[str] | str | None
"""Calibration data as the Python API takes it: settings (a text file, the default corpus), token ids
(samples, seq_len), texts (joined, cut into windows of up to 512 tokens; needs a tokenizer) or a text file."""


def calibration_ids(tokenizer, calibration: Calibration, model: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """Token ids (samples, seq_len) and their description for the report (`model`: for text `generated`)."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.is_floating_point() or calibration.numel() == 0:
            raise ModelpressError(f"calibration token ids must be a non-empty integer tensor (samples, seq_len), "
                                  f"got {calibration.dtype} of shape {tuple(calibration.shape)}")
        ids, text = calibration.long(), "token ids"
    elif calibration is None or isinstance(calibration, (CalibrationSettings, str)):
        settings = calibration if isinstance(calibration, CalibrationSettings) else CalibrationSettings(calibration)
        ids, text = calibration_windows(tokenizer, settings, model), settings.text or "default"
    else:
        ids, text = text_windows(tokenizer, list(calibration), CalibrationSettings()), "texts"
    return ids, {"text": text, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}


def text_windows(tokenizer, texts: list[str], settings: CalibrationSettings) -> torch.Tensor:
    """Texts joined by blank lines and cut into up to `settings.samples` windows of up to `settings.seq_len`
    tokens (shorter when all the text is less than one window)."""
    if tokenizer is None:
        raise ModelpressError("calibration texts need a tokenizer: pass tokenizer=, or give token ids")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ModelpressError("calibration texts must be a non-empty list of strings")
    source = TextSource(f"{len(texts)} calibration texts", "\n\n".join(texts))
    bos = tokenizer_bos(tokenizer) if settings.bos else None
    tokens = len(tokenizer(source.text, add_special_tokens=False)["input_ids"])
    seq_len = min(settings.seq_len, tokens + (bos is not None))
    return make_windows(tokenizer, source, seq_len, 0, settings.samples, bos, settings.bos_mode).calibration


@dataclass(frozen=True)
class QuantizeReport:
    method: str                       # the registered method name (algorithms/quantize)
    scheme: str                       # the scheme spec, or "mixed"
    layers: int                       # linear layers quantized
    seconds: float
    calibration: dict | None          # text, samples, seq_len; None for methods without calibration
    details: dict                     # the method's own summary

    def to_json(self) -> dict:
        calibration = {} if self.calibration is None else {"calibration": self.calibration}
        return {"method": self.method, "scheme": self.scheme, "layers": self.layers, "seconds": self.seconds,
                **calibration, **self.details}


def quantize_model(loaded: LoadedModel, config, calibration: Calibration = None,
                   head: WeightScheme | str | None = None) -> QuantizeReport:
    """Quantize `loaded.model` in place as `config` says: one of the registered quantizer configs
    (algorithms/quantize: RTNConfig, GPTQConfig, AWQConfig, SmoothQuantConfig, MixedConfig, HeadConfig).
    `head`: a scheme for the output head (and the embedding tied to it), quantized round-to-nearest after
    the method ran; its report joins the method's details under "head". None leaves the head float."""
    from modelpress.algorithms.quantize import HeadConfig
    from modelpress.algorithms.quantize.head import check_head

    head_config = None if head is None else HeadConfig(head)    # a bad spec fails before any work
    if head_config is not None:
        check_head(loaded.model, head_config)                   # so does a head it cannot take
    report = _quantize_once(loaded, config, calibration)
    if head_config is None:
        return report
    head_report = _quantize_once(loaded, head_config, None)
    return dataclasses.replace(report, seconds=round(report.seconds + head_report.seconds, 3),
                               details={**report.details, **head_report.details})


def _quantize_once(loaded: LoadedModel, config, calibration: Calibration) -> QuantizeReport:
    from modelpress.algorithms.quantize import method_of, quantizer_for

    quantizer = quantizer_for(config)
    settings = calibration if isinstance(calibration, CalibrationSettings) else CalibrationSettings()
    if settings.resume_dir is not None and not quantizer.resumable:
        raise ModelpressError(f"{method_of(config)} runs in one short pass and cannot resume; drop --resume")
    ids, info = calibration_ids(loaded.tokenizer, calibration, loaded.model) if quantizer.calibrated else (None, None)
    start = time.perf_counter()
    with offload_policy(settings.offload_hidden):
        run = quantizer.run(loaded.model, config, ids, settings.device, settings.resume_dir, settings.batch_size)
    return QuantizeReport(run.method or method_of(config), run.scheme, run.layers, round(time.perf_counter() - start, 3), info,
                          run.details)


@dataclass(frozen=True)
class PruningReport:
    report: object                    # the method's own typed report (PruneReport, StructuredReport, ExpertReport)
    seconds: float
    calibration: dict | None          # text, samples, seq_len; None for methods without calibration

    def to_json(self) -> dict:
        calibration = {} if self.calibration is None else {"calibration": self.calibration}
        return {**self.report.summary(), "seconds": self.seconds, **calibration}


def prune_model(loaded: LoadedModel, config, calibration: Calibration = None) -> PruningReport:
    """Prune `loaded.model` in place; `config` is one of algorithms/prune's configs (magnitude, Wanda,
    SparseGPT, structured, experts)."""
    from modelpress.algorithms.prune import prune, pruner_for

    settings = calibration if isinstance(calibration, CalibrationSettings) else CalibrationSettings()
    ids, info = (calibration_ids(loaded.tokenizer, calibration, loaded.model) if pruner_for(config).calibrated
                 else (None, None))
    start = time.perf_counter()
    with offload_policy(settings.offload_hidden):
        report = prune(loaded.model, config, ids, device=settings.device, resume_dir=settings.resume_dir,
                       batch_size=settings.batch_size)
    return PruningReport(report, round(time.perf_counter() - start, 3), info)


def diagnose_calibration_text(loaded: LoadedModel, calibration: CalibrationSettings, evaluation: EvalSettings,
                              max_windows: int = 16):
    """Token coverage and activation distance (eval/calibration.py) of the calibration windows `calibration`
    describes against the evaluation windows of `evaluation`, on the model as loaded (float)."""
    from modelpress.eval.calibration import diagnose_calibration

    ids = calibration_windows(loaded.tokenizer, calibration, loaded.model)
    _, windows = prepare_windows(loaded.tokenizer, evaluation)
    return diagnose_calibration(loaded.model, ids, windows.eval, max_windows, calibration.batch_size)


def prepare_windows(tokenizer, settings: EvalSettings, calib_samples: int = 0) -> tuple[TextSource, TokenWindows]:
    if tokenizer is None:
        raise ModelpressError("the model has no tokenizer; evaluation needs one to cut text into windows")
    source = load_text(settings.text)
    bos = tokenizer_bos(tokenizer) if settings.bos else None
    return source, make_windows(tokenizer, source, settings.seq_len, settings.windows, calib_samples, bos,
                                settings.bos_mode)


def evaluate_models(candidates: dict[str, LoadedModel], reference: LoadedModel | None,
                    settings: EvalSettings, tokenizer=None,
                    windows: tuple[TextSource, TokenWindows] | None = None) -> dict[str, EvalReport]:
    """Score several models on the same windows in one pass (the reference runs once per window).
    `windows`: the text and its windows, already cut (default: cut from `settings.text`)."""
    first = next(iter(candidates.values()))
    if reference is not None:
        check_same_vocabulary(candidates, reference)
    source, windows = windows or prepare_windows(tokenizer or first.tokenizer, settings)
    models = {name: c.model for name, c in candidates.items()}
    ref_name = next((n for n, m in models.items() if reference is not None and m is reference.model), None)
    if reference is not None and ref_name is None:
        ref_name = "__reference__"
        models[ref_name] = reference.model
    quality = evaluate_quality(models, windows.eval, reference=None if reference is None else reference.model,
                               score=settings.score)
    reports = {}
    for name, loaded in candidates.items():
        size = measure_size(loaded.model)
        q = quality[name]
        speed = measure_speed(loaded.model, windows.eval[:1], settings.decode_tokens) if settings.speed else None
        reports[name] = EvalReport(
            model=loaded.source,
            reference=None if reference is None else reference.source,
            text=f"{source.name} sha256:{source.digest}",
            windows=q.windows,
            seq_len=int(windows.eval.shape[1]),
            perplexity=q.perplexity,
            kl_divergence=q.kl_divergence,
            top1_agreement=q.top1_agreement,
            weight_bytes=size.weight_bytes,
            bits_per_weight=size.bits_per_weight,
            parameters=size.parameters,
            quantized_weight_bytes=size.quantized_weight_bytes,
            quantized_parameters=size.quantized_parameters,
            reference_perplexity=None if reference is None else quality[ref_name].perplexity,
            prefill_tokens_per_s=None if speed is None else speed.prefill_tokens_per_s,
            decode_tokens_per_s=None if speed is None else speed.decode_tokens_per_s,
            bos=windows.bos is not None,
            bos_mode=windows.bos_mode,
            score=settings.score,
        )
        if settings.tasks:
            from modelpress.eval.tasks import evaluate_tasks

            reports[name].extra["tasks"] = evaluate_tasks(loaded, list(settings.tasks)).to_json()
    return reports


def check_same_vocabulary(candidates: dict[str, LoadedModel], reference: LoadedModel) -> None:
    """KL and top-1 agreement compare logits token by token: every model must score the reference's vocabulary."""
    from modelpress.train.data import output_size

    expected = output_size(reference.model)
    for loaded in candidates.values():
        size = output_size(loaded.model)
        if size != expected:
            raise ModelpressError(f"{loaded.source} scores a vocabulary of {size} tokens, the reference "
                                  f"{reference.source} one of {expected}: KL and agreement need the same vocabulary; "
                                  f"give a reference with the same tokenizer, or --reference none")


def default_reference(loaded: LoadedModel) -> str | None:
    """A compressed model is compared with the float model it was made from; a float model with nothing. An
    export folder (compressed-tensors, ...) names its float model in the marker file the exporter wrote."""
    if loaded.float_source != loaded.source:
        return loaded.float_source
    return exported_float_source(loaded.source)


def exported_float_source(source: str) -> str | None:
    import json
    from pathlib import Path

    from modelpress.export.base import EXPORT_MARKER_FILE

    folder = Path(source) if Path(source).is_dir() else Path(source).parent   # a GGUF file sits in its export folder
    marker = folder / EXPORT_MARKER_FILE
    if not marker.is_file():
        return None
    try:
        float_source = json.loads(marker.read_text()).get("float_source")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelpressError(f"{marker} is corrupt ({err}); pass --reference MODEL or --reference none") from None
    return float_source if float_source and float_source != source else None


def evaluate(model: str | None = None, reference: str | None = "auto", settings: EvalSettings = EvalSettings()
             ) -> EvalReport:
    loaded = load_model(model)
    ref_spec = default_reference(loaded) if reference == "auto" else reference
    ref = load_model(ref_spec) if ref_spec else None
    return evaluate_models({"model": loaded}, ref, settings)["model"]


def compare(model: str | None, schemes: list[WeightScheme], settings: EvalSettings = EvalSettings(),
            method: str = "rtn", skip: tuple[str, ...] = DEFAULT_SKIP) -> list[dict]:
    """Quantize one float model into each scheme; evaluate all against it on the same windows."""
    from modelpress.algorithms.quantize import config_for_method

    base = load_model(model)
    candidates: dict[str, LoadedModel] = {"float": base}
    seconds = {"float": 0.0}
    for scheme in schemes:
        copy_ = LoadedModel(copy.deepcopy(base.model), base.tokenizer, source=scheme.spec, float_source=base.source)
        report = quantize_model(copy_, config_for_method(method, scheme, skip=skip))
        candidates[scheme.spec] = copy_
        seconds[scheme.spec] = report.seconds
    with torch.no_grad():
        reports = evaluate_models(candidates, base, settings)
    rows = []
    for name, report in reports.items():
        row = {"format": name, "quantize_seconds": seconds[name], **report.to_dict()}
        rows.append(row)
    return rows
