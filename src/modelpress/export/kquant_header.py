"""Stage 2 of the k-quant search: sub-block scales stored as small integers times one fp16 scale per
super-block, and the alternating refinement of that header (see kquant_search.py for shapes and stage 1).

Every refinement round, per super-block: round the weights onto the current header, refit each sub-block's
free scale (and offset) by weighted least squares, round those onto the current fp16 scale(s), refit the
fp16 scale(s) by least squares over the whole super-block, and keep the new header only where the weighted
error went down. So the error never rises, and the header always stays exactly storable.
"""

from __future__ import annotations

import torch

from modelpress.export.kquant_search import (
    AffineHeader,
    SymmetricHeader,
    affine_codes,
    affine_error,
    affine_least_squares,
    affine_sums,
    data_sums,
    level_sums,
    symmetric_codes,
)

REFINE_ROUNDS = 3


def integers_for(values: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Nearest integers in lo..hi of values (N, SB, P) / d (N, SB) (float16); 0 where d is 0."""
    step = d.float().unsqueeze(-1)
    live = step != 0
    ints = torch.round(values / torch.where(live, step, torch.ones_like(step))).clamp_(lo, hi)
    return torch.where(live, ints, torch.zeros_like(ints)).to(torch.int16)


def integer_header(values: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 d (N, SB) and integers (N, SB, P) with d·ints ≈ values: the largest magnitude maps onto the
    longer end of lo..hi (hi for unsigned sub-scales, lo for signed ones, as in llama.cpp)."""
    peak = values.gather(-1, values.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = (peak / (hi if lo == 0 else lo)).to(torch.float16)
    return d, integers_for(values, d, lo, hi)


def _pick(better: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    mask = better if new.dim() == better.dim() else better.unsqueeze(-1)
    return torch.where(mask, new, old)


# ---------------------------------------------------------------- asymmetric types (Q2_K, Q4_K, Q5_K)

def affine_header(x: torch.Tensor, w: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor,
                  nmax: int, max_int: int) -> AffineHeader:
    """Store free sub-block fits (scale ≥ 0, offset ≤ 0; (N, SB, P)) as a refined header; x (N, SB, P, S)."""
    d, sc = integer_header(scale, 0, max_int)
    dmin, m = integer_header(-offset, 0, max_int)
    header = AffineHeader(d, sc, dmin, m)
    totals = data_sums(x, w)   # Σw, Σwx, Σwx² per sub-block
    sums, err = _affine_state(x, w, header, totals, nmax)
    for _ in range(REFINE_ROUNDS):
        candidate = _refit_affine(header, totals, sums, max_int)
        new_sums, new_err = _affine_state(x, w, candidate, totals, nmax)
        better = new_err < err
        header = AffineHeader(*(_pick(better, new, old) for new, old in
                                zip((candidate.d, candidate.sc, candidate.dmin, candidate.m),
                                    (header.d, header.sc, header.dmin, header.m))))
        sums = tuple(_pick(better, new, old) for new, old in zip(new_sums, sums))
        err = torch.minimum(new_err, err)
    return header


def _affine_state(x, w, header: AffineHeader, totals, nmax: int):
    """Per sub-block sums (ΣwL, ΣwL², ΣwLx) of the codes on `header`, and the (N, SB) weighted error."""
    scale, offset = header.scale(), header.offset()
    sums = affine_sums(x, w, affine_codes(x, scale, offset, nmax))
    sw, swx, swx2 = totals
    err = affine_error(sw, sums[0], sums[1], swx, sums[2], swx2, scale, offset).sum(-1)
    return sums, err


def _refit_affine(header: AffineHeader, totals, sums, max_int: int) -> AffineHeader:
    sw, swx, _ = totals
    swl, swl2, swlx = sums
    scale, offset = affine_least_squares(sw, swl, swl2, swx, swlx)
    sc = integers_for(scale, header.d, 0, max_int).float()
    m = integers_for(-offset, header.dmin, 0, max_int).float()
    # least squares of x ≈ d·(sc·L) + dmin·(−m) over the super-block, from the sub-block sums
    saa, sbb, sab = (sc * sc * swl2).sum(-1), (m * m * sw).sum(-1), -(sc * m * swl).sum(-1)
    sax, sbx = (sc * swlx).sum(-1), -(m * swx).sum(-1)
    det = saa * sbb - sab * sab
    ok = det > 1e-6 * saa * sbb
    safe = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (sbb * sax - sab * sbx) / safe, header.d.float())
    dmin = torch.where(ok, (saa * sbx - sab * sax) / safe, header.dmin.float())
    alone = dmin < 0   # no offsets: refit d alone
    d = torch.where(alone, sax / saa.clamp_min(1e-30), d).clamp_min(0)
    dmin = dmin.clamp_min(0)
    return AffineHeader(d.to(torch.float16), sc.to(torch.int16), dmin.to(torch.float16), m.to(torch.int16))


# ---------------------------------------------------------------- symmetric types (Q3_K, Q6_K)

def symmetric_header(x: torch.Tensor, w: torch.Tensor | None, scale: torch.Tensor, half: int,
                     lo: int, hi: int) -> SymmetricHeader:
    """Store free signed sub-block scales (N, SB, P) as a refined header; x (N, SB, P, S)."""
    d, sc = integer_header(scale, lo, hi)
    header = SymmetricHeader(d, sc)
    swx2 = data_sums(x, w)[2]
    sums, err = _symmetric_state(x, w, header, swx2, half)
    for _ in range(REFINE_ROUNDS):
        candidate = _refit_symmetric(header, sums, lo, hi)
        new_sums, new_err = _symmetric_state(x, w, candidate, swx2, half)
        better = new_err < err
        header = SymmetricHeader(_pick(better, candidate.d, header.d), _pick(better, candidate.sc, header.sc))
        sums = tuple(_pick(better, new, old) for new, old in zip(new_sums, sums))
        err = torch.minimum(new_err, err)
    return header


def _symmetric_state(x, w, header: SymmetricHeader, swx2, half: int):
    scale = header.scale()
    codes = symmetric_codes(x, scale, half)
    swqx, swq2 = level_sums(x, w, codes)
    err = (swx2 - 2 * scale * swqx + scale * scale * swq2).sum(-1)
    return (swqx, swq2), err


def _refit_symmetric(header: SymmetricHeader, sums, lo: int, hi: int) -> SymmetricHeader:
    swqx, swq2 = sums
    free = torch.where(swq2 > 0, swqx / swq2.clamp_min(1e-30), torch.zeros_like(swq2))
    sc = integers_for(free, header.d, lo, hi).float()
    # least squares of x ≈ d·(sc·q) over the super-block
    num, den = (sc * swqx).sum(-1), (sc * sc * swq2).sum(-1)
    d = torch.where(den > 0, num / den.clamp_min(1e-30), header.d.float())
    return SymmetricHeader(d.to(torch.float16), sc.to(torch.int16))
