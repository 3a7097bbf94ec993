"""k-quant encoders: bytes that gguf-py's reference decoder reads back bit for bit, the error of the searched
grid against plain round-to-nearest, importance weighting, and exact factoring of given scales."""

import gguf
import numpy as np
import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.export.kquants import (
    KQUANTS,
    KQuantGrid,
    dequantize_kquant,
    grid_from_scales,
    kquant_codes,
    kquant_from_packed,
    kquant_grid,
    pack_kquant,
    quantize_kquant,
)
from modelpress.formats import WeightScheme, quantize_weight
from modelpress.formats.packed import PackedWeight
from modelpress.formats.packing import pack_codes

TYPES = list(KQUANTS)   # Q2_K, Q3_K, Q4_K, Q5_K, Q6_K


def awkward_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows plus the cases that break block quantizers: outliers, zero and constant rows, a
    sub-block of one sign only, tiny and large magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, 7] = 3.0                       # a lone outlier
    w[1, ::97] = -2.5                   # scattered negative outliers
    w[2] = 0.0                          # all-zero row
    w[3] = 0.02                         # constant positive row
    w[4] = -0.3                         # constant negative row
    w[5, :256] = w[5, :256].abs() + 1   # a super-block of positive values only
    w[6] *= 1e-4                        # tiny values (fp16 d near its subnormals)
    w[7] *= 300                         # large values
    return w


def gguf_decode(data: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows, cols, seed", [(8, 256, 0), (11, 768, 1), (9, 2048, 2)])
def test_gguf_decodes_our_bytes_bit_for_bit(qtype, rows, cols, seed):
    w = awkward_weight(rows, cols, seed)
    grid = kquant_grid(w, qtype)
    codes = kquant_codes(w, grid)
    data = pack_kquant(codes, grid)
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert data.dtype == np.uint8 and data.shape == (rows, cols // block_weights * block_bytes)
    assert same_bits(gguf_decode(data, qtype), dequantize_kquant(grid, codes))
    assert np.array_equal(quantize_kquant(w, qtype), data)


@pytest.mark.parametrize("qtype", TYPES)
def test_any_codes_on_a_grid_pack_exactly(qtype):
    """A solver (GPTQ) brings its own codes on a fixed grid: every code value must land in the right bits."""
    w = awkward_weight(8, 512, 3)
    grid = kquant_grid(w, qtype)
    codes = torch.randint(0, 2 ** KQUANTS[qtype].bits, w.shape, generator=torch.Generator().manual_seed(4),
                          dtype=torch.uint8)
    assert same_bits(gguf_decode(pack_kquant(codes, grid), qtype), dequantize_kquant(grid, codes))


@pytest.mark.parametrize("qtype", TYPES)
def test_rounding_onto_the_grid_is_a_projection(qtype):
    w = awkward_weight(8, 512, 5)
    grid = kquant_grid(w, qtype)
    decoded = dequantize_kquant(grid, kquant_codes(w, grid))
    assert same_bits(dequantize_kquant(grid, kquant_codes(decoded, grid)), decoded)
    assert torch.all(decoded[2] == 0)   # an all-zero row stays exactly zero


# plain round-to-nearest with a float32 scale per sub-block: the search must beat it despite storing the
# sub-scales as 4..8-bit integers under an fp16 super-block scale
RTN_REFERENCE = {"Q2_K": "int2-asym/g16", "Q3_K": "int3/g16", "Q4_K": "int4-asym/g32",
                 "Q5_K": "int5-asym/g32", "Q6_K": "int6/g16"}


def test_error_falls_with_bits_and_beats_round_to_nearest():
    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(6))
    errors = {}
    for qtype in TYPES:
        grid = kquant_grid(w, qtype)
        errors[qtype] = (dequantize_kquant(grid, kquant_codes(w, grid)) - w).pow(2).mean().sqrt().item()
        rtn = quantize_weight(w, WeightScheme.parse(RTN_REFERENCE[qtype])).dequantize()
        ratio = errors[qtype] / (rtn - w).pow(2).mean().sqrt().item()
        assert 0.6 < ratio < 0.96, (qtype, ratio)
    assert errors["Q6_K"] < errors["Q5_K"] < errors["Q4_K"] < errors["Q3_K"] < errors["Q2_K"]


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_lowers_the_importance_weighted_error(qtype):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 1024, generator=g)
    importance = torch.exp(1.5 * torch.randn(1024, generator=g))

    def weighted_error(grid):
        return ((dequantize_kquant(grid, kquant_codes(w, grid)) - w).pow(2) * importance).sum().item()

    plain, informed = weighted_error(kquant_grid(w, qtype)), weighted_error(kquant_grid(w, qtype, importance))
    assert informed < 0.9 * plain, (plain, informed)


@pytest.mark.parametrize("qtype", TYPES)
def test_a_searched_grid_factors_back_exactly(qtype):
    w = awkward_weight(8, 512, 8)
    grid = kquant_grid(w, qtype)
    again = grid_from_scales(grid.scale, grid.offset, qtype)
    assert again is not None
    assert same_bits(again.scale, grid.scale)
    assert (again.offset is None) == (grid.offset is None)
    if grid.offset is not None:
        assert same_bits(again.offset, grid.offset)
    codes = kquant_codes(w, grid)
    assert same_bits(gguf_decode(pack_kquant(codes, again), qtype), dequantize_kquant(grid, codes))


@pytest.mark.parametrize("qtype", TYPES)
def test_scales_off_the_k_quant_lattice_do_not_factor(qtype):
    grid = kquant_grid(awkward_weight(8, 512, 9), qtype)
    scale = grid.scale.clone()
    scale[0, 1] = torch.nextafter(scale[0, 1], torch.tensor(float("inf")))
    assert grid_from_scales(scale, grid.offset, qtype) is None
    if grid.offset is not None:
        offset = grid.offset.clone()
        offset[0, 1] = torch.nextafter(offset[0, 1], torch.tensor(float("-inf")))
        assert grid_from_scales(grid.scale, offset, qtype) is None


def test_round_to_nearest_scales_rarely_factor_but_k_quant_like_ones_do():
    """int4-asym g32 min-max scales are arbitrary floats; fp16 × 6-bit products are exactly Q4_K's."""
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(10))
    packed = quantize_weight(w, WeightScheme.parse("int4-asym/g32"))
    assert grid_from_scales(packed.group_scales(), packed.offset.float(), "Q4_K") is None
    d = torch.tensor([[0.01, 0.5]], dtype=torch.float16).repeat(4, 1)
    ints = torch.arange(1, 17, dtype=torch.float32).reshape(1, 16).repeat(4, 1)
    scale = d.float().repeat_interleave(8, dim=1) * ints
    grid = grid_from_scales(scale, -scale / 2, "Q4_K")   # offsets: d/2 × the same integers
    assert grid is not None and same_bits(grid.scale, scale) and same_bits(grid.offset, -scale / 2)


def test_bad_inputs_are_named():
    with pytest.raises(ModelpressError, match=r"multiple of 256; got shape \(4, 300\)"):
        kquant_grid(torch.randn(4, 300), "Q4_K")
    with pytest.raises(ModelpressError, match="unknown k-quant type 'Q7_K'"):
        kquant_grid(torch.randn(4, 256), "Q7_K")
    bad = torch.randn(4, 256)
    bad[1, 2] = float("nan")
    with pytest.raises(ModelpressError, match="1 NaN/Inf"):
        kquant_grid(bad, "Q6_K")
    with pytest.raises(ModelpressError, match=r"importance must be 256 .* got shape \(255,\)"):
        kquant_grid(torch.randn(4, 256), "Q5_K", importance=torch.ones(255))
    with pytest.raises(ModelpressError, match="overflows the fp16"):
        kquant_grid(torch.full((1, 256), 1e9), "Q4_K")
    grid = kquant_grid(torch.randn(4, 256), "Q6_K")
    with pytest.raises(ModelpressError, match="do not pass a per-group offset"):
        grid_from_scales(grid.scale, torch.zeros_like(grid.scale), "Q6_K")
    with pytest.raises(ModelpressError, match=r"does not match the Q6_K grid's \(4, 256\)"):
        kquant_codes(torch.randn(4, 512), grid)


def test_gguf_type_enum_names_a_type():
    w = torch.randn(2, 256)
    assert np.array_equal(quantize_kquant(w, gguf.GGMLQuantizationType.Q5_K), quantize_kquant(w, "q5_k"))


@pytest.mark.parametrize("qtype", TYPES)
def test_a_packed_weight_on_a_k_quant_grid_exports_losslessly(qtype):
    """A solver's PackedWeight whose float32 scales are a k-quant header: same codes, same bits decoded."""
    w = awkward_weight(8, 512, 11)
    grid = kquant_grid(w, qtype)
    codes = kquant_codes(w, grid)
    spec = KQUANTS[qtype]
    fmt = {"Q2_K": "int2-asym", "Q3_K": "int3", "Q4_K": "int4-asym", "Q5_K": "int5-asym", "Q6_K": "int6"}[qtype]
    scheme = WeightScheme.parse(f"{fmt}/g{spec.sub_block}/float32")
    packed = PackedWeight(scheme, (8, 512), pack_codes(codes, spec.bits), grid.scale, grid.offset)
    found = kquant_from_packed(packed)
    assert found is not None and torch.equal(found[1], codes)
    assert same_bits(gguf_decode(pack_kquant(found[1], found[0]), qtype), packed.dequantize())
    # the same codes under the plain min-max scales of round-to-nearest are no k-quant
    assert kquant_from_packed(quantize_weight(w, scheme)) is None
    # nor is a group size other than the k-quant's sub-block
    assert kquant_from_packed(quantize_weight(w, WeightScheme.parse(f"{fmt}/g64/float32"))) is None


def test_a_grid_checks_its_fields():
    d = torch.ones(2, 1, dtype=torch.float16)
    with pytest.raises(ModelpressError, match=r"Q4_K grid: dmin must have shape \(2, 1\), got None"):
        KQuantGrid("Q4_K", d, torch.ones(2, 8, dtype=torch.int16))
    with pytest.raises(ModelpressError, match=r"Q6_K grid: sub_scales must have shape \(2, 16\), got \(2, 8\)"):
        KQuantGrid("q6_k", d, torch.ones(2, 8, dtype=torch.int16))
    assert KQuantGrid("q6_k", d, torch.ones(2, 16, dtype=torch.int16)).qtype == "Q6_K"
