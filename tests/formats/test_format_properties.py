"""Properties every registered format must have under every granularity: idempotent re-quantization,
error bounds of round to nearest, the format's own code semantics (FP8 = torch's cast, ternary = absmean),
ragged last groups, and group sizes that are never silently changed."""

import pytest
import torch

from modelpress.formats import WeightScheme, format_names, get_format, quantize_weight
from modelpress.formats.packed import expand_groups

# (granularity spec, K): the last two have a ragged last group (576 = 4·128 + 64; 100 = 64 + 36)
GROUPINGS = [("tensor", 256), ("channel", 256), ("g32", 256), ("g64", 256), ("g128", 256), ("g128", 576),
             ("g64", 100)]
ROWS = 8
FORMATS = format_names()
INT_FORMATS = [name for name in FORMATS if name.startswith("int")]
CODEBOOK_FORMATS = ["nf4", "fp4"]
FP8_FORMATS = [name for name in FORMATS if name.startswith("fp8")]


def test_the_registry_holds_the_formats_these_tests_know():
    # a new format must be added to one of the families below (or get its own checks)
    assert set(FORMATS) == set(INT_FORMATS) | set(CODEBOOK_FORMATS) | set(FP8_FORMATS) | {"ternary"}


def weights(k: int, seed: int = 0, rows: int = ROWS) -> torch.Tensor:
    """Gaussian weights with per-row magnitudes over two decades and a few outliers, like real layers."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=gen) * torch.logspace(-2, 0, rows)[:, None]
    w[0, 3] *= 8
    return w


def scheme(fmt: str, grouping: str, extra: str = "") -> WeightScheme:
    return WeightScheme.parse(f"{fmt}/{grouping}{extra}")


def per_element(packed):
    """(N, K) scale and offset (zeros for scale-only formats) of every element, in float32."""
    n, k = packed.shape
    g = packed.scheme.group_length(k)
    scale = expand_groups(packed.group_scales(), n, k, g)
    offset = torch.zeros(n, k) if packed.offset is None else expand_groups(packed.offset.float(), n, k, g)
    return scale, offset


def all_cases(formats):
    return [(f, g, k) for f in formats for g, k in GROUPINGS]


@pytest.mark.parametrize("fmt, grouping, k", all_cases([f for f in FORMATS if f != "ternary"]))
def test_requantizing_the_dequantized_weight_is_the_identity(fmt, grouping, k):
    # holds for E5M2 with fp16 scales too because its scales map absmax to 448, not 57344 (see fp8.py)
    first = quantize_weight(weights(k), scheme(fmt, grouping))
    second = quantize_weight(first.dequantize(), first.scheme)
    assert torch.equal(second.codes(), first.codes())
    assert torch.equal(second.scale, first.scale)
    assert (second.offset is None) == (first.offset is None)
    if first.offset is not None:
        assert torch.equal(second.offset, first.offset)
    assert torch.equal(second.dequantize(), first.dequantize())


@pytest.mark.parametrize("grouping, k", GROUPINGS)
def test_ternary_requantization_with_its_own_scale_is_the_identity(grouping, k):
    # absmean scaling is not a fixed point (mean |dq| = scale · fraction of non-zeros), so the scale is given
    first = quantize_weight(weights(k), scheme("ternary", grouping))
    second = quantize_weight(first.dequantize(), first.scheme, scale=first.scale)
    assert torch.equal(second.codes(), first.codes())
    assert torch.equal(second.scale, first.scale)


def overhang(w, low, high):
    """How far each element lies outside [low, high] (0 inside)."""
    return torch.clamp(low - w, min=0) + torch.clamp(w - high, min=0)


@pytest.mark.parametrize("fmt, grouping, k", all_cases(INT_FORMATS + ["ternary"]))
def test_integer_grid_error_is_at_most_half_a_step_inside_the_range(fmt, grouping, k):
    w = weights(k)
    packed = quantize_weight(w, scheme(fmt, grouping))
    scale, offset = per_element(packed)
    levels = get_format(fmt).levels
    low, high = offset + scale * levels.min(), offset + scale * levels.max()
    outside = overhang(w, low, high)
    error = (w - packed.dequantize()).abs()
    slack = 1e-6 * w.abs() + 1e-12
    inside = outside == 0
    assert bool((error <= scale / 2 + slack)[inside].all()), float((error - scale / 2)[inside].max())
    # outside the grid, values are clipped to its nearest end
    assert bool((error <= outside + slack)[~inside].all())
    if fmt != "ternary":  # absmax / min-max scales cover the group up to the fp16 rounding of scale and offset
        assert bool((outside <= 2**-10 * (low.abs() + high.abs())).all())


@pytest.mark.parametrize("fmt, grouping, k", all_cases(CODEBOOK_FORMATS))
def test_codebook_error_is_at_most_half_the_largest_gap(fmt, grouping, k):
    w = weights(k)
    packed = quantize_weight(w, scheme(fmt, grouping))
    scale, _ = per_element(packed)
    levels = torch.sort(get_format(fmt).levels).values
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    error = (w - packed.dequantize()).abs()
    outside = overhang(w, scale * levels[0], scale * levels[-1])
    assert bool((outside <= 2**-10 * w.abs()).all())  # absmax scaling covers the group up to fp16 rounding
    assert bool((error <= scale * half_gap * (1 + 1e-6) + outside + 1e-12).all())
    # stronger: every element went to its nearest level
    nearest = (w.unsqueeze(-1) - scale.unsqueeze(-1) * levels).abs().amin(dim=-1)
    assert bool((error <= nearest * (1 + 1e-6) + 1e-7 * scale).all())


@pytest.mark.parametrize("fmt, grouping, k", all_cases(FP8_FORMATS))
def test_fp8_codes_are_torchs_own_cast(fmt, grouping, k):
    w = weights(k)
    packed = quantize_weight(w, scheme(fmt, grouping))
    scale, _ = per_element(packed)
    dtype = get_format(fmt).dtype
    finite = torch.finfo(dtype).max
    x = w / scale
    expected = x.clamp(-finite, finite).to(dtype).view(torch.uint8)
    assert torch.equal(packed.codes(), expected)
    in_range = x.abs() <= finite
    assert torch.equal(packed.codes()[in_range], x[in_range].to(dtype).view(torch.uint8))
    assert torch.equal(packed.dequantize(), expected.view(dtype).float() * scale)


@pytest.mark.parametrize("grouping, k", GROUPINGS)
def test_ternary_codes_and_absmean_scale(grouping, k):
    w = weights(k)
    packed = quantize_weight(w, scheme("ternary", grouping))
    scale, _ = per_element(packed)
    values = get_format("ternary").decode(packed.codes())
    assert set(values.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert set(packed.codes().unique().tolist()) <= {0, 1, 2}
    # scale = mean |w| over each group, rounded to the fp16 it is stored in
    n, _ = w.shape
    if grouping == "tensor":
        expected = w.abs().mean().reshape(1, 1)
    else:
        g = packed.scheme.group_length(k)
        expected = torch.stack([w[:, i:i + g].abs().mean(dim=1) for i in range(0, k, g)], dim=1)
    assert torch.equal(packed.scale, expected.to(torch.float16))
    assert torch.equal(values, torch.clamp(torch.round(w / scale), -1, 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_ragged_last_group_is_scaled_from_its_own_values(fmt):
    w = weights(576, seed=3)
    w[:, 512:] *= 0.01  # the last 64 columns are much smaller than the rest
    packed = quantize_weight(w, scheme(fmt, "g128"))
    assert packed.scale.shape == (ROWS, 5)
    assert packed.scheme.group_length(576) == 128 and packed.scheme.num_groups(576) == 5
    last_alone = quantize_weight(w[:, 512:].contiguous(), scheme(fmt, "g128"))
    assert last_alone.scale.shape == (ROWS, 1)  # 64 columns: one group of 64
    assert torch.equal(packed.scale[:, 4:], last_alone.scale)
    if packed.offset is not None:
        assert torch.equal(packed.offset[:, 4:], last_alone.offset)
    assert torch.equal(packed.codes()[:, 512:], last_alone.codes())
    # changing the full groups leaves the ragged group's scale alone
    w2 = w.clone()
    w2[:, :512] *= 3
    assert torch.equal(quantize_weight(w2, scheme(fmt, "g128")).scale[:, 4], packed.scale[:, 4])


def test_ragged_last_group_int4_scale_is_its_absmax_over_seven():
    w = weights(576, seed=4)
    w[:, 512:] *= 0.1
    packed = quantize_weight(w, scheme("int4", "g128"))
    expected = (w[:, 512:].abs().amax(dim=1) / 7).to(torch.float16)
    assert torch.equal(packed.scale[:, 4], expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("grouping", ["tensor", "channel", "g1", "g32", "g64", "g100", "g128", "g4096"])
@pytest.mark.parametrize("extra", ["", "/dq", "/bfloat16", "/dq/float32"])
def test_spec_round_trip_keeps_the_group_size(fmt, grouping, extra):
    s = scheme(fmt, grouping, extra)
    assert WeightScheme.parse(s.spec) == s
    if grouping.startswith("g"):
        assert s.granularity == "group" and s.group_size == int(grouping[1:])
    assert s.double_quant == ("dq" in extra)


@pytest.mark.parametrize("grouping, k", GROUPINGS + [("g128", 100), ("g100", 576)])
def test_stored_scales_have_one_column_per_group(grouping, k):
    packed = quantize_weight(weights(k), scheme("int4", grouping))
    expected = {"tensor": (1, 1), "channel": (ROWS, 1)}.get(grouping)
    if expected is None:
        g = int(grouping[1:])
        expected = (ROWS, -(-k // g))
        assert packed.scheme.group_size == g  # K < g keeps g in the scheme (one short group)
    assert tuple(packed.scale.shape) == expected


def test_all_zero_groups_quantize_to_zero():
    w = weights(256)
    w[:, :64] = 0
    for fmt in FORMATS:
        packed = quantize_weight(w, scheme(fmt, "g64"))
        assert torch.equal(packed.dequantize()[:, :64], torch.zeros(ROWS, 64)), fmt


@pytest.mark.parametrize("fmt", INT_FORMATS + FP8_FORMATS + CODEBOOK_FORMATS)
def test_tiny_weights_keep_their_relative_precision(fmt):
    # fp16 scales must use the subnormal range rather than clamping every small scale up to 6.1e-5
    w = weights(256, seed=5, rows=4)
    big = quantize_weight(w, scheme(fmt, "channel"))
    small_w = w * 1e-3
    small = quantize_weight(small_w, scheme(fmt, "channel"))
    big_error = (big.dequantize() - w).norm() / w.norm()
    small_error = (small.dequantize() - small_w).norm() / small_w.norm()
    assert small_error <= big_error * 1.5 + 1e-3, (float(small_error), float(big_error))


# ---- integer zero points (/zp) -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["int4-asym/g128/zp", "int3-asym/g64/zp", "int8-asym/channel/zp/float32",
                                  "int2-asym/g32/zp/bfloat16"])
def test_integer_zero_points_store_offsets_that_are_integer_multiples_of_the_scale(spec):
    scheme = WeightScheme.parse(spec)
    assert scheme.integer_zero and WeightScheme.parse(scheme.spec) == scheme
    w = weights(256) + 0.3 * torch.rand(ROWS, 1)   # groups that are not centred on zero
    p = quantize_weight(w, scheme)
    zero = -p.offset.float() / p.scale.float()
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2 ** scheme.bits - 1
    # still round to nearest on its own grid, within half a step (plus the clip of a shifted range) of the weight
    err = (p.dequantize() - w).abs()
    step = expand_groups(p.scale.float(), ROWS, 256, scheme.group_length(256))
    assert (err <= 1.0 * step + 1e-6).all()


def test_integer_zero_points_refuse_what_cannot_hold_them():
    for spec, words in [("int4/g128/zp", "asymmetric"), ("int4-asym/g128/zp/dq", "double-quantized"),
                        ("int4-asym/g128/zp/bfloat16", "float32"), ("nf4/g64/zp", "asymmetric")]:
        with pytest.raises(Exception, match=words):
            WeightScheme.parse(spec)
