"""SparseGPT (Frantar & Alistarh 2023): prune a layer column by column and move each removed weight's error
onto the columns not yet visited, weighted by the inverse Hessian of ||W X - Ŵ X||^2 (H = X X^T / n), so
the kept weights are re-fitted to reproduce the layer's output on calibration data. Optionally the kept
weights are quantized in the same pass (GPTQ's update, with pruned weights fixed at zero).

The Hessian machinery (dead inputs, dampening, the Cholesky factor of H^-1) is GPTQ's, imported from
algorithms/quantize/gptq.py. Mask choice, per lazy block of columns, scores w^2 / [H^-1]_jj^2 (the OBS
saliency) on the error-updated weights:
- unstructured: the lowest-saliency weights of the whole block; the counts per block add up to exactly
  round(s·N·K) for the layer;
- N:M: at every M-th column, the M-N lowest of the next M columns of each row;
- with quantization, masks are chosen for a whole quantization group (or, per channel, a lazy block) at
  its first column, with the same count in every row, before the group's scale is fixed from its kept
  weights. Every row then keeps the same number of weights per group, so the kept values pack into an
  (N, kept) matrix with groups of kept values only (nn/sparse_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from modelpress.algorithms.prune.common import SparsityTarget
from modelpress.algorithms.prune.masks import NMPattern, check_nm_shape, layer_mask, nm_mask, pruned_count, row_mask
from modelpress.algorithms.quantize.gptq import _one_cpu_thread as one_cpu_thread  # the same solver habit
from modelpress.algorithms.quantize.gptq import inverse_hessian_factor, prepare_hessian, storage_rounded
from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import DEFAULT_SKIP


@dataclass(frozen=True)
class SparseGPTConfig(SparsityTarget):
    scheme: WeightScheme | None = None     # quantize the kept weights in the same pass (e.g. int4/g128)
    block_size: int = 128                  # columns per lazy update (a multiple of the group / of M)
    damp: float = 0.01                     # added to H's diagonal, as a fraction of its mean
    true_sequential: bool = True           # re-run the block between dependency levels (q/k/v, then o, ...)
    skip: tuple[str, ...] = DEFAULT_SKIP
    compress: bool = True                  # store SparseLinear layers (False: zeros in dense layers)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.damp < 1:
            raise ModelpressError(f"SparseGPT damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ModelpressError(f"SparseGPT block size must be positive, got {self.block_size}")
        if self.scheme is not None and not self.compress:
            raise ModelpressError("quantized kept weights need compressed storage (compress=True)")


@dataclass(frozen=True)
class SparseGPTResult:
    """What the solver chose for an (N, K) weight (layer column order)."""

    mask: torch.Tensor              # (N, K) bool, True = kept
    weight: torch.Tensor            # (N, K) float32: zeros where pruned, re-fitted (and quantized) values elsewhere
    scale: torch.Tensor | None      # quantized only: (N, G) per group of K, (N, 1) per channel, (1, 1) per tensor
    offset: torch.Tensor | None     # affine formats: like scale

    def rows(self, start: int, stop: int) -> SparseGPTResult:
        """The result for rows start:stop (one layer of a jointly solved group; a per-tensor scale is shared)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.shape[0] == 1 else t[start:stop]
        return SparseGPTResult(self.mask[start:stop], self.weight[start:stop], pick(self.scale), pick(self.offset))


def _group_length(scheme: WeightScheme | None, k: int, block_size: int) -> int | None:
    """Columns that share one mask choice when quantizing: a group, or a lazy block per channel/tensor."""
    if scheme is None:
        return None
    return scheme.group_length(k) if scheme.granularity == "group" else block_size


def _kept_scale(values: torch.Tensor, keep: torch.Tensor, scheme: WeightScheme
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset) per row of (N, g) `values` from its kept entries only: pruned entries are stood in
    for by the row's mean kept value, which lies inside the kept values' range."""
    counts = keep.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (values * keep).sum(dim=1, keepdim=True) / counts
    filled = torch.where(keep, values, mean)
    scale, offset = scheme.qformat.scale_for(filled.float())
    return storage_rounded(scale, offset, scheme)


def _quantize(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: WeightScheme) -> torch.Tensor:
    return scheme.round_trip(w, scale, offset).to(w.dtype)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: NMPattern | None = None,
                    scheme: WeightScheme | None = None, block_size: int = 128, damp: float = 0.01,
                    row_splits: tuple[int, ...] | None = None) -> SparseGPTResult:
    """Prune (and with `scheme`, quantize) weight (N, K) against H (K, K) = X X^T / n. Works in H's dtype.

    Layers that read the same input share H: stack their weights row-wise and give their row counts as
    `row_splits` (summing to N) to solve them in one sweep. Every choice is per row except unstructured
    sparsity without quantization, whose per-block counts are then kept per layer, so each layer still
    loses exactly round(s·N_layer·K) weights. On the CPU the sweep runs on one thread (as GPTQ's)."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ModelpressError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight of shape {(n, k)}")
    splits = tuple(row_splits) if row_splits is not None else (n,)
    if sum(splits) != n or any(r <= 0 for r in splits):
        raise ModelpressError(f"row splits {splits} do not add up to the weight's {n} rows")
    if pattern is not None:
        check_nm_shape(k, pattern)
    with one_cpu_thread(hessian.device):
        return _sweep(weight, hessian, sparsity, pattern, scheme, block_size, damp, splits)


def _sweep(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: NMPattern | None,
           scheme: WeightScheme | None, block_size: int, damp: float, splits: tuple[int, ...]) -> SparseGPTResult:
    n, k = weight.shape
    h, w, _ = prepare_hessian(hessian, weight.to(hessian.dtype), damp, act_order=False)
    u = inverse_hessian_factor(h, damp)
    bounds = [(sum(splits[:j]), sum(splits[: j + 1])) for j in range(len(splits))]
    step = _group_length(scheme, k, block_size)
    if scheme is not None and pattern is not None and scheme.granularity == "group" and step % pattern.m:
        raise ModelpressError(f"group size {step} is not a multiple of the pattern's {pattern.m} inputs")
    align = step or (pattern.m if pattern is not None else 1)
    block = max(1, block_size // align) * align

    keep = torch.ones(n, k, dtype=torch.bool, device=w.device)
    out = torch.zeros_like(w)
    scales: list[torch.Tensor] = []
    offsets: list[torch.Tensor | None] = []
    if scheme is not None and scheme.granularity != "group":
        full = w if scheme.granularity == "channel" else w.reshape(1, -1)
        scale, offset = storage_rounded(*scheme.qformat.scale_for(full.float()), scheme)
        scales.append(scale)
        offsets.append(offset)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        if scheme is None and pattern is None:
            for r1, r2 in bounds:  # exact counts per layer: round(s·rows·i2) pruned by the end of this block
                rows = r2 - r1
                count = pruned_count(rows * i2, sparsity) - pruned_count(rows * i1, sparsity)
                part = w1[r1:r2]
                keep[r1:r2, i1:i2] = layer_mask(part**2 / d**2, count / part.numel() if part.numel() else 0.0)
        for i in range(i2 - i1):
            col = i1 + i
            if scheme is None and pattern is not None and i % pattern.m == 0:
                saliency = w1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m] ** 2
                keep[:, col : col + pattern.m] = nm_mask(saliency, pattern)
            if step is not None and i % step == 0:
                stop = min(i + step, i2 - i1)
                saliency = w1[:, i:stop] ** 2 / d[i:stop] ** 2
                keep[:, col : i1 + stop] = _group_mask(saliency, sparsity, pattern)
                if scheme.granularity == "group":  # type: ignore[union-attr]
                    scale, offset = _kept_scale(w1[:, i:stop], keep[:, col : i1 + stop], scheme)  # type: ignore[arg-type]
                    scales.append(scale)
                    offsets.append(offset)
            q = w1[:, i] * keep[:, col]
            if scheme is not None:
                q = torch.where(keep[:, col], _quantize(q, scale, offset, scheme), torch.zeros_like(q))
            out[:, col] = q
            err = (w1[:, i] - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    scale_t, offset_t = _stack(scales, offsets, scheme, n)
    return SparseGPTResult(keep, out.float(), scale_t, offset_t)


def _group_mask(saliency: torch.Tensor, sparsity: float, pattern: NMPattern | None) -> torch.Tensor:
    """Same count kept in every row of a group: N:M inside it, or round(s·g) pruned per row (at least one kept)."""
    if pattern is not None:
        return nm_mask(saliency, pattern)
    g = saliency.shape[1]
    count = min(pruned_count(g, sparsity), g - 1)
    return row_mask(saliency, count / g)


def _stack(scales: list, offsets: list, scheme: WeightScheme | None, n: int):
    if scheme is None:
        return None, None
    if scheme.granularity == "tensor":
        return scales[0].reshape(1, 1).float(), None if offsets[0] is None else offsets[0].reshape(1, 1).float()
    scale = torch.stack([s.reshape(n) for s in scales], dim=1).float()
    offset = None if offsets[0] is None else torch.stack([o.reshape(n) for o in offsets], dim=1).float()
    return scale, offset


def compact_scheme(scheme: WeightScheme, in_features: int, sparsity: float, pattern: NMPattern | None) -> WeightScheme:
    """The scheme of the kept values packed as an (N, kept) matrix: a group of g inputs keeps g·N/M (or
    g - round(s·g)) values, which become one group of the compact matrix."""
    if scheme.granularity != "group":
        return scheme
    g = scheme.group_length(in_features)
    kept = g * pattern.n // pattern.m if pattern is not None else g - min(pruned_count(g, sparsity), g - 1)
    return replace(scheme, group_size=kept)


def pack_kept(result: SparseGPTResult, scheme: WeightScheme, sparsity: float, pattern: NMPattern | None,
              name: str = "weight") -> PackedWeight:
    """The kept (quantized) values of a jointly solved layer as a PackedWeight of shape (N, kept per row)."""
    n, k = result.mask.shape
    per_row = result.mask.sum(dim=1)
    if not bool((per_row == per_row[0]).all()):
        raise ModelpressError(f"{name}: rows keep different counts; cannot pack the kept values as a matrix")
    kept = result.weight[result.mask].reshape(n, int(per_row[0]))
    packed_scheme = compact_scheme(scheme, k, sparsity, pattern)
    return quantize_weight(kept, packed_scheme, scale=result.scale, offset=result.offset, name=name)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - Ŵ X||^2 / n = trace((W - Ŵ) H (W - Ŵ)^T)."""
    delta = weight.to(hessian.dtype) - pruned.to(hessian.dtype)
    return float(((delta @ hessian) * delta).sum())
