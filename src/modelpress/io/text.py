"""Text for calibration and evaluation, and the fixed token windows cut from it.

Sources: the embedded default corpus (the English documentation topics that ship with Python in
`pydoc_data`, so no network is needed), a UTF-8 file, or `hf:PATH[:CONFIG[:SPLIT]]` for a Hugging Face
dataset when `datasets` and a network are available.

Windows: the text is tokenized once; evaluation windows are the first `eval_windows` blocks of
`seq_len` tokens and calibration samples come strictly after them, so the two never overlap and the
same text always gives the same windows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from modelpress.errors import ModelpressError

DEFAULT_TEXT = "default"


@dataclass(frozen=True)
class TextSource:
    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def default_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def load_text(spec: str | None = None) -> TextSource:
    if spec is None or spec == DEFAULT_TEXT:
        return TextSource("default (pydoc_data topics)", default_corpus())
    if spec.startswith("hf:"):
        return TextSource(spec, _load_dataset_text(spec[3:]))
    path = Path(spec)
    if not path.exists():
        raise ModelpressError(f"text file {spec} does not exist (use hf:NAME for a Hugging Face dataset)")
    if path.is_dir():
        raise ModelpressError(f"text path {spec} is a directory; give a plain UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelpressError(f"text file {spec} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise ModelpressError(f"text file {spec} is empty")
    return TextSource(str(path), text)


def _load_dataset_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ModelpressError("hf: text needs the `datasets` package: pip install datasets") from None
    # hf:PATH[:CONFIG[:SPLIT]], e.g. hf:wikitext:wikitext-2-raw-v1:test or hf:org/name
    path, config, split = (name.split(":") + [None, None])[:3]
    split = split or "test"
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # network, missing dataset, bad config: all become one clear line
        raise ModelpressError(f"cannot load dataset {name!r}: {err}") from None
    column = "text" if "text" in data.column_names else data.column_names[0]
    text = "\n\n".join(row for row in data[column] if isinstance(row, str) and row.strip())
    if not text.strip():
        raise ModelpressError(f"dataset {name!r} has no text in column {column!r}")
    return text


@dataclass(frozen=True)
class TokenWindows:
    """Evaluation windows (n_eval, seq_len) and calibration samples (n_calib, seq_len), disjoint."""

    eval: torch.Tensor
    calibration: torch.Tensor
    total_tokens: int


def make_windows(tokenizer, source: TextSource, seq_len: int = 512, eval_windows: int = 40,
                 calib_samples: int = 0) -> TokenWindows:
    if seq_len <= 1:
        raise ModelpressError(f"window length must be at least 2 tokens, got {seq_len}")
    ids = torch.tensor(tokenizer(source.text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    whole = ids.numel() // seq_len
    if whole == 0:
        raise ModelpressError(f"text {source.name} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if eval_windows + calib_samples > whole:
        raise ModelpressError(
            f"text {source.name} has {ids.numel()} tokens = {whole} windows of {seq_len}; asked for "
            f"{eval_windows} evaluation + {calib_samples} calibration windows"
        )
    blocks = ids[: whole * seq_len].view(whole, seq_len)
    return TokenWindows(eval=blocks[:eval_windows], calibration=blocks[eval_windows : eval_windows + calib_samples],
                        total_tokens=ids.numel())
