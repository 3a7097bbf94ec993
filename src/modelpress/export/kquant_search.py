"""How a k-quant grid is searched: weighted least squares on sub-blocks, then on the stored header.

Shapes: a weight (N, K) is viewed as x (N, SB, P, S): SB = K/256 super-blocks per row, P sub-blocks of S
weights each. `w` is a non-negative weight broadcastable to x (per-input-column importance), or None when
every weight counts the same; every error here is Σ w·(x − x̂)².

Two stages, both vectorised over all rows and blocks (the only Python loops run over candidates and rounds):
1. Per sub-block, a continuous scale (and offset) is searched: several candidate inverse scales round x to
   integer levels, each rounding gets its weighted least-squares scale/offset, the best one wins, and a few
   alternating rounds (re-round, refit) polish it.
2. The sub-block scales are stored as small integers times one fp16 super-block scale. Starting from
   "largest sub-scale maps to the largest integer", alternating rounds re-round the codes, refit every
   sub-block, re-round its integer scale, and refit the fp16 super-block scale(s) by least squares over the
   whole super-block; a super-block keeps a round only when its weighted error went down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Targets, in levels, onto which the sub-block's range (or peak) is mapped: a little more and a little less
# than the full range, as llama.cpp's make_qkx2_quants / make_qx_quants also scan. Steps of 0.2 levels
# (0.3 symmetric) instead of llama.cpp's 0.1 cost < 0.1% RMSE on Gaussian and Student-t weights (the
# polish and stage 2 recover it) and save a third of the time.
AFFINE_STEPS = tuple(-1.0 + 0.2 * i for i in range(11))
SYMMETRIC_STEPS = tuple(-0.9 + 0.3 * i for i in range(7))
POLISH_ROUNDS = 2


@dataclass(frozen=True)
class AffineHeader:
    """Asymmetric types: value = d·sc·q − dmin·m, per super-block d/dmin (fp16) and per sub-block sc/m."""

    d: torch.Tensor      # float16 (N, SB)
    sc: torch.Tensor     # int16 (N, SB, P), 0..max_int
    dmin: torch.Tensor   # float16 (N, SB)
    m: torch.Tensor      # int16 (N, SB, P), 0..max_int

    def scale(self) -> torch.Tensor:   # float32 (N, SB, P), as ggml's decoder computes it
        return self.d.float().unsqueeze(-1) * self.sc.float()

    def offset(self) -> torch.Tensor:
        return -(self.dmin.float().unsqueeze(-1) * self.m.float())


@dataclass(frozen=True)
class SymmetricHeader:
    """Symmetric types: value = d·sc·(u − half), per super-block d (fp16) and signed per sub-block sc."""

    d: torch.Tensor      # float16 (N, SB)
    sc: torch.Tensor     # int16 (N, SB, P), lo..hi

    def scale(self) -> torch.Tensor:
        return self.d.float().unsqueeze(-1) * self.sc.float()


# ---------------------------------------------------------------- rounding onto a fixed grid

def affine_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, nmax: int) -> torch.Tensor:
    """Nearest level of scale·q + offset, q in 0..nmax; x (..., S), scale/offset (...)."""
    return torch.round((x - offset.unsqueeze(-1)) * _inverse(scale).unsqueeze(-1)).clamp_(0, nmax)


def symmetric_codes(x: torch.Tensor, scale: torch.Tensor, half: int) -> torch.Tensor:
    """Nearest level of scale·q, q in −half..half−1 (signed, float)."""
    return torch.round(x * _inverse(scale).unsqueeze(-1)).clamp_(-half, half - 1)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, and 0 where the scale is 0 (every weight of such a sub-block gets code 0 / level 0)."""
    live = scale != 0
    return torch.where(live, 1 / torch.where(live, scale, torch.ones_like(scale)), torch.zeros_like(scale))


# ---------------------------------------------------------------- stage 1: continuous sub-block fits

def affine_least_squares(sw, swl, swl2, swx, swlx) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ≥ 0 and offset ≤ 0 minimising Σ w (scale·L + offset − x)², from the weighted sums."""
    det = sw * swl2 - swl * swl
    ok = det > 1e-6 * sw * swl2
    safe = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (sw * swlx - swl * swx) / safe, torch.zeros_like(det))
    offset = torch.where(ok, (swl2 * swx - swl * swlx) / safe, swx / sw.clamp_min(1e-30))
    # the stored offset is −dmin·m with m ≥ 0: refit the scale alone where the free offset came out positive
    clip = offset > 0
    alone = torch.where(swl2 > 0, swlx / swl2.clamp_min(1e-30), torch.zeros_like(swl2))
    scale = torch.where(clip, alone, scale).clamp_min(0)
    offset = torch.where(clip, torch.zeros_like(offset), offset)
    return scale, offset


def affine_error(sw, swl, swl2, swx, swlx, swx2, scale, offset) -> torch.Tensor:
    """Σ w (scale·L + offset − x)² expanded into the weighted sums."""
    return (swx2 - 2 * scale * swlx - 2 * offset * swx + scale * scale * swl2
            + 2 * scale * offset * swl + offset * offset * sw)


def data_sums(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σw, Σw·x, Σw·x² per sub-block; w None means every weight counts 1."""
    if w is None:
        return torch.full(x.shape[:-1], float(x.shape[-1]), device=x.device), x.sum(-1), vecdot(x, x)
    wx = w * x
    return w.expand_as(x).sum(-1), wx.sum(-1), vecdot(wx, x)


def level_sums(x: torch.Tensor, w: torch.Tensor | None, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σw·L·x and Σw·L² per sub-block, for levels L (..., S)."""
    wl = codes if w is None else w * codes
    return vecdot(wl, x), vecdot(wl, codes)


def affine_sums(x: torch.Tensor, w: torch.Tensor | None, codes: torch.Tensor):
    """Σw·L, Σw·L², Σw·L·x per sub-block."""
    wl = codes if w is None else w * codes
    return wl.sum(-1), vecdot(wl, codes), vecdot(wl, x)


def vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)   # one pass, no (..., S) temporary


def fit_affine(x: torch.Tensor, w: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block scale ≥ 0 and offset ≤ 0 for x (..., S); returns two (...) tensors."""
    low = x.amin(-1).clamp(max=0)
    span = x.amax(-1) - low
    inv_span = _inverse(span)
    shifted = x - low.unsqueeze(-1)
    sw, swx, swx2 = data_sums(x, w)
    best_err = torch.full_like(span, float("inf"))
    best_scale, best_offset = span / nmax, low
    for attempt in range(len(AFFINE_STEPS) + POLISH_ROUNDS):
        if attempt < len(AFFINE_STEPS):   # scan: the range maps onto nmax + step levels
            codes = torch.round(shifted * ((nmax + AFFINE_STEPS[attempt]) * inv_span).unsqueeze(-1)).clamp_(0, nmax)
        else:                             # polish: re-round on the best fit so far
            codes = affine_codes(x, best_scale, best_offset, nmax)
        swl, swl2, swlx = affine_sums(x, w, codes)
        scale, offset = affine_least_squares(sw, swl, swl2, swx, swlx)
        err = affine_error(sw, swl, swl2, swx, swlx, swx2, scale, offset)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def fit_symmetric(x: torch.Tensor, w: torch.Tensor | None, half: int) -> torch.Tensor:
    """Per sub-block signed scale for levels −half..half−1 minimising Σ w (scale·q − x)²; x (..., S)."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)   # signed value of largest magnitude
    inv_peak = _inverse(peak)
    # the peak goes to the long (negative) end of the level range, or to the short (positive) end
    targets = [-(half + step) for step in SYMMETRIC_STEPS] + [half - 1 + step for step in SYMMETRIC_STEPS]
    best_gain = torch.zeros_like(peak)      # the error is Σwx² − gain, gain = (Σwxq)² / Σwq²
    best_scale = torch.zeros_like(peak)
    for attempt in range(len(targets) + POLISH_ROUNDS):
        if attempt < len(targets):
            codes = torch.round(x * (targets[attempt] * inv_peak).unsqueeze(-1)).clamp_(-half, half - 1)
        else:
            codes = symmetric_codes(x, best_scale, half)
        swqx, swq2 = level_sums(x, w, codes)
        ok = swq2 > 0
        denominator = torch.where(ok, swq2, torch.ones_like(swq2))
        gain = torch.where(ok, swqx * swqx / denominator, torch.zeros_like(swq2))
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, swqx / denominator, best_scale)
    return best_scale
