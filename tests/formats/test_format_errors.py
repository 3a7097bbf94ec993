"""Bad input fails with a ModelpressError that names the bad value."""

import math

import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.formats import WeightScheme, get_format, quantize_weight, scheme_for


@pytest.mark.parametrize("size", [0, -1])
def test_group_size_zero_or_negative(size):
    with pytest.raises(ModelpressError, match=f"group size must be a positive integer, got {size}"):
        WeightScheme(format="int4", group_size=size)
    with pytest.raises(ModelpressError, match=f"got {size}"):
        WeightScheme.parse(f"int4/g{size}")
    with pytest.raises(ModelpressError, match=f"got {size}"):
        scheme_for("int4", size)


def test_group_size_of_wrong_type():
    with pytest.raises(ModelpressError, match="positive integer"):
        WeightScheme(format="int4", group_size=True)
    with pytest.raises(ModelpressError, match="'g12x'"):
        WeightScheme.parse("int4/g12x")


@pytest.mark.parametrize("call", [lambda: get_format("int7"), lambda: WeightScheme.parse("int7/g128"),
                                  lambda: scheme_for("int7"), lambda: WeightScheme(format="int7")])
def test_unknown_format_name_lists_the_known_ones(call):
    with pytest.raises(ModelpressError, match=r"unknown number format 'int7'; known formats: .*nf4"):
        call()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ModelpressError, match="layers.0.q_proj.weight has 1 NaN/Inf"):
        quantize_weight(w, WeightScheme.parse("int4/g32"), name="layers.0.q_proj.weight")


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "fp8-e4m3", "ternary"])
def test_asymmetric_only_for_integer_formats(fmt):
    with pytest.raises(ModelpressError, match=f"format '{fmt}' has no asymmetric variant"):
        scheme_for(fmt, symmetric=False)


def test_symmetric_flag_with_an_asymmetric_format():
    with pytest.raises(ModelpressError, match="'int4-asym' is asymmetric"):
        scheme_for("int4-asym", symmetric=True)


def test_group_size_with_channel_granularity_and_bad_scale_dtype():
    with pytest.raises(ModelpressError, match="channel granularity takes no group size"):
        WeightScheme(format="int8", granularity="channel", group_size=64)
    with pytest.raises(ModelpressError, match="'float64'"):
        WeightScheme(format="int8", scale_dtype="float64")


def test_weight_must_be_2d():
    with pytest.raises(ModelpressError, match=r"expected a 2-D weight, got shape \(4, 4, 4\)"):
        quantize_weight(torch.zeros(4, 4, 4), WeightScheme.parse("int4/g32"))
