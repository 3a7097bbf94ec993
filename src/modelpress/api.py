"""Orchestration: quantize, evaluate and compare. The math lives in formats/ and algorithms/, the measuring
in eval/; this file only wires them together for the CLI and for Python users."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import torch

from modelpress.errors import ModelpressError
from modelpress.eval.quality import evaluate_quality, first_scored
from modelpress.eval.size import measure_size
from modelpress.eval.speed import measure_speed
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.text import TextSource, TokenWindows, load_text, make_windows, tokenizer_bos
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
    score: str = "all"                 # scored positions: "all" but the first, or llama.cpp's "second-half"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalSettings:
    """`bos`: start every window with the BOS token when the tokenizer adds one (io/text.py); `score`: which
    positions are scored (eval/quality.py: "all" or llama.cpp's "second-half")."""

    text: str | None = None
    windows: int = 40
    seq_len: int = 512
    speed: bool = True
    decode_tokens: int = 32
    bos: bool = True
    score: str = "all"

    def __post_init__(self) -> None:
        first_scored(self.seq_len, self.score)      # validates the name


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


def calibration_windows(tokenizer, settings: CalibrationSettings) -> torch.Tensor:
    """(samples, seq_len) token ids for calibration, disjoint from the evaluation windows."""
    if tokenizer is None:
        raise ModelpressError("the model has no tokenizer; calibration needs one to cut text into windows")
    bos = tokenizer_bos(tokenizer) if settings.bos else None
    step = settings.seq_len - (bos is not None)               # text tokens per window
    reserved = -(-settings.eval_tokens // step)               # whole calibration windows covering the eval text
    windows = make_windows(tokenizer, load_text(settings.text), settings.seq_len, reserved, settings.samples, bos)
    return windows.calibration


def quantize_model(loaded: LoadedModel, scheme: WeightScheme, method: str = "rtn",
                   skip: tuple[str, ...] = DEFAULT_SKIP, calibration: CalibrationSettings | None = None,
                   alpha: float = 0.5, schemes: Mapping[str, WeightScheme] | None = None,
                   static_groups: bool = True) -> dict:
    """Quantize `loaded.model` in place; returns a small report (method, scheme, layers, seconds).
    `alpha` is SmoothQuant's migration strength (method "smoothquant" only). `schemes` (full layer name ->
    scheme) overrides `scheme` layer by layer (mixed precision; not for smoothquant). `static_groups=False`
    (gptq, awq-gptq) stores GPTQ's activation order as a column permutation with groups cut in that order,
    instead of the scheme's groups in the layer's order (algorithms/quantize/gptq.py)."""
    from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn

    if schemes and method == "smoothquant":
        raise ModelpressError("smoothquant quantizes every layer to int8 W8A8; per-layer schemes need rtn, gptq, "
                              "awq or awq-gptq")
    if not static_groups and method not in ("gptq", "awq-gptq"):
        raise ModelpressError(f"static_groups=False (--no-static-groups) picks GPTQ's group layout; it applies to "
                              f"methods gptq and awq-gptq, not {method!r}")
    if method == "gptq":
        return _quantize_gptq(loaded, scheme, skip, calibration or CalibrationSettings(), schemes, static_groups)
    if method in ("awq", "awq-gptq", "smoothquant"):
        return _quantize_scaled(loaded, scheme, method, skip, calibration or CalibrationSettings(), alpha, schemes,
                                static_groups)
    if method != "rtn":
        raise ModelpressError(f"unknown quantization method {method!r}; available: rtn, gptq, awq, awq-gptq, "
                              "smoothquant")
    start = time.perf_counter()
    layers = quantize_rtn(loaded.model, RTNConfig(scheme=scheme, skip=skip, schemes=schemes))
    return {"method": method, "scheme": scheme.spec, "layers": len(layers),
            "seconds": round(time.perf_counter() - start, 3)}


def quantize_mixed(loaded: LoadedModel, config, calibration: CalibrationSettings | None = None) -> dict:
    """Mixed precision to a bit budget (`config`: algorithms/quantize/mixed_run.MixedConfig): score each layer
    under each candidate on calibration windows, choose a scheme per layer, quantize with `config.method`.
    Returns quantize_model's report with scheme "mixed" and the per-layer map under "mixed"."""
    from modelpress.algorithms.quantize.mixed_run import mixed_report, plan_mixed

    calibration = calibration or CalibrationSettings()
    start = time.perf_counter()
    sensitivity = replace(calibration, samples=config.sensitivity_samples)
    plan = plan_mixed(loaded.model, config, calibration_windows(loaded.tokenizer, sensitivity))
    info = quantize_model(loaded, plan.most_common(), method=config.method, skip=config.skip,
                          calibration=calibration, schemes=plan.schemes(), static_groups=config.static_groups)
    return {**info, "scheme": "mixed", "seconds": round(time.perf_counter() - start, 3),
            "mixed": mixed_report(loaded.model, plan)}


def _quantize_gptq(loaded: LoadedModel, scheme: WeightScheme, skip: tuple[str, ...],
                   calibration: CalibrationSettings, schemes: Mapping[str, WeightScheme] | None = None,
                   static_groups: bool = True) -> dict:
    from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq

    start = time.perf_counter()
    ids = calibration_windows(loaded.tokenizer, calibration)
    config = GPTQConfig(scheme=scheme, static_groups=static_groups, skip=skip, schemes=schemes)
    result = quantize_gptq(loaded.model, config, ids, device=calibration.device,
                           resume_dir=calibration.resume_dir, batch_size=calibration.batch_size)
    return {"method": "gptq", "scheme": scheme.spec, "layers": result.layers, "static_groups": static_groups,
            "seconds": round(time.perf_counter() - start, 3),
            "calibration": {"text": calibration.text or "default", "samples": int(ids.shape[0]),
                            "seq_len": int(ids.shape[1])},
            **result.summary()}


def _quantize_scaled(loaded: LoadedModel, scheme: WeightScheme, method: str, skip: tuple[str, ...],
                     calibration: CalibrationSettings, alpha: float,
                     schemes: Mapping[str, WeightScheme] | None = None, static_groups: bool = True) -> dict:
    """AWQ (RTN or GPTQ after the scales) and SmoothQuant W8A8: per-channel scales folded into producers."""
    from modelpress.algorithms.quantize.awq import AWQConfig, quantize_awq
    from modelpress.algorithms.quantize.smoothquant import SmoothQuantConfig, quantize_smoothquant

    if method == "smoothquant" and calibration.resume_dir is not None:
        raise ModelpressError("smoothquant runs in one short pass and cannot resume; drop --resume")
    smooth = SmoothQuantConfig.for_scheme(scheme, alpha=alpha, skip=skip) if method == "smoothquant" else None
    awq = AWQConfig(scheme=scheme, solver="gptq" if method == "awq-gptq" else "rtn", static_groups=static_groups,
                    skip=skip, schemes=schemes) if not smooth else None
    start = time.perf_counter()
    ids = calibration_windows(loaded.tokenizer, calibration)
    if smooth is not None:
        result = quantize_smoothquant(loaded.model, smooth, ids, device=calibration.device,
                                      batch_size=calibration.batch_size)
        spec = smooth.scheme.spec
    else:
        result = quantize_awq(loaded.model, awq, ids, device=calibration.device,
                              resume_dir=calibration.resume_dir, batch_size=calibration.batch_size)
        spec = scheme.spec
    layout = {"static_groups": static_groups} if method == "awq-gptq" else {}
    return {"method": method, "scheme": spec, "layers": result.layers, **layout,
            "seconds": round(time.perf_counter() - start, 3),
            "calibration": {"text": calibration.text or "default", "samples": int(ids.shape[0]),
                            "seq_len": int(ids.shape[1])},
            **result.summary()}


def prune_model(loaded: LoadedModel, config, calibration: CalibrationSettings | None = None) -> dict:
    """Prune `loaded.model` in place; `config` is one of algorithms/prune's configs (magnitude, Wanda,
    SparseGPT, structured, experts). Returns the method's report as a dict."""
    from modelpress.algorithms.prune import prune, pruner_for

    calibration = calibration or CalibrationSettings()
    ids = calibration_windows(loaded.tokenizer, calibration) if pruner_for(config).calibrated else None
    start = time.perf_counter()
    report = prune(loaded.model, config, ids, device=calibration.device, resume_dir=calibration.resume_dir,
                   batch_size=calibration.batch_size)
    info = {**report.summary(), "seconds": round(time.perf_counter() - start, 3)}
    if ids is not None:
        info["calibration"] = {"text": calibration.text or "default", "samples": int(ids.shape[0]),
                               "seq_len": int(ids.shape[1])}
    return info


def prepare_windows(tokenizer, settings: EvalSettings, calib_samples: int = 0) -> tuple[TextSource, TokenWindows]:
    if tokenizer is None:
        raise ModelpressError("the model has no tokenizer; evaluation needs one to cut text into windows")
    source = load_text(settings.text)
    bos = tokenizer_bos(tokenizer) if settings.bos else None
    return source, make_windows(tokenizer, source, settings.seq_len, settings.windows, calib_samples, bos)


def evaluate_models(candidates: dict[str, LoadedModel], reference: LoadedModel | None,
                    settings: EvalSettings, tokenizer=None) -> dict[str, EvalReport]:
    """Score several models on the same windows in one pass (the reference runs once per window)."""
    first = next(iter(candidates.values()))
    if reference is not None:
        check_same_vocabulary(candidates, reference)
    source, windows = prepare_windows(tokenizer or first.tokenizer, settings)
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
            seq_len=settings.seq_len,
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
            score=settings.score,
        )
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
    base = load_model(model)
    candidates: dict[str, LoadedModel] = {"float": base}
    seconds = {"float": 0.0}
    for scheme in schemes:
        copy_ = LoadedModel(copy.deepcopy(base.model), base.tokenizer, source=scheme.spec, float_source=base.source)
        info = quantize_model(copy_, scheme, method=method, skip=skip)
        candidates[scheme.spec] = copy_
        seconds[scheme.spec] = info["seconds"]
    with torch.no_grad():
        reports = evaluate_models(candidates, base, settings)
    rows = []
    for name, report in reports.items():
        row = {"format": name, "quantize_seconds": seconds[name], **report.to_dict()}
        rows.append(row)
    return rows
