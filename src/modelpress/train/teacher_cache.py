"""The teacher's top-k distributions, computed once over the training examples and kept in memory or on
disk, so the teacher can be freed before the student trains (see losses.py for what top-k keeps).

Tensors for n examples of P rows each (P = window length - 1 for language models, 1 for classifiers):
- logprobs (n, P, k) float32   teacher log-probabilities at the cache's temperature, full-vocabulary normalised
- indices  (n, P, k) int32     their token (class) ids
- tail     (n, P)    float32   log of the teacher's remaining probability mass
Saved as one safetensors file whose metadata records the temperature, k and the vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.io.atomic import atomic_file
from modelpress.progress import progress
from modelpress.train.data import TaskData, model_rows, output_size
from modelpress.train.losses import TopKTargets, topk_targets
from modelpress.train.trainer import autocast, resolve_precision


@dataclass
class TeacherCache:
    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    temperature: float
    vocab_size: int

    @property
    def top_k(self) -> int:
        return self.logprobs.shape[-1]

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logprobs, self.indices, self.tail))

    def targets(self, examples: torch.Tensor) -> TopKTargets:
        """Rows of examples `examples`, flattened as model_rows flattens the student's: (B·P, k)."""
        k = self.top_k
        return TopKTargets(self.logprobs[examples].reshape(-1, k), self.indices[examples].reshape(-1, k).long(),
                           self.tail[examples].reshape(-1))

    def check_fits(self, data: TaskData, vocab_size: int, temperature: float) -> None:
        expected = (len(data), data.rows_per_example)
        if tuple(self.logprobs.shape[:2]) != expected:
            raise ModelpressError(f"teacher cache holds {tuple(self.logprobs.shape[:2])} (examples, rows); the "
                                  f"training data needs {expected}")
        if self.vocab_size != vocab_size:
            raise ModelpressError(f"teacher and student vocabularies differ: the cached teacher has {self.vocab_size} "
                                  f"outputs, the student {vocab_size}")
        if abs(self.temperature - temperature) > 1e-9:
            raise ModelpressError(f"teacher cache was made at temperature {self.temperature}, training asks for "
                                  f"{temperature}; rebuild the cache")


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, data: TaskData, top_k: int, temperature: float = 1.0,
                        batch_size: int = 1, precision: str = "fp32") -> TeacherCache:
    """Run the teacher once over every example and keep its top-k rows (on the CPU)."""
    vocab = output_size(teacher)
    if not 1 <= top_k <= vocab:
        raise ModelpressError(f"top-k must be between 1 and the teacher's {vocab} outputs, got {top_k}")
    device = next(teacher.parameters()).device
    resolved = resolve_precision(precision, device)  # type: ignore[arg-type]
    was_training = teacher.training
    teacher.eval()
    rows_per = data.rows_per_example
    n = len(data)
    logprobs = torch.empty(n, rows_per, top_k)
    indices = torch.empty(n, rows_per, top_k, dtype=torch.int32)
    tail = torch.empty(n, rows_per)
    batches = torch.arange(n).split(batch_size)
    for batch in progress(batches, desc="teacher top-k", total=len(batches)):
        with autocast(resolved, device):
            rows = model_rows(teacher, data, batch)
        if rows.logits.shape[-1] != vocab:
            raise ModelpressError(f"teacher produced {rows.logits.shape[-1]} scores per row, its head says {vocab}")
        picked = topk_targets(rows.logits.float(), top_k, temperature)
        logprobs[batch] = picked.logprobs.view(len(batch), rows_per, top_k).cpu()
        indices[batch] = picked.indices.view(len(batch), rows_per, top_k).to(torch.int32).cpu()
        tail[batch] = picked.tail.view(len(batch), rows_per).cpu()
    teacher.train(was_training)
    return TeacherCache(logprobs, indices, tail, float(temperature), vocab)


def save_teacher_cache(cache: TeacherCache, path: str | Path) -> Path:
    with atomic_file(path, mode="wb") as handle:
        handle.write(_serialize(cache))
    return Path(path)


def _serialize(cache: TeacherCache) -> bytes:
    meta = {"temperature": repr(cache.temperature), "vocab_size": str(cache.vocab_size), "top_k": str(cache.top_k),
            "producer": "modelpress teacher cache"}
    return save({"logprobs": cache.logprobs.contiguous(), "indices": cache.indices.contiguous(),
                 "tail": cache.tail.contiguous()}, metadata=meta)


def load_teacher_cache(path: str | Path) -> TeacherCache:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        return TeacherCache(tensors["logprobs"], tensors["indices"], tensors["tail"],
                            float(meta["temperature"]), int(meta["vocab_size"]))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ModelpressError(f"{path} is not a readable teacher cache: {err}") from None

