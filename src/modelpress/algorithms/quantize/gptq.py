"""GPTQ (Frantar et al. 2023): quantize a layer's weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer objective
||W X - Q X||^2 (H = X X^T / n from calibration activations).

The math is `gptq_solve` (pure tensors in, codes and scales out). The rest of the file is plumbing: the
`GPTQ` algorithm that accumulates Hessians from the engine's observations and turns solutions into
PackedWeights, and `quantize_gptq`, the entry point that runs it over a model.

Choices, with reasons:
- Activation order: columns are visited in order of decreasing H_ii. Two layouts of the groups:
  - static groups (default, `static_groups=True`): every group's scale (and offset) is fixed before the
    sweep, from the weight in the layer's own column order, by a grid rule (`GroupGrid`; default: the
    format's rule with the scale search below). Each visited column is rounded on the grid of the group it
    belongs to in the layer's order, and codes are stored in that order: no `input_perm`, groups exactly
    the scheme's, so GGUF and compressed-tensors can take the result losslessly (and no 32 bits per input
    column for the permutation). A caller-supplied grid (a k-quant grid, AWQ's clipped ranges) plugs in here.
  - permuted (`static_groups=False`): the permutation becomes the packed weight's `input_perm` and groups
    are cut in that *stored* order, so every group is a contiguous run of stored columns and inference
    needs one gather of x, never a per-column gather of scales (no g_idx). A group's scale is chosen from
    the error-updated weights when the loop reaches the group's first stored column; lazy blocks are a
    multiple of the group size so that all of a group's current values are in the block being worked on.
  Without activation order both layouts are the same (groups in the layer's order, scales chosen lazily
  from the error-updated weights) unless a grid is given.
- Scale search (`shrink_steps`, default 20): the rule is also tried on the group shrunk by 2.5%, 5%, ...
  and each row keeps the candidate with the least H_jj-weighted rounding error. On SmolLM2-135M this took
  INT3/g128 from +216% to +44% perplexity and INT4/g128 to +9% (16 calibration samples).
- `true_sequential` (re-running the block between q/k/v, o, gate/up and down) is off by default: on
  SmolLM2 it changed perplexity by -6% (INT3) to +1% (INT4) and costs ~40% more calibration time.
- Scales are rounded to their storage dtype before any column is encoded, so the codes are exactly those
  the solver chose. With double-quantized scales that is impossible in the permuted layout (the scales are
  coded together at the end): there the codes are re-rounded once against the double-quantized scales.
  Static groups know every scale before the sweep, so they are double-quantized first and the codes are
  chosen on the grid that is stored.
- Dead inputs (H_ii = 0: never active in calibration) get H_ii = 1 and weight 0 during the solve.
- `schemes` (full layer name -> scheme, from mixed precision) overrides the scheme layer by layer; layers
  of one input group that share a scheme are still solved as one matrix.
- `float_target` (on by default since 2026-12-08) fits the float model's outputs instead of the layer's own: the
  objective becomes ||Q X~ - W X||^2, X the layer's input in the float model and X~ its input in the model quantized so
  far, on the same tokens (GPTAQ's "asymmetric calibration", Li et al. 2025), so that each layer also makes up
  for the error of the layers before it. Solved exactly as GPTQ on a moved target: with H~ = X~^T X~ / n and
  D = (X - X~)^T X~ / n, the least-squares weight on X~ is W* = W (H~ + D) H~^-1 = W + W D H~^-1, and
  ||Q X~ - W X||^2 = ||(Q - W*) X~||^2 + a constant, so GPTQ on (W*, H~) minimizes the new objective. H~ is
  dampened as for the solve, which keeps W* near W in directions the calibration text barely explores. It
  implies true-sequential solving (see `GPTQ.sequential`). On the default model (H100, 256 generated windows,
  docs/cross_domain.md) it took int4/g128's KL from 0.177 to 0.097 on the calibration text and from 0.296 to 0.211 on
  unseen bible text, and lowered int3's on every text under each of five rotation draws. Its costs: the float model's
  hidden states on the calibration device beside the quantized model's, a float copy of the block being solved,
  one more block forward per level (calibration time +25% on that GPU, x2 on a 2-core CPU). float_target=False
  gives plain GPTQ (`quantize --no-float-target`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.algorithms.quantize.gguf_grid import gguf_grid, gguf_scheme
from modelpress.algorithms.quantize.mixed import check_layer_schemes, layer_scheme
from modelpress.engine.algorithm import InputGroup, LayerSolution, LayerTarget
from modelpress.engine.blocks import BlockStack
from modelpress.engine.context import BlockContext
from modelpress.engine.distributed import Ranks
from modelpress.engine.resume import config_description
from modelpress.engine.runner import RunReport
from modelpress.errors import ModelpressError
from modelpress.formats.packed import (
    PackedWeight,
    dequantize_scales,
    expand_groups,
    quantize_scales,
    quantize_weight,
)
from modelpress.formats.packing import pack_codes
from modelpress.formats.scheme import WeightScheme, as_scheme
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, replace_module

log = logging.getLogger(__name__)

Ranges = tuple[torch.Tensor, "torch.Tensor | None"]   # scale and offset, each (N, G); (1, 1) per tensor
GroupGrid = Callable[[torch.Tensor], Ranges]
"""Static groups' ranges: (N, K) weight in the layer's column order -> (scale, offset), offset None for
scale-only formats. Rounded to the scale dtype by the solver; the codes are chosen on exactly those."""
DEFAULT_DAMP = 0.1
"""H's diagonal gets DEFAULT_DAMP x its mean added before the solve. The usual 0.01 trusts the calibration
text's Hessian in directions it barely explores; text of another domain then finds the error GPTQ pushed
there (bench/cross_domain_layers.py: calibrated on the Python docs, GPTQ int4/g128's layer objective under
the King James Bible's Hessian went from 0.75x RTN's at 0.01 to 0.57x at 0.1, in-domain unchanged, 0.21x)."""
GridRule = Callable[[torch.Tensor, torch.Tensor, WeightScheme], Ranges]
"""A grid for any layer: (weight (N, K), hessian (K, K), scheme) -> (scale, offset), e.g. AWQ's clip
search or a k-quant grid. GPTQConfig.grid; GPTQ binds it to each layer as a GroupGrid."""


@dataclass(frozen=True)
class GPTQConfig:
    scheme: WeightScheme | str         # a WeightScheme or its spec, e.g. "int4/g128"
    damp: float = DEFAULT_DAMP         # added to H's diagonal, as a fraction of its mean (see the docstring)
    block_size: int = 128              # columns per lazy batch update (rounded to a multiple of the group)
    act_order: bool = True             # visit columns by decreasing H_ii
    static_groups: bool = True         # with act_order: groups fixed up front in the layer's order, no input_perm
    true_sequential: bool = False      # re-run the block between dependency levels (q/k/v, then o, ...)
    shrink_steps: int = 20             # >1: search that many scale shrink factors per group (see group_params)
    keep_better_of_rtn: bool = True    # keep RTN for a layer where it scores better on the layer objective
    float_target: bool = True          # fit the float model's outputs ||Q X~ - W X||; implies true_sequential
    skip: tuple[str, ...] = DEFAULT_SKIP
    schemes: Mapping[str, WeightScheme] | None = field(default=None, hash=False)   # per layer (full name)
    # static groups' ranges: None (the format's rule), "gguf" (GGUF's own grids, gguf_grid.py) or a GridRule
    grid: GridRule | str | None = field(default=None, hash=False)

    def scheme_of(self, name: str) -> WeightScheme:
        return layer_scheme(self.scheme, self.schemes, name)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", as_scheme(self.scheme))
        check_layer_schemes(self.schemes)
        if isinstance(self.grid, str):
            grid_rule(self.grid)    # a known name
            if self.grid == "gguf":  # k-quant grids need float32 scale storage
                object.__setattr__(self, "scheme", gguf_scheme(self.scheme))
                if self.schemes:
                    object.__setattr__(self, "schemes", {k: gguf_scheme(v) for k, v in self.schemes.items()})
        if not 0 <= self.damp < 1:
            raise ModelpressError(f"GPTQ damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ModelpressError(f"GPTQ block size must be positive, got {self.block_size}")
        if not 1 <= self.shrink_steps <= int(1 / SHRINK_STEP):
            raise ModelpressError(f"GPTQ shrink steps must be in 1..{int(1 / SHRINK_STEP)}, got {self.shrink_steps}")
        if self.grid is not None and not self.static_groups:
            raise ModelpressError("a GPTQ grid rule fixes group ranges up front and needs static_groups=True")


GRID_RULES: dict[str, GridRule] = {"gguf": gguf_grid}


def grid_rule(grid: GridRule | str | None) -> GridRule | None:
    """The rule a GPTQConfig.grid names (or is)."""
    if not isinstance(grid, str):
        return grid
    try:
        return GRID_RULES[grid]
    except KeyError:
        raise ModelpressError(f"unknown GPTQ grid {grid!r}; known: {', '.join(sorted(GRID_RULES))}") from None


@dataclass(frozen=True)
class GPTQSolution:
    """What the solver chose for an (N, K) weight. Columns are in stored order (see input_perm)."""

    scheme: WeightScheme
    codes: torch.Tensor               # (N, K) uint8
    scale: torch.Tensor               # (N, G) float32, already rounded to the scheme's scale dtype; (1, 1) per tensor
                                      # (double quantization: before it; packing codes them)
    offset: torch.Tensor | None       # (N, G) float32 for affine formats
    input_perm: torch.Tensor | None   # (K,) int64: stored column j is input column input_perm[j]
    quantized: torch.Tensor           # (N, K) float32 dequantized weight in the layer's own column order

    def rows(self, start: int, stop: int) -> GPTQSolution:
        per_tensor = self.scale.shape == (1, 1)
        pick = (lambda t: t) if per_tensor else (lambda t: t[start:stop])
        return GPTQSolution(self.scheme, self.codes[start:stop], pick(self.scale),
                            None if self.offset is None else pick(self.offset), self.input_perm,
                            self.quantized[start:stop])

    def packed(self) -> PackedWeight:
        n, k = self.codes.shape
        scheme = self.scheme
        perm = None if self.input_perm is None else self.input_perm.to(torch.int32)
        if scheme.double_quant:
            return quantize_weight(self.quantized, scheme, scale=self.scale, offset=self.offset,
                                   input_perm=self.input_perm)
        dtype = scheme.torch_scale_dtype
        return PackedWeight(scheme=scheme, shape=(n, k), qdata=pack_codes(self.codes, scheme.bits),
                            scale=self.scale.to(dtype), offset=None if self.offset is None else self.offset.to(dtype),
                            input_perm=perm)


def storage_rounded(scale: torch.Tensor, offset: torch.Tensor | None, scheme: WeightScheme
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset) rounded by the scheme's storage rule (WeightScheme.stored_ranges), as float32."""
    scale, offset = scheme.stored_ranges(scale, offset, "a GPTQ group")
    return scale.float(), None if offset is None else offset.float()


def group_params(values: torch.Tensor, scheme: WeightScheme, importance: torch.Tensor | None = None,
                 shrink_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/offset for values (N, g) -> (N,) each, rounded for storage. With shrink_steps > 1, the format's
    rule is applied to the values scaled by 1, 0.975, 0.95, ... (shrink_steps factors) and each row keeps
    the factor with the least importance-weighted squared rounding error (clipping a few large weights
    for a finer grid). `importance` (g,) weighs columns (H_jj); None weighs them equally."""
    fmt = scheme.qformat
    best = storage_rounded(*fmt.scale_for(values.float()), scheme)
    if shrink_steps <= 1:
        return best
    weights = torch.ones(values.shape[-1], device=values.device) if importance is None else importance.float()
    best_err = _rounding_error(values, *best, scheme, weights)
    for step in range(1, shrink_steps):
        factor = 1 - SHRINK_STEP * step
        scale, offset = storage_rounded(*fmt.scale_for(values.float() * factor), scheme)
        err = _rounding_error(values, scale, offset, scheme, weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]),
                None if offset is None else torch.where(better, offset, best[1]))  # type: ignore[arg-type]
    return best


SHRINK_STEP = 0.025


def _rounding_error(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: WeightScheme,
                    weights: torch.Tensor) -> torch.Tensor:
    """(N,) sum over columns of weights * (value - quantized value)^2."""
    x = values.float()
    q = scheme.round_trip(x, scale.unsqueeze(-1), None if offset is None else offset.unsqueeze(-1))
    return ((x - q) ** 2 * weights).sum(-1)


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: WeightScheme
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) column -> (codes (N,) uint8, dequantized values (N,) in w's dtype)."""
    fmt = scheme.qformat
    shifted = w.float() - offset if offset is not None else w.float()
    codes = fmt.encode(shifted / scale)
    values = fmt.decode(codes) * scale
    if offset is not None:
        values = values + offset
    return codes, values.to(w.dtype)


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, damp: float, act_order: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dead inputs zeroed, columns permuted by activation order, diagonal dampened.
    Returns (H (K, K), W (N, K), perm or None), both in the solver's column order."""
    h = hessian.clone()
    w = weight.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return h, w, perm


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U). Row j of U, divided by U_jj, is row j of the inverse
    Hessian after columns < j have been eliminated: exactly the OBS update GPTQ needs, for all j at once."""
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower                  # K x K each: keep at most two alive (K = 28672 is 3.3 GB in float32)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return upper
        extra = damp * 10 ** (attempt + 1) * torch.mean(torch.diag(h)) + 1e-8
        log.warning("GPTQ: Hessian not positive definite; adding %.3g to its diagonal", float(extra))
        h = h + extra * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    raise ModelpressError("GPTQ: the Hessian stays singular after dampening; check the calibration data")


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, damp: float = DEFAULT_DAMP,
               block_size: int = 128, act_order: bool = True, shrink_steps: int = 1, static_groups: bool = True,
               grid: GroupGrid | None = None) -> GPTQSolution:
    """Quantize weight (N, K) given H (K, K) = X X^T / n. Works in H's dtype (float32, or float64 for tests).
    With act_order and a grouped scheme, `static_groups` fixes every group's range up front in the layer's
    column order (by `grid`, default `format_grid` with the scale search) and stores no permutation; a
    `grid` is honoured whatever the order or granularity. See the module docstring."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ModelpressError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight of shape {(n, k)}")
    if grid is not None and not static_groups:
        raise ModelpressError("a GPTQ grid fixes group ranges up front and needs static_groups=True")
    with _one_cpu_thread(hessian.device):
        h, w, perm = prepare_hessian(hessian, weight.to(hessian.dtype), damp, act_order)
        u = inverse_hessian_factor(h, damp)
        if grid is not None or (static_groups and act_order and scheme.granularity == "group"):
            return _static_solve(w, h, u, perm, scheme, block_size, shrink_steps, grid)
        codes, quantized, scale, offset = _column_loop(w, u, scheme, block_size, torch.diag(h), shrink_steps)
    if perm is not None and scheme.granularity != "group":
        # scales do not depend on column order here: store columns in the layer's order, no gather needed
        inverse = torch.argsort(perm)
        codes, quantized, perm = codes[:, inverse], quantized[:, inverse], None
    elif perm is not None:
        quantized = quantized[:, torch.argsort(perm)]
    return GPTQSolution(scheme, codes, scale, offset, perm, quantized.float())


def format_grid(weight: torch.Tensor, scheme: WeightScheme, importance: torch.Tensor | None = None,
                shrink_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scheme's own ranges for an (N, K) weight, group by group in column order: (scale, offset), each
    (N, G) ((1, 1) per tensor), rounded for storage; `group_params` per group (scale search with
    shrink_steps > 1, columns weighed by importance (K,)). With shrink_steps=1: RTN's scales."""
    n, k = weight.shape
    importance = torch.ones(k, device=weight.device) if importance is None else importance
    if scheme.granularity == "tensor":
        scale, offset = group_params(weight.reshape(1, -1), scheme, importance.repeat(n), shrink_steps)
        return scale.reshape(1, 1), None if offset is None else offset.reshape(1, 1)
    g = scheme.group_length(k)
    pieces = [group_params(weight[:, j : j + g], scheme, importance[j : j + g], shrink_steps) for j in range(0, k, g)]
    scale = torch.stack([p[0] for p in pieces], dim=1).float()
    offset = None if pieces[0][1] is None else torch.stack([p[1] for p in pieces], dim=1).float()  # type: ignore[misc]
    return scale, offset


def _static_solve(w: torch.Tensor, h: torch.Tensor, u: torch.Tensor, perm: torch.Tensor | None,
                  scheme: WeightScheme, block_size: int, shrink_steps: int, grid: GroupGrid | None) -> GPTQSolution:
    """Static groups: ranges from the prepared W (N, K) in the layer's column order, the sweep in the
    solver's order (perm), codes stored in the layer's order."""
    n, k = w.shape
    inverse = None if perm is None else torch.argsort(perm)
    in_order = w if inverse is None else w[:, inverse]      # dead inputs already zeroed
    if grid is None:
        importance = torch.diag(h) if inverse is None else torch.diag(h)[inverse]
        scale, offset = format_grid(in_order, scheme, importance, shrink_steps)
    else:
        scale, offset = _checked_grid(grid(in_order.float()), scheme, (n, k))
    scale, offset = storage_rounded(scale, offset, scheme)
    real_scale = scale
    if scheme.double_quant:   # coded together, as packing will code them (deterministic): sweep on those
        block = scheme.double_quant_block
        real_scale = dequantize_scales(*quantize_scales(scale, block), block)
    g = scheme.group_length(k)
    fixed = [None if t is None else expand_groups(t, n, k, g) for t in (real_scale, offset)]
    if perm is not None:                                     # (N, K) ranges of each column, in solver order
        fixed = [None if t is None else t[:, perm] for t in fixed]
    codes, quantized, _, _ = _column_loop(w, u, scheme, block_size, torch.diag(h), shrink_steps,
                                          fixed=(fixed[0], fixed[1]))  # type: ignore[arg-type]
    if inverse is not None:
        codes, quantized = codes[:, inverse], quantized[:, inverse]
    return GPTQSolution(scheme, codes, scale, offset, None, quantized.float())


def _checked_grid(ranges: Ranges, scheme: WeightScheme, shape: tuple[int, int]) -> Ranges:
    n, k = shape
    want = (1, 1) if scheme.granularity == "tensor" else (n, scheme.num_groups(k))
    scale, offset = ranges
    if tuple(scale.shape) != want or (offset is None) == scheme.qformat.affine or \
            (offset is not None and tuple(offset.shape) != want):
        got = (tuple(scale.shape), None if offset is None else tuple(offset.shape))
        raise ModelpressError(f"a GPTQ grid gave (scale, offset) shapes {got} for a {shape} weight under "
                              f"{scheme.spec}; expected {want} each (offset only for affine formats)")
    return scale.float(), None if offset is None else offset.float()


def _column_loop(w: torch.Tensor, u: torch.Tensor, scheme: WeightScheme, block_size: int, h_diag: torch.Tensor,
                 shrink_steps: int, fixed: tuple[torch.Tensor, torch.Tensor | None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The GPTQ sweep over prepared W (N, K) (modified in place) with U = chol(H^-1) upper; h_diag (K,) is
    the prepared Hessian's diagonal (column importance for the scale search). `fixed`: (scale, offset)
    (N, K) of every column in solver order, used as given (static groups; scale and offset come back None).
    Returns codes (N, K), dequantized weights (N, K), scale and offset ((N, G), (N, 1) or (1, 1))."""
    n, k = w.shape
    granularity = scheme.granularity
    scales: list[torch.Tensor] = []
    offsets: list[torch.Tensor | None] = []
    g = scheme.group_length(k)
    block = max(1, block_size // g) * g if granularity == "group" else block_size
    if fixed is None and granularity != "group":  # one scale per row or per tensor, from the whole weight
        scale, offset = format_grid(w, scheme, h_diag, shrink_steps)
        scale, offset = (scale[:, 0], None if offset is None else offset[:, 0]) if granularity == "channel" \
            else (scale.reshape(1), None if offset is None else offset.reshape(1))
        scales.append(scale)
        offsets.append(offset)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    quantized = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if fixed is not None:
                scale, offset = fixed[0][:, i1 + i], None if fixed[1] is None else fixed[1][:, i1 + i]
            elif granularity == "group" and (i1 + i) % g == 0:
                scale, offset = group_params(w1[:, i : i + g], scheme, h_diag[i1 + i : i1 + i + g], shrink_steps)
                scales.append(scale)
                offsets.append(offset)
            column_codes, q = _quantize_column(w1[:, i], scale, offset, scheme)
            codes[:, i1 + i] = column_codes
            quantized[:, i1 + i] = q
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if fixed is not None:
        return codes, quantized, None, None
    scale_t = _stack_params(scales, granularity, n)
    offset_t = None if offsets[0] is None else _stack_params(offsets, granularity, n)  # type: ignore[arg-type]
    return codes, quantized, scale_t, offset_t


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """A layer solve is thousands of small dependent ops: on CPU, intra-op threads only add
    synchronisation (3-10x slower on a busy 2-core machine). Restores the thread count afterwards."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stack_params(values: list[torch.Tensor], granularity: str, n: int) -> torch.Tensor:
    if granularity == "tensor":
        return values[0].reshape(1, 1).float()
    return torch.stack(values, dim=1).reshape(n, -1).float()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, damp: float = DEFAULT_DAMP,
                  block_size: int = 128, act_order: bool = True, shrink_steps: int = 1, static_groups: bool = True,
                  grid: GroupGrid | None = None) -> PackedWeight:
    """GPTQ-quantize weight (N, K) against H (K, K) into a PackedWeight."""
    return gptq_solve(weight, hessian, scheme, damp, block_size, act_order, shrink_steps, static_groups, grid).packed()


def layer_objective(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - Q X||^2 / n  =  trace((W - Q) H (W - Q)^T) with H = X X^T / n."""
    delta = (weight.to(hessian.dtype) - quantized.to(hessian.dtype))
    return float(((delta @ hessian) * delta).sum())


# ----------------------------------------------------------------------------------------------------------
# plumbing: statistics from the engine, solutions back to it


@dataclass
class HessianSum:
    """Running X^T X over calibration rows, summed in float64: the order batches (or ranks, engine/distributed.py)
    are added in then changes the sum by ~1e-16 relative, and `mean()` rounds to the same float32 Hessian."""

    sum: torch.Tensor
    rows: int = 0

    def __post_init__(self) -> None:
        self.sum = self.sum.double()

    @classmethod
    def zeros(cls, k: int, device: torch.device | str) -> HessianSum:
        return cls(torch.zeros(k, k, dtype=torch.float64, device=device))

    def add(self, inputs: torch.Tensor, left: torch.Tensor | None = None) -> None:
        """Adds X^T X, or L^T X for `left` L of the same shape (a cross term, e.g. GPTQ's float_target)."""
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        lhs = x if left is None else left.reshape(x.shape).double()
        self.sum.addmm_(lhs.t(), x)
        self.rows += x.shape[0]

    def reduce(self, ranks: Ranks) -> None:
        """Sum and row count over all ranks (every rank must call it, in the same order)."""
        ranks.sum_(self.sum)
        self.rows = ranks.sum_ints([self.rows])[0]

    def mean(self) -> torch.Tensor:
        """(K, K) float32 X^T X / rows, made a slab of rows at a time (no float64 K x K temporary)."""
        out = torch.empty(self.sum.shape, dtype=torch.float32, device=self.sum.device)
        step = max(1, (1 << 22) // max(self.sum.shape[-1], 1))
        for i in range(0, self.sum.shape[0], step):
            out[i : i + step] = self.sum[i : i + step] / max(self.rows, 1)
        return out

    def release(self) -> None:
        """Drop the float64 sum (the row count stays): a solver that holds `mean()` needs nothing else."""
        self.sum = self.sum.new_empty(0)


@dataclass
class GPTQ:
    """The GPTQ layer algorithm for the sequential engine (engine/runner.py)."""

    config: GPTQConfig
    stack: BlockStack | None = None    # the model's blocks: turns block-relative target names into full ones
    _hessians: dict[str, HessianSum] = field(default_factory=dict)
    _drifts: dict[str, HessianSum] = field(default_factory=dict)   # float_target: (X - X~)^T X~ per group
    _prefix: str = ""                  # full name of the block being solved, plus "."

    @property
    def sequential(self) -> bool:
        """float_target solves level by level too: each level must see the inputs the levels before it, already
        fitted to the float model, produce. Observed all at once, o_proj and down_proj would make up again for
        the drift q/k/v and gate/up already made up for (on the default model, int4/g128: KL 0.175 -> 1.62)."""
        return self.config.true_sequential or self.config.float_target

    @property
    def reference_inputs(self) -> bool:
        """The engine pairs each observation with the float model's input of the same call (float_target)."""
        return self.config.float_target

    def describe(self) -> str:
        return config_description("gptq", self.config)

    def prepare_block(self, context: BlockContext) -> None:
        self._prefix = f"{self.stack.block_name(context.index)}." if self.stack is not None else ""

    def scheme_for(self, target: LayerTarget) -> WeightScheme:
        if self.config.schemes and self.stack is None:
            raise ModelpressError("GPTQ with per-layer schemes needs the model's block stack to name its layers")
        return self.config.scheme_of(self._prefix + target.name)

    def observe(self, group: InputGroup, inputs: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """`reference`: the float model's input of the same call (float_target; None where the engine has none,
        e.g. for experts: that group is then fitted to its own outputs)."""
        k = inputs.shape[-1]
        acc = self._hessians.get(group.key)
        if acc is None:
            acc = self._hessians[group.key] = HessianSum.zeros(k, inputs.device)
        acc.add(inputs)
        if reference is not None and self.config.float_target:
            drift = self._drifts.get(group.key)
            if drift is None:
                drift = self._drifts[group.key] = HessianSum.zeros(k, inputs.device)
            drift.add(inputs, left=reference.to(inputs.dtype) - inputs)

    def reduce(self, group: InputGroup, ranks: Ranks) -> None:
        """Data-parallel runs: the group's Hessian summed over ranks (a rank that saw none adds zeros)."""
        weight = group.targets[0].weight
        self._hessians.setdefault(group.key, HessianSum.zeros(weight.shape[-1], weight.device)).reduce(ranks)
        if self.config.float_target and ranks.sum_ints([int(group.key in self._drifts)])[0]:
            self._drifts.setdefault(group.key, HessianSum.zeros(weight.shape[-1], weight.device)).reduce(ranks)

    def solve(self, group: InputGroup) -> list[LayerSolution]:
        acc = self._hessians.pop(group.key, None)
        drift = self._drifts.pop(group.key, None)
        if acc is None or acc.rows == 0:
            return [LayerSolution(quantize_weight(t.weight, self.scheme_for(t), name=f"layer {t.name}"),
                                  {"method": "rtn", "reason": "no calibration tokens reached this layer"})
                    for t in group.targets]
        with _one_cpu_thread(acc.sum.device):
            return self._solve(group, acc, drift)

    def _solve(self, group: InputGroup, acc: HessianSum, drift: HessianSum | None) -> list[LayerSolution]:
        start = time.perf_counter()
        hessian = acc.mean()
        acc.release()
        originals = [t.weight.detach().float() for t in group.targets]
        weights = originals
        if drift is not None and drift.rows:   # float_target: GPTQ on the moved target W* (module docstring)
            weights = float_target_weights(originals, hessian, drift.mean(), self.config.damp)
        results: list[LayerSolution | None] = [None] * len(weights)
        # layers reading the same input share H, and GPTQ treats rows independently: solve those with one
        # scheme as one matrix (but a per-tensor scale belongs to one layer)
        for scheme, batch in _batches_by_scheme([self.scheme_for(t) for t in group.targets]):
            c = self.config
            rule = grid_rule(c.grid)
            grid = None if rule is None else (lambda w, s=scheme: rule(w, hessian, s))  # type: ignore[misc]
            solution = gptq_solve(torch.cat([weights[i] for i in batch]), hessian, scheme, c.damp, c.block_size,
                                  c.act_order, c.shrink_steps, c.static_groups, grid)
            row = 0
            for i in batch:
                part = solution.rows(row, row + weights[i].shape[0])
                row += weights[i].shape[0]
                results[i] = self._choose(group.targets[i].name, weights[i], originals[i], part, hessian, acc.rows)
        log.debug("GPTQ %s: %d layers in %.2f s", group.key, len(results), time.perf_counter() - start)
        return results  # type: ignore[return-value]

    def _choose(self, name: str, target: torch.Tensor, weight: torch.Tensor, part: GPTQSolution,
                hessian: torch.Tensor, rows: int) -> LayerSolution:
        """GPTQ's solution, or the layer's own weight rounded to nearest where that scores better on the
        objective ||(Q - target) X||^2 (target: the weight, or float_target's W*)."""
        packed = part.packed()
        gptq_loss = layer_objective(target, packed.dequantize(), hessian)
        notes = {"method": "gptq", "calibration_rows": rows, "objective": gptq_loss}
        if target is not weight:
            notes["float_target_shift"] = float((target - weight).norm() / weight.norm().clamp_min(1e-30))
        if not self.config.keep_better_of_rtn:
            return LayerSolution(packed, notes)
        if self.config.grid is None:
            rtn = quantize_weight(weight, part.scheme, name=f"layer {name}")
        else:   # round to nearest on the same fixed grid, which the export relies on
            rtn = quantize_weight(weight, part.scheme, part.scale, part.offset, name=f"layer {name}")
        rtn_loss = layer_objective(target, rtn.dequantize(), hessian)
        notes["rtn_objective"] = rtn_loss
        if rtn_loss < gptq_loss:
            notes.update(method="rtn", reason="RTN scored better on the layer objective")
            return LayerSolution(rtn, notes)
        return LayerSolution(packed, notes)

    def finish_block(self, block_index: int) -> None:
        self._hessians.clear()
        self._drifts.clear()


def float_target_weights(weights: list[torch.Tensor], hessian: torch.Tensor, drift: torch.Tensor, damp: float
                         ) -> list[torch.Tensor]:
    """The least-squares weights on the quantized model's inputs X~ that reproduce the float model's outputs:
    W* = W + W D H^-1 for each W (N_i, K), with H = X~^T X~ / n (K, K) dampened as the solve dampens it and
    D = (X - X~)^T X~ / n (K, K). Inputs never active in calibration keep their weights (H_jj = 1 there)."""
    stacked = torch.cat([w.double() for w in weights])                   # (N, K)
    h, _, _ = prepare_hessian(hessian.double(), stacked, damp, act_order=False)   # the solve's dead inputs and damp
    d = drift.double().clone()
    d[:, torch.diag(hessian) == 0] = 0
    moved = stacked + torch.cholesky_solve(d.t() @ stacked.t(), torch.linalg.cholesky(h)).t()
    return [part.to(w.dtype) for part, w in zip(moved.split([w.shape[0] for w in weights]), weights)]


def _batches_by_scheme(schemes: list[WeightScheme]) -> list[tuple[WeightScheme, list[int]]]:
    """Indices of layers that can be solved as one matrix: same scheme, and not a per-tensor one."""
    batches: dict[WeightScheme, list[int]] = {}
    single = []
    for i, scheme in enumerate(schemes):
        if scheme.granularity == "tensor":
            single.append((scheme, [i]))
        else:
            batches.setdefault(scheme, []).append(i)
    return list(batches.items()) + single


@dataclass
class GPTQReport:
    run: RunReport                      # the engine's report over the blocks
    rtn_outside_blocks: list[str]       # linear layers outside the repeated blocks, quantized with RTN

    @property
    def layers(self) -> int:
        return self.run.layers + len(self.rtn_outside_blocks)

    def rtn_fallbacks(self) -> dict[str, str]:
        return {name: notes.get("reason", "") for name, notes in self.run.notes.items() if notes.get("method") == "rtn"}

    def summary(self) -> dict:
        return {"blocks": self.run.blocks, "block_path": self.run.block_path,
                "unobserved_layers": self.run.unobserved, "rtn_fallback_layers": self.rtn_fallbacks(),
                "rtn_outside_blocks": self.rtn_outside_blocks, "resumed_from_block": self.run.resumed_from_block}


def quantize_gptq(model: nn.Module, config: GPTQConfig, calibration_ids: torch.Tensor,
                  device: str | torch.device = "cpu", resume_dir: str | None = None, batch_size: int = 8
                  ) -> GPTQReport:
    """GPTQ every linear layer in the model's repeated blocks (in place), then RTN for linear layers outside
    them (a BERT pooler, say; the output head is skipped as usual)."""
    from modelpress.algorithms.quantize.rtn import quantize_layer
    from modelpress.engine.blocks import find_blocks
    from modelpress.engine.runner import EngineSettings, run_sequential

    settings = EngineSettings(batch_size=batch_size, skip=config.skip)
    algorithm = GPTQ(config, stack=find_blocks(model))
    run = run_sequential(model, algorithm, calibration_ids, device, resume_dir=resume_dir, settings=settings)
    outside = find_linear_layers(model, config.skip)
    for name, module in outside.items():
        new = quantize_layer(module, config.scheme_of(name), name=f"layer {name}")
        replace_module(model, name, new.to(module.weight.device))
    return GPTQReport(run, sorted(outside))
