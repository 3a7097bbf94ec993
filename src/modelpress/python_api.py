"""The Python API, re-exported from `modelpress` (docs/api.md): load, quantize, rotate, prune, evaluate, save,
export, compress, generate.

    model = modelpress.load()                                         # the default model, or a path / hub id
    report = modelpress.quantize(model, GPTQ("int4/g128"), calibration=texts)   # in place, like torchao's quantize_
    print(modelpress.evaluate(model, reference=modelpress.load()).to_json())
    modelpress.save(model, "out/")

Each function takes a LoadedModel (what `load` returns: model + tokenizer + where it came from) or a plain
Hugging Face model (an nn.Module with a `.config`), with `tokenizer=` where text has to be cut into tokens.
A plain model is wrapped into a LoadedModel that shares its modules, so it is changed in place all the same.
Orchestration stays in api.py; this file only turns what a Python user holds into what api.py takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from modelpress.api import (
    Calibration,
    EvalReport,
    EvalSettings,
    PruningReport,
    QuantizeReport,
    evaluate_models,
    prune_model,
    quantize_model,
)
from modelpress.algorithms.rotate import RotateConfig, RotationReport, rotate_residual
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.export.base import ExportOptions, ExportResult
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.text import TextSource, TokenWindows, load_text, make_windows, tokenizer_bos, windows_in

ModelLike = LoadedModel | nn.Module
Text = str | Sequence[str] | torch.Tensor | None
"""Evaluation text: a text file or hf:NAME (None: the default corpus), texts (joined by blank lines), or the
evaluation windows themselves as token ids (windows, seq_len)."""

load = load_model


def as_loaded(model: ModelLike, tokenizer=None) -> LoadedModel:
    """`model` as a LoadedModel; `tokenizer` replaces (or supplies) its tokenizer. Shares the modules."""
    if isinstance(model, LoadedModel):
        if tokenizer is None or tokenizer is model.tokenizer:
            return model
        return LoadedModel(model.model, tokenizer, model.source, model.float_source)
    if isinstance(model, nn.Module):
        name = getattr(getattr(model, "config", None), "name_or_path", "") or f"<in-memory {type(model).__name__}>"
        return LoadedModel(model, tokenizer, source=name, float_source=name)
    raise ModelpressError(f"expected a LoadedModel (modelpress.load) or a torch nn.Module, got {type(model).__name__}")


def quantize(model: ModelLike, config, calibration: Calibration = None, tokenizer=None,
             head: WeightScheme | str | None = None) -> QuantizeReport:
    """Quantize `model` in place as `config` says (RTN, GPTQ, AWQ, SmoothQuant, FP8Dynamic, Mixed, Head). Calibrated methods
    take `calibration`: token ids (samples, seq_len), texts (with a tokenizer), a text file, or
    CalibrationSettings (None: the default corpus). `head` (e.g. "int8/g32"): also quantize the output head, and
    the embedding tied to it as one packed table, round-to-nearest after the method (None: left float)."""
    return quantize_model(as_loaded(model, tokenizer), config, calibration, head)


def rotate(model: ModelLike, config: RotateConfig | None = None, calibration: torch.Tensor | None = None,
           scheme: WeightScheme | str | None = None) -> RotationReport:
    """Rotate `model`'s residual stream into its weights, in place (algorithms/rotate.py): the same function,
    outlier channels spread before quantizing; a head tied to the embedding is untied. Refuses, leaving the
    model unchanged, an architecture the rotation does not fit. `Rotate(learn_steps=N)` then learns a second
    rotation (algorithms/rotate_learn.py) on `calibration` token ids (samples, seq_len) for `scheme`, the weight
    scheme the model will be quantized to."""
    return rotate_residual(as_loaded(model).model, config, calibration, scheme)


def prune(model: ModelLike, config, calibration: Calibration = None, tokenizer=None) -> PruningReport:
    """Prune `model` in place as `config` says (Magnitude, Wanda, SparseGPT, Structured, ExpertPrune);
    `calibration` as for `quantize`."""
    return prune_model(as_loaded(model, tokenizer), config, calibration)


def evaluate(model: ModelLike, reference: ModelLike | str | None = None, text: Text = None,
             settings: EvalSettings = EvalSettings(), tokenizer=None) -> EvalReport:
    """Perplexity of `model` (and KL divergence and top-1 agreement against `reference`, a model or a MODEL
    spec to load), size and, unless `settings.speed` is off, speed. `settings` gives windows and length."""
    loaded = as_loaded(model, tokenizer)
    ref = load_model(reference) if isinstance(reference, str) else (
        None if reference is None else as_loaded(reference, tokenizer))
    windows = eval_windows(loaded.tokenizer, text, settings)
    with torch.no_grad():
        return evaluate_models({"model": loaded}, ref, settings, windows=windows)["model"]


def eval_windows(tokenizer, text: Text, settings: EvalSettings) -> tuple[TextSource, TokenWindows]:
    """The evaluation text and its windows: at most `settings.windows` of at most `settings.seq_len` tokens."""
    if isinstance(text, torch.Tensor):
        if text.dim() != 2 or text.is_floating_point() or text.shape[1] < 2:
            raise ModelpressError(f"evaluation token ids must be an integer tensor (windows, seq_len >= 2), "
                                  f"got {text.dtype} of shape {tuple(text.shape)}")
        source = TextSource(f"{text.shape[0]} token-id windows", ",".join(map(str, text.flatten().tolist())))
        return source, TokenWindows(eval=text.long(), calibration=text[:0].long(), total_tokens=text.numel())
    if tokenizer is None:
        raise ModelpressError("evaluation needs a tokenizer to cut text into windows: pass tokenizer=, or give "
                              "token ids as text=")
    if text is None or isinstance(text, str):
        source = load_text(text if text is not None else settings.text)
    elif not text or not all(isinstance(t, str) for t in text):
        raise ModelpressError("evaluation texts must be a non-empty list of strings")
    else:
        source = TextSource(f"{len(text)} texts", "\n\n".join(text))
    bos = tokenizer_bos(tokenizer) if settings.bos else None
    tokens = len(tokenizer(source.text, add_special_tokens=False)["input_ids"])
    seq_len = min(settings.seq_len, tokens + (bos is not None))     # one shorter window for a short text
    count = min(settings.windows, windows_in(tokens, seq_len, bos, settings.bos_mode))
    if count == 0 or seq_len - (bos is not None) < 1 or seq_len < 2:
        raise ModelpressError(f"text {source.name} has {tokens} tokens: too short for an evaluation window")
    return source, make_windows(tokenizer, source, seq_len, count, 0, bos, settings.bos_mode)


def save(model: ModelLike, path: str | Path, tokenizer=None, overwrite: bool = False,
         report: QuantizeReport | PruningReport | None = None) -> Path:
    """Write `model` (compressed layers as packed tensors, safetensors + JSON) to the directory `path`,
    atomically; `modelpress.load(path)` reads it back bit for bit."""
    from modelpress.io.save import save_compressed

    loaded = as_loaded(model, tokenizer)
    if not hasattr(loaded.model, "config"):
        raise ModelpressError(f"{type(loaded.model).__name__} has no .config: saving needs a Hugging Face model")
    return save_compressed(loaded, path, overwrite=overwrite, report=None if report is None else report.to_json())


def export(model: ModelLike, targets: Sequence[str], path: str | Path, tokenizer=None,
           options: ExportOptions = ExportOptions(), overwrite: bool = False) -> list[ExportResult]:
    """Export `model` to each target (gguf, compressed-tensors, hf, peft) in path/<target>/ (export.export_model)."""
    from modelpress.export import export_model

    if isinstance(targets, str):
        raise ModelpressError(f"targets is a list of export targets, e.g. [{targets!r}]")
    return export_model(as_loaded(model, tokenizer), list(targets), path, options, overwrite)


def compress(model: ModelLike, recipe, data: Calibration = None, out: str | Path | None = None, tokenizer=None):
    """Run a recipe (a Recipe, a YAML file, or a list of stage configs) on `model`, left unchanged: each stage's
    model and report go to `out` (resumed if `out` holds the same run; None: a temporary directory, then no
    export stage). `data`: calibration and training windows (None: the recipe's calibration settings).
    Returns a CompressReport whose `.loaded` is the final model; a missed quality gate raises GateFailed."""
    import tempfile

    from modelpress.recipe import Export, Recipe, load_recipe
    from modelpress.recipe.run import compress_model, final_model

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = Recipe(tuple(recipe))
    loaded = as_loaded(model, tokenizer)
    if out is not None:
        report = compress_model(loaded, recipe, data, out)
        report.loaded = final_model(report, loaded)
        return report
    if any(isinstance(stage, Export) for stage in recipe.stages):
        raise ModelpressError("a recipe with an export stage needs out= (the directory the exports go to)")
    with tempfile.TemporaryDirectory(prefix="modelpress-compress-") as tmp:
        report = compress_model(loaded, recipe, data, Path(tmp) / "run")
        report.loaded = final_model(report, loaded)      # read before the directory goes
        return report


def generate(model: ModelLike, prompt: str | Sequence[int] | torch.Tensor | Sequence[str | Sequence[int]],
             settings=None, tokenizer=None, draft: ModelLike | WeightScheme | str | None = None, speculative=None,
             generator=None, on_tokens=None):
    """New tokens after `prompt` (a text, which needs a tokenizer, or token ids), on the path `settings` (a
    GenerationSettings: length, sampling, decode path; inference/decoding.py) resolves: on CUDA a static KV cache
    with the step captured in a CUDA graph, optionally compiled (`compile=True`) and with a quantized KV cache
    (`kv_cache="int8"`). `draft`: speculative decoding with a draft model, or with a low-bit RTN copy of the model
    for a scheme (self-speculation); `speculative`: its SpeculativeConfig. Returns a GenerationResult (tokens,
    tokens/s, the path that ran, acceptance).
    Several prompts (a list of texts or of token-id lists, or a (B, T) tensor) decode together as one batch
    (inference/batch_decode.py: left-padded on one static cache, the step captured on CUDA) and return a
    BatchGenerationResult (each prompt's tokens); not with a draft, and not with on_tokens."""
    from modelpress.inference.batch_decode import generate_batch
    from modelpress.inference.decoding import GenerationSettings
    from modelpress.inference.decoding import generate as plain_generate
    from modelpress.inference.speculative import SpeculativeConfig, low_bit_draft, speculative_generate

    loaded = as_loaded(model, tokenizer)
    settings = GenerationSettings() if settings is None else settings
    rows = _prompt_rows(prompt, loaded.tokenizer)
    if _is_batch(prompt):
        if draft is not None or on_tokens is not None:
            raise ModelpressError("a batch of prompts decodes without a draft and without on_tokens; "
                                  "give one prompt for speculative decoding or streaming")
        return generate_batch(loaded.model, rows, settings, generator=generator)
    ids = rows[0]
    if draft is None:
        return plain_generate(loaded.model, ids, settings, generator=generator, on_tokens=on_tokens)
    if isinstance(draft, (str, WeightScheme)):
        draft_model = low_bit_draft(loaded.model, WeightScheme.parse(draft) if isinstance(draft, str) else draft)
    else:
        draft_model = as_loaded(draft).model
    return speculative_generate(loaded.model, draft_model, ids, settings, speculative or SpeculativeConfig(),
                                generator=generator, on_tokens=on_tokens)


def session(model: ModelLike, settings=None, tokenizer=None, draft: ModelLike | WeightScheme | str | None = None,
            speculative=None, rows: int = 1, reuse_prefix: bool = True):
    """A DecodeSession (inference/session.py): `model` prepared once for many generations of `settings`, its
    decoders (KV caches, captured CUDA graphs) kept between calls, so that only the first call pays for the fusions
    and the captures. `session.generate(prompt)` takes a text (with the model's tokenizer) or token ids, and per call
    max_new_tokens, sampling and eos_token_ids; `session.generate_rows(prompts)` up to `rows` prompts decoded
    together. `draft` as in generate (a model, or a scheme for a low-bit copy made once). Use it in a `with` block,
    or close() it: that undoes the fusions and frees the decoders. The model must not change while it is open.
    A prompt that starts with what the session's last generation read and wrote (a conversation's next turn, one
    shared instruction) runs only its new part (`result.reused_prompt_tokens`); reuse_prefix=False runs it whole."""
    from modelpress.inference.session import DecodeSession
    from modelpress.inference.speculative import low_bit_draft

    loaded = as_loaded(model, tokenizer)
    if isinstance(draft, (str, WeightScheme)):
        draft_model = low_bit_draft(loaded.model, WeightScheme.parse(draft) if isinstance(draft, str) else draft)
    else:
        draft_model = None if draft is None else as_loaded(draft).model
    tokenizer = loaded.tokenizer
    encode = None if tokenizer is None else (lambda text: _prompt_rows(text, tokenizer)[0])
    return DecodeSession(loaded.model, settings, draft=draft_model, speculative=speculative, rows=rows, encode=encode,
                         reuse_prefix=reuse_prefix)


def _is_batch(prompt) -> bool:
    """Whether `prompt` is several prompts: a list of texts or of id sequences, or a 2-D tensor of several rows."""
    if isinstance(prompt, torch.Tensor):
        return prompt.dim() == 2 and prompt.shape[0] > 1
    if isinstance(prompt, str) or not len(prompt):
        return False
    first = prompt[0]
    return isinstance(first, (str, Sequence)) or (isinstance(first, torch.Tensor) and first.dim() > 0)


def _prompt_rows(prompt, tokenizer) -> list[list[int]]:
    """Token ids of each prompt of `prompt` (one prompt, or a batch as _is_batch says)."""
    def ids(one) -> list[int]:
        if isinstance(one, str):
            if tokenizer is None:
                raise ModelpressError("a text prompt needs a tokenizer: pass tokenizer= or token ids")
            return list(tokenizer(one, add_special_tokens=True)["input_ids"])
        if isinstance(one, torch.Tensor):
            return [int(t) for t in one.reshape(-1).tolist()]
        return [int(t) for t in one]

    if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        return [ids(row) for row in prompt]
    return [ids(one) for one in prompt] if _is_batch(prompt) else [ids(prompt)]
