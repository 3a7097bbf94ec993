"""Text for calibration and evaluation, and the fixed token windows cut from it.

Sources: the embedded default corpus (the English documentation topics that ship with Python in
`pydoc_data`, so no network is needed), another named offline corpus (`docs`, `bible`, `dialogue`: see
io/corpora.py), a UTF-8 file, or `hf:PATH[:CONFIG[:SPLIT]]` for a Hugging Face dataset when `datasets`
and a network are available. A name of a corpus wins over a file of the same name (give ./NAME for the file).

Windows: the text is tokenized once (without special tokens); evaluation windows are the first
`eval_windows` blocks and calibration samples come strictly after them, so the two never overlap and the
same text always gives the same windows. Without a BOS a window is `seq_len` text tokens. When the
tokenizer starts every text with a BOS token (see `tokenizer_bos`), every window starts with that BOS and
`seq_len - 1` text tokens follow, so a model trained on BOS-led sequences is scored on inputs like those it
saw. Two rules for where those text tokens come from (`bos_mode`):
- "overwrite" (the default; llama.cpp's `llama-perplexity`): the text is tokenized with its BOS in front,
  [BOS] t0 t1 ..., cut into blocks of `seq_len`, and the first token of every block is replaced by BOS.
  Window i is BOS + t[i*seq_len : i*seq_len + seq_len - 1]: one text token between windows is never seen.
  Figures then compare with llama.cpp's token for token.
- "prepend": BOS + t[i*(seq_len-1) : (i+1)*(seq_len-1)]: the windows tile the text with no gap.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from modelpress.errors import ModelpressError
from modelpress.io.generated import GENERATED
from modelpress.io.corpora import CORPORA, corpus_text, docs_text, mix_parts

log = logging.getLogger(__name__)

DEFAULT_TEXT = "default"


@dataclass(frozen=True)
class TextSource:
    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def default_corpus() -> str:
    return docs_text()


def load_text(spec: str | None = None) -> TextSource:
    if spec is None or spec == DEFAULT_TEXT:
        return TextSource("default (pydoc_data topics)", default_corpus())
    if spec in CORPORA:
        description, text = corpus_text(spec)
        return TextSource(f"{spec} ({description})", text)
    if spec == GENERATED:
        raise ModelpressError("'generated' is a calibration source (windows the model samples itself), not a text: "
                              f"use it for calibration, and evaluate on a text ({', '.join(CORPORA)}, a file)")
    if mix_parts(spec) is not None:
        raise ModelpressError(f"{spec!r} is a calibration mix (windows from several corpora), not one text: "
                              f"use it for calibration, and evaluate on one of its corpora ({', '.join(CORPORA)})")
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


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts at the start of every text, or None when it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a")["input_ids"]          # the tokenizer's own default: special tokens added
    except (TypeError, ValueError):
        return None
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


BOS_MODES = ("overwrite", "prepend")


def check_bos_mode(bos_mode: str) -> None:
    if bos_mode not in BOS_MODES:
        raise ModelpressError(f"unknown BOS window rule {bos_mode!r}; choose one of {', '.join(BOS_MODES)} "
                              "(overwrite: llama.cpp's, the first token of each block becomes BOS; prepend: BOS "
                              "before the text, no token skipped)")


def window_stride(seq_len: int, bos: int | None, bos_mode: str = "overwrite") -> int:
    """Text tokens from the start of one window to the start of the next: `seq_len`, less the BOS under
    "prepend" (under "overwrite" the BOS takes the place of a text token, which is skipped)."""
    check_bos_mode(bos_mode)
    return seq_len - (bos is not None and bos_mode == "prepend")


def windows_in(tokens: int, seq_len: int, bos: int | None, bos_mode: str = "overwrite") -> int:
    """How many whole windows of `seq_len` a text of `tokens` text tokens gives."""
    if bos is not None and bos_mode == "overwrite":
        return (tokens + 1) // seq_len                  # the stream [BOS] + text, cut into blocks
    return tokens // window_stride(seq_len, bos, bos_mode)


@dataclass(frozen=True)
class TokenWindows:
    """Evaluation windows (n_eval, seq_len) and calibration samples (n_calib, seq_len), disjoint.
    With `bos` set, column 0 of every window is that token and the rest is text, cut by `bos_mode`."""

    eval: torch.Tensor
    calibration: torch.Tensor
    total_tokens: int
    bos: int | None = None
    bos_mode: str = "overwrite"


def make_windows(tokenizer, source: TextSource, seq_len: int = 512, eval_windows: int = 40,
                 calib_samples: int = 0, bos: int | None = None, bos_mode: str = "overwrite") -> TokenWindows:
    """Cut `eval_windows` evaluation windows, then up to `calib_samples` calibration windows, from the text.
    `bos`: a token id to start every window with (seq_len - 1 text tokens follow), or None; `bos_mode`: how
    the text tokens are placed after it (module docstring). A text too short for the calibration windows
    asked gives fewer of them, with a warning."""
    if seq_len <= 1 or (bos is not None and seq_len <= 2):
        raise ModelpressError(f"window length must be at least {3 if bos is not None else 2} tokens, got {seq_len}")
    check_bos_mode(bos_mode)
    ids = torch.tensor(tokenizer(source.text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    whole = windows_in(ids.numel(), seq_len, bos, bos_mode)
    if whole == 0:
        raise ModelpressError(f"text {source.name} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if eval_windows > whole or (calib_samples and eval_windows >= whole):
        raise ModelpressError(
            f"text {source.name} has {ids.numel()} tokens = {whole} windows of {seq_len}; asked for "
            f"{eval_windows} evaluation + {calib_samples} calibration windows"
        )
    if bos is None:
        blocks = ids[: whole * seq_len].view(whole, seq_len)
    elif bos_mode == "overwrite":                        # llama.cpp: [BOS] + text in blocks, column 0 := BOS
        stream = torch.cat([torch.tensor([bos]), ids])
        blocks = stream[: whole * seq_len].view(whole, seq_len).clone()
        blocks[:, 0] = bos
    else:
        step = seq_len - 1
        blocks = torch.cat([torch.full((whole, 1), bos, dtype=torch.long), ids[: whole * step].view(whole, step)], 1)
    calibration = blocks[eval_windows : eval_windows + calib_samples]
    if calib_samples:
        _check_calibration(source, calibration, calib_samples, seq_len)
    return TokenWindows(eval=blocks[:eval_windows], calibration=calibration, total_tokens=ids.numel(), bos=bos,
                        bos_mode=bos_mode)


def _check_calibration(source: TextSource, calibration: torch.Tensor, asked: int, seq_len: int) -> None:
    """Warn when the calibration windows carry far less text than asked: too few, or over a quarter repeats."""
    got = calibration.shape[0]
    if got < asked:
        log.warning("calibration text %s holds only %d windows of %d tokens after the evaluation text (%d tokens); "
                    "asked for %d: calibrating on %d. Give a longer calibration text for the full amount.",
                    source.name, got, seq_len, got * seq_len, asked, got)
    distinct = torch.unique(calibration, dim=0).shape[0]
    if distinct * 4 < got * 3:           # a few repeated boilerplate windows are normal; a quarter is not
        log.warning("calibration text %s repeats itself: %d of its %d calibration windows are distinct",
                    source.name, distinct, got)
