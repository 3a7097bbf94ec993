"""GPTQ's solver against a plain reference, and against RTN on the layer objective."""

from __future__ import annotations

import pytest
import torch

from modelpress.algorithms.quantize.gptq import (
    GPTQ,
    GPTQConfig,
    gptq_quantize,
    gptq_solve,
    group_params,
    layer_objective,
)
from modelpress.engine.algorithm import InputGroup, LayerTarget
from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, quantize_weight
from modelpress.formats.scheme import WeightScheme


def reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, damp: float,
                   act_order: bool, shrink_steps: int = 1) -> torch.Tensor:
    """Textbook GPTQ/OBQ, column by column: quantize column j, spread its error over the later columns
    with the current inverse Hessian, then eliminate j from that inverse. No lazy blocks, no Cholesky.
    Groups are cut in visiting order; a group's scale comes from its current weights (same rule as the
    solver: `group_params`). Returns the dequantized weight in the layer's column order."""
    w = weight.clone().double()
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    importance = torch.diag(h)
    hinv = torch.linalg.inv(h)
    fmt = scheme.qformat
    n, k = w.shape
    g = scheme.group_length(k) if scheme.granularity == "group" else k
    q_all = torch.zeros_like(w)
    if scheme.granularity == "channel":
        scale, offset = group_params(w, scheme, importance, shrink_steps)
    elif scheme.granularity == "tensor":
        scale, offset = group_params(w.reshape(1, -1), scheme, importance.repeat(n), shrink_steps)
    for j in range(k):
        if scheme.granularity == "group" and j % g == 0:
            scale, offset = group_params(w[:, j : j + g], scheme, importance[j : j + g], shrink_steps)
        shift = offset.double() if offset is not None else 0.0
        codes = fmt.encode((w[:, j].float() - (offset if offset is not None else 0.0)) / scale)
        q = fmt.decode(codes).double() * scale.double() + shift
        q_all[:, j] = q
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q_all[:, torch.argsort(order)]


def correlated_layer(n: int, k: int, rows: int, seed: int, dead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and H = X^T X / rows from correlated, unevenly scaled activations."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen, dtype=torch.float64)
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(rows, k, generator=gen, dtype=torch.float64) @ mix
    x *= torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.1
    if dead:
        x[:, :dead] = 0
    return weight, x.T @ x / rows


SCHEMES = ["int4/g32", "int3/g16", "int4-asym/g32", "nf4/g32", "fp4/g32", "fp8-e4m3/channel", "int8/channel",
           "int4/tensor", "int2-asym/g16"]


@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("act_order", [True, False])
def test_matches_plain_reference(spec, act_order):
    scheme = WeightScheme.parse(spec)
    weight, hessian = correlated_layer(24, 80, 400, seed=1, dead=3)
    ours = gptq_solve(weight, hessian, scheme, damp=0.01, block_size=32, act_order=act_order)
    ref = reference_gptq(weight, hessian, scheme, damp=0.01, act_order=act_order)
    # same codes up to rare rounding-boundary ties (float64 on both sides)
    close = torch.isclose(ours.quantized.double(), ref, rtol=1e-5, atol=1e-6).float().mean()
    assert close >= 0.995
    assert layer_objective(weight, ours.quantized, hessian) == pytest.approx(
        layer_objective(weight, ref, hessian), rel=1e-3)


@pytest.mark.parametrize("spec", ["int3/g16", "int4-asym/g32", "nf4/channel"])
def test_matches_plain_reference_with_scale_search(spec):
    scheme = WeightScheme.parse(spec)
    weight, hessian = correlated_layer(24, 64, 400, seed=8)
    ours = gptq_solve(weight, hessian, scheme, block_size=32, shrink_steps=12)
    ref = reference_gptq(weight, hessian, scheme, damp=0.01, act_order=True, shrink_steps=12)
    assert torch.isclose(ours.quantized.double(), ref, rtol=1e-5, atol=1e-6).float().mean() >= 0.995


def test_scale_search_lowers_the_rounding_error_of_every_group():
    values = torch.randn(64, 32, generator=torch.Generator().manual_seed(9)) ** 3  # heavy tails
    scheme = WeightScheme.parse("int3/g32")
    fmt = scheme.qformat

    def error(scale, offset):
        return ((values - fmt.decode(fmt.encode(values / scale[:, None])) * scale[:, None]) ** 2).sum(-1)

    plain = error(*group_params(values, scheme))
    searched = error(*group_params(values, scheme, shrink_steps=20))
    assert torch.all(searched <= plain + 1e-6) and searched.sum() < 0.8 * plain.sum()


def test_lazy_block_size_does_not_change_the_result():
    weight, hessian = correlated_layer(16, 96, 300, seed=2)
    scheme = WeightScheme.parse("int4/g16")
    a = gptq_solve(weight, hessian, scheme, block_size=16)
    b = gptq_solve(weight, hessian, scheme, block_size=96)
    c = gptq_solve(weight, hessian, scheme, block_size=7)  # rounded to a multiple of the group
    assert torch.allclose(a.quantized, b.quantized, atol=1e-9) and torch.allclose(a.quantized, c.quantized, atol=1e-9)


@pytest.mark.parametrize("spec", ["int4/g32", "int3/g32", "int4-asym/g32", "nf4/g32", "fp4/g32", "fp8-e4m3/g32",
                                  "int2/channel"])
@pytest.mark.parametrize("seed, shrink_steps", [(0, 1), (1, 1), (2, 20)])
def test_never_worse_than_rtn_on_the_layer_objective(spec, seed, shrink_steps):
    scheme = WeightScheme.parse(spec)
    weight, hessian = correlated_layer(32, 128, 512, seed=seed)
    weight, hessian = weight.float(), hessian.float()
    packed = gptq_quantize(weight, hessian, scheme, shrink_steps=shrink_steps)
    rtn = quantize_weight(weight, scheme)
    ours = layer_objective(weight, packed.dequantize(), hessian)
    theirs = layer_objective(weight, rtn.dequantize(), hessian)
    assert ours <= theirs
    if scheme.bits < 8:
        assert ours < 0.9 * theirs  # and clearly better on correlated activations


def test_packed_codes_are_the_solvers_choice_and_groups_follow_stored_order():
    weight, hessian = correlated_layer(8, 72, 200, seed=3)  # 72 = 2 groups of 32 + a ragged 8
    scheme = WeightScheme.parse("int4/g32")
    solution = gptq_solve(weight.float(), hessian.float(), scheme)
    packed = solution.packed()
    assert isinstance(packed, PackedWeight) and packed.input_perm is not None
    assert torch.equal(packed.codes(), solution.codes)
    assert packed.scale.shape == (8, 3)
    # the packed weight dequantizes to exactly the solver's weights, in the layer's column order
    assert torch.allclose(packed.dequantize(), solution.quantized, atol=0, rtol=0)
    # act order: stored columns visit inputs by decreasing H_ii
    diag = torch.diag(hessian)[packed.input_perm.long()]
    assert torch.all(diag[:-1] >= diag[1:])


def test_dead_inputs_are_zeroed_and_do_not_break_the_solve():
    weight, hessian = correlated_layer(8, 64, 200, seed=4, dead=5)
    packed = gptq_quantize(weight.float(), hessian.float(), WeightScheme.parse("int4/g32"))
    q = packed.dequantize()
    assert torch.isfinite(q).all()
    assert torch.count_nonzero(q[:, :5]) == 0


def test_channel_granularity_stores_columns_in_layer_order():
    weight, hessian = correlated_layer(8, 64, 200, seed=5)
    packed = gptq_quantize(weight.float(), hessian.float(), WeightScheme.parse("int8/channel"))
    assert packed.input_perm is None


def test_double_quantized_scales_are_supported_and_still_beat_rtn():
    weight, hessian = correlated_layer(64, 128, 512, seed=6)
    weight, hessian = weight.float(), hessian.float()
    scheme = WeightScheme.parse("nf4/g32/dq")
    packed = gptq_quantize(weight, hessian, scheme)
    assert packed.scale_scale is not None
    rtn = quantize_weight(weight, scheme)
    assert layer_objective(weight, packed.dequantize(), hessian) < layer_objective(weight, rtn.dequantize(), hessian)


def test_algorithm_solves_shared_input_layers_like_separate_ones():
    """q/k/v read one input: solving them stacked equals solving each alone (rows are independent)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 48, generator=gen) @ (torch.eye(48) + 0.3 * torch.randn(48, 48, generator=gen))
    weights = [torch.randn(n, 48, generator=gen) for n in (16, 8, 8)]
    group = InputGroup("q", tuple(LayerTarget(name, w) for name, w in zip("qkv", weights)), level=0)
    algo = GPTQ(GPTQConfig(WeightScheme.parse("int4/g16"), keep_better_of_rtn=False))
    algo.observe(group, x[:100])
    algo.observe(group, x[100:])
    solutions = algo.solve(group)
    hessian = x.T @ x / x.shape[0]
    for w, solution in zip(weights, solutions):
        alone = gptq_quantize(w, hessian, WeightScheme.parse("int4/g16"), shrink_steps=algo.config.shrink_steps)
        assert torch.allclose(solution.value.dequantize(), alone.dequantize(), atol=1e-5)
        assert solution.notes["calibration_rows"] == 256


def test_algorithm_falls_back_to_rtn_without_observations():
    w = torch.randn(8, 32)
    group = InputGroup("e", (LayerTarget("e", w),), level=0)
    [solution] = GPTQ(GPTQConfig(WeightScheme.parse("int4/g16"))).solve(group)
    assert solution.notes["method"] == "rtn"
    assert torch.equal(solution.value.dequantize(), quantize_weight(w, WeightScheme.parse("int4/g16")).dequantize())


def test_config_validates():
    with pytest.raises(ModelpressError, match="damp"):
        GPTQConfig(WeightScheme.parse("int4"), damp=2.0)
    with pytest.raises(ModelpressError, match="block size"):
        GPTQConfig(WeightScheme.parse("int4"), block_size=0)
    with pytest.raises(ModelpressError, match="shrink steps"):
        GPTQConfig(WeightScheme.parse("int4"), shrink_steps=0)
