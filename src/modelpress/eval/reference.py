"""The float reference's next-token distributions, computed once per evaluation text and reused by every
evaluation in a pipeline (each stage's, the explicit evaluate stages', the quality gate's, the gate's
per-layer attribution). Without it each of those runs the reference again over the same windows.

What is kept for W windows of T tokens (P = T - 1 predictions each), on the CPU:
- target (W, P) float32     the reference's log-probability of the true next token (its perplexity)
- exact: logprobs (W, P, V) float32, the whole distribution; KL and top-1 are then exactly evaluate_quality's;
- top-k: logprobs (W, P, k) and indices (W, P, k) of its k most likely tokens, and tail (W, P), the log of
  the remaining mass. KL is then taken over k + 1 buckets (the k tokens, the rest as one); merging outcomes
  never increases a KL divergence, so this is a lower bound of the exact KL that is tight when the tail is
  small (k = 256 keeps the cache to 2 KiB per token for any vocabulary).
Saved as one safetensors file named by a digest of the reference's weights, the windows and k, so a file
is only ever reused for the very model and text it was made from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.nn.backends import decoded_once
from modelpress.eval.quality import QualityResult, first_scored, next_token_logits
from modelpress.io.atomic import atomic_file
from modelpress.progress import progress


@dataclass
class ReferenceLogits:
    windows: torch.Tensor              # (W, T) int64 token ids
    target: torch.Tensor               # (W, P) float32
    logprobs: torch.Tensor             # (W, P, V) exact, or (W, P, k)
    indices: torch.Tensor | None = None   # (W, P, k) int32 for top-k
    tail: torch.Tensor | None = None      # (W, P) float32 for top-k

    @property
    def exact(self) -> bool:
        return self.indices is None

    def top1(self) -> torch.Tensor:
        """(W, P) the reference's most likely next token (top-k rows are sorted, so it is the first)."""
        return self.logprobs.argmax(-1) if self.exact else self.indices[..., 0].long()  # type: ignore[index]

    def prefix(self, windows: int, tokens: int) -> ReferenceLogits:
        """The first `windows` windows cut to their first `tokens` tokens: a causal model's predictions there
        depend only on that prefix, so they are the reference's for the shorter windows too."""
        p = tokens - 1
        cut = (lambda t: None if t is None else t[:windows, :p].contiguous())
        return ReferenceLogits(self.windows[:windows, :tokens].contiguous(), cut(self.target),  # type: ignore[arg-type]
                               cut(self.logprobs), cut(self.indices), cut(self.tail))  # type: ignore[arg-type]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every tensor of the model (names, shapes, dtypes and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_key(fingerprint: str, windows: torch.Tensor, top_k: int | None) -> str:
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    text = f"{fingerprint} {tuple(ids.shape)} {hashlib.sha256(ids.numpy().tobytes()).hexdigest()} k={top_k}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@torch.no_grad()
@decoded_once()   # packed weights decoded once per evaluation, not per forward
def compute_reference(model: nn.Module, windows: torch.Tensor, top_k: int | None = None) -> ReferenceLogits:
    """Run the reference once over every window and keep its distributions (exact, or top-k with the tail)."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ModelpressError(f"need at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    targets, logprobs, indices, tails = [], [], [], []
    for window in progress(windows.split(1), desc="reference", total=windows.shape[0]):
        logp = F.log_softmax(next_token_logits(model, window), dim=-1).cpu()     # (1, P, V)
        targets.append(logp.gather(-1, window[:, 1:].unsqueeze(-1)).squeeze(-1))
        if top_k is None:
            logprobs.append(logp)
            continue
        if not 1 <= top_k <= logp.shape[-1]:
            raise ModelpressError(f"reference top-k must be between 1 and the vocabulary size {logp.shape[-1]}, "
                                  f"got {top_k}")
        values, picked = logp.topk(top_k, dim=-1)
        logprobs.append(values)
        indices.append(picked.to(torch.int32))
        tails.append(torch.logsumexp(logp.scatter(-1, picked, float("-inf")), dim=-1))
    cat = (lambda parts: torch.cat(parts) if parts else None)
    return ReferenceLogits(windows.detach().cpu().long(), torch.cat(targets), torch.cat(logprobs), cat(indices),
                           cat(tails))


@torch.no_grad()
@decoded_once()   # packed weights decoded once per evaluation, not per forward
def score_against(model: nn.Module, reference: ReferenceLogits, score: str = "all") -> QualityResult:
    """Perplexity of `model` and its KL(reference ‖ model) and top-1 agreement, over the reference's windows."""
    windows = reference.windows
    first = first_scored(windows.shape[1], score)
    nll = kl = 0.0
    agree = tokens = 0
    top1 = reference.top1()
    for i in range(windows.shape[0]):
        logp = F.log_softmax(next_token_logits(model, windows[i: i + 1]), dim=-1).cpu()[0, first:]   # (P', V)
        targets = windows[i, first + 1:]
        nll -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        ref = reference.logprobs[i, first:]
        if reference.exact:
            kl += (ref.exp() * (ref - logp)).sum().item()
        else:
            picked = reference.indices[i, first:].long()                            # type: ignore[index]
            mine = logp.gather(-1, picked)
            my_tail = torch.logsumexp(logp.scatter(-1, picked, float("-inf")), dim=-1)
            ref_tail = reference.tail[i, first:]                                     # type: ignore[index]
            tail = torch.where(torch.isneginf(ref_tail), 0.0, ref_tail.exp() * (ref_tail - my_tail))  # k = V: no tail
            kl += ((ref.exp() * (ref - mine)).sum() + tail.sum()).item()
        agree += int((top1[i, first:] == logp.argmax(-1)).sum())
        tokens += targets.numel()
    return QualityResult(perplexity=float(torch.exp(torch.tensor(nll / tokens))), kl_divergence=kl / tokens,
                         top1_agreement=agree / tokens, scored_tokens=tokens, windows=int(windows.shape[0]))


def reference_perplexity(reference: ReferenceLogits, score: str = "all") -> float:
    first = first_scored(reference.windows.shape[1], score)
    return float(torch.exp(-reference.target[:, first:].double().mean()))


class ReferenceCache:
    """Reference distributions by (model fingerprint, windows, k): in memory, and in `directory` if given,
    so a resumed pipeline does not run the reference again. `computed` counts the forward passes it made."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.dir = None if directory is None else Path(directory)
        self._memory: dict[str, ReferenceLogits] = {}
        self.computed = 0

    def get(self, model: nn.Module, fingerprint: str, windows: torch.Tensor, top_k: int | None) -> ReferenceLogits:
        key = cache_key(fingerprint, windows, top_k)
        if key in self._memory:
            return self._memory[key]
        path = None if self.dir is None else self.dir / f"reference-{key}.safetensors"
        if path is not None and path.exists():
            reference = _read(path)
        else:
            reference = compute_reference(model, windows, top_k)
            self.computed += 1
            if path is not None:
                _write(reference, path)
        self._memory[key] = reference
        return reference


def _write(reference: ReferenceLogits, path: Path) -> None:
    tensors = {"windows": reference.windows, "target": reference.target, "logprobs": reference.logprobs}
    if not reference.exact:
        tensors.update(indices=reference.indices, tail=reference.tail)
    with atomic_file(path, mode="wb") as handle:
        handle.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata={"producer": "modelpress"}))


def _read(path: Path) -> ReferenceLogits:
    try:
        t = load_file(str(path))
        return ReferenceLogits(t["windows"], t["target"], t["logprobs"], t.get("indices"), t.get("tail"))
    except (SafetensorError, OSError, KeyError) as err:
        raise ModelpressError(f"{path} is not a readable reference cache ({err}); delete it to compute it again"
                              ) from None
