"""Training examples and how a model's output becomes rows of scores to train on.

Two tasks, told apart by the labels:
- causal language modelling (labels None): each window of token ids is scored at every position but the
  last, the target being the next token: rows = logits[:, :-1] flattened, labels = ids[:, 1:];
- sequence classification (labels (n,)): one row of class scores per example.
Training windows for language models are cut from the calibration side of the text, after the tokens
reserved for evaluation, so training never sees the evaluation windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.train.losses import IGNORE_INDEX

EVAL_TOKENS = 40 * 512   # what `modelpress eval` scores by default: 40 windows of 512 tokens


@dataclass(frozen=True)
class TaskData:
    input_ids: torch.Tensor                      # (n, T) int64
    attention_mask: torch.Tensor | None = None   # (n, T); None: every token is real
    labels: torch.Tensor | None = None           # (n,) class labels; None: causal LM (next-token targets)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] == 0:
            raise ModelpressError(f"training inputs must be (examples, tokens), got {tuple(self.input_ids.shape)}")
        if self.attention_mask is not None and self.attention_mask.shape != self.input_ids.shape:
            raise ModelpressError(f"attention mask {tuple(self.attention_mask.shape)} does not match inputs "
                                  f"{tuple(self.input_ids.shape)}")
        if self.labels is not None and self.labels.shape != (self.input_ids.shape[0],):
            raise ModelpressError(f"labels must be one per example ({self.input_ids.shape[0]},), got "
                                  f"{tuple(self.labels.shape)}")
        if self.labels is None and self.input_ids.shape[1] < 2:
            raise ModelpressError("language-model windows need at least 2 tokens")

    @property
    def causal(self) -> bool:
        return self.labels is None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def rows_per_example(self) -> int:
        return self.input_ids.shape[1] - 1 if self.causal else 1


@dataclass(frozen=True)
class Rows:
    logits: torch.Tensor          # (N, V) scores, in whatever dtype autocast produced
    labels: torch.Tensor          # (N,) hard targets, IGNORE_INDEX where there is none
    mask: torch.Tensor | None     # (N,) bool: rows that count; None: all


def model_rows(model: nn.Module, data: TaskData, indices: torch.Tensor) -> Rows:
    """Run `model` on examples `indices` and return its rows of scores with their targets."""
    device = next(model.parameters()).device
    ids = data.input_ids[indices].to(device)
    mask = None if data.attention_mask is None else data.attention_mask[indices].to(device)
    kwargs = {"use_cache": False} if data.causal else {}
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    if not data.causal:
        return Rows(logits, data.labels[indices].to(device), None)  # type: ignore[index]
    rows = logits[:, :-1].reshape(-1, logits.shape[-1])                       # (B·(T-1), V)
    labels = ids[:, 1:].reshape(-1)
    row_mask = None
    if mask is not None:
        row_mask = mask[:, 1:].reshape(-1).bool()
        labels = torch.where(row_mask, labels, torch.full_like(labels, IGNORE_INDEX))
    return Rows(rows, labels, row_mask)


def output_size(model: nn.Module) -> int:
    """Vocabulary size of a language model's head, or the number of classes of a classifier."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        size = getattr(head, "out_features", None)
        return int(size if size is not None else head.weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None) is not None:
        return int(config.num_labels)
    raise ModelpressError(f"cannot tell the output size of {type(model).__name__}: no output head and no num_labels")


def check_same_vocabulary(teacher: nn.Module, student: nn.Module) -> int:
    """Distillation compares distributions token by token: both must score the same vocabulary."""
    t, s = output_size(teacher), output_size(student)
    if t != s:
        raise ModelpressError(f"teacher and student vocabularies differ: teacher has {t} outputs, student {s}; "
                              f"distillation needs models that share a tokenizer (or the same classes)")
    return t


def training_windows(tokenizer, text: str | None = None, seq_len: int = 512, max_windows: int | None = None,
                     eval_tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """(n, seq_len) token ids from the calibration side of the text (after the evaluation tokens)."""
    from modelpress.io.text import load_text, make_windows

    if tokenizer is None:
        raise ModelpressError("the model has no tokenizer; training on text needs one")
    source = load_text(text)
    reserved = -(-eval_tokens // seq_len)
    total = len(tokenizer(source.text, add_special_tokens=False)["input_ids"])
    available = total // seq_len - reserved
    if available <= 0:
        raise ModelpressError(f"text {source.name} has {total} tokens: nothing left for training after the "
                              f"{eval_tokens} evaluation tokens (windows of {seq_len})")
    count = available if max_windows is None else min(max_windows, available)
    return make_windows(tokenizer, source, seq_len, reserved, count).calibration
