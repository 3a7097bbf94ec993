import pytest
import torch
from conftest import build_tiny_llama

from modelpress.algorithms.prune import SparseGPTConfig, prune
from modelpress.algorithms.prune.magnitude import magnitude_mask
from modelpress.algorithms.prune.masks import NMPattern, is_nm, pruned_count
from modelpress.algorithms.prune.sparsegpt import compact_scheme, pack_kept, reconstruction_error, sparsegpt_prune
from modelpress.algorithms.prune.wanda import wanda_mask
from modelpress.errors import ModelpressError
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.sparse_linear import SparseLinear


def _correlated_layer(seed: int, n: int = 48, k: int = 64, tokens: int = 512):
    """A weight and the Hessian of inputs whose channels are correlated and differ in scale."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    scales = torch.rand(k, generator=g, dtype=torch.float64) * 3 + 0.2
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mixing * scales
    weight = torch.randn(n, k, generator=g, dtype=torch.float64)
    return weight, x.t() @ x / tokens, x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(seed, pattern):
    weight, hessian, x = _correlated_layer(seed)
    nm = NMPattern.parse(pattern) if pattern else None
    result = sparsegpt_prune(weight, hessian, 0.5, nm, block_size=32)
    ours = reconstruction_error(weight, result.weight, hessian)
    magnitude = weight * magnitude_mask(weight, 0.5, nm)
    wanda = weight * wanda_mask(weight, x.norm(dim=0), 0.5, nm)
    assert ours < reconstruction_error(weight, magnitude, hessian)
    assert ours < reconstruction_error(weight, wanda, hessian)
    # the objective really is the output error on the calibration inputs
    direct = ((x @ (weight - result.weight.double()).t()) ** 2).sum() / x.shape[0]
    assert ours == pytest.approx(float(direct), rel=1e-6)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_unstructured_sparsity_is_exact_and_pruned_weights_are_zero(sparsity):
    weight, hessian, _ = _correlated_layer(3, n=20, k=72)
    result = sparsegpt_prune(weight, hessian, sparsity, block_size=32)
    assert int((~result.mask).sum()) == pruned_count(20 * 72, sparsity)
    assert (result.weight[~result.mask] == 0).all()


def test_sparsegpt_nm_masks_are_valid():
    weight, hessian, _ = _correlated_layer(4)
    for spec in ("2:4", "4:8"):
        result = sparsegpt_prune(weight, hessian, 0.5, NMPattern.parse(spec), block_size=32)
        assert is_nm(result.mask, NMPattern.parse(spec)) and result.mask.float().mean() == 0.5


@pytest.mark.parametrize("spec,pattern", [("int4/g32", "2:4"), ("int4-asym/g32", None), ("int8/channel", "2:4")])
def test_joint_quantization_packs_kept_values_on_the_grid(spec, pattern):
    weight, hessian, _ = _correlated_layer(5, n=16, k=80)
    scheme = WeightScheme.parse(spec)
    nm = NMPattern.parse(pattern) if pattern else None
    result = sparsegpt_prune(weight.float(), hessian.float(), 0.5, nm, scheme, block_size=32)
    packed = pack_kept(result, scheme, 0.5, nm)
    kept = int(result.mask.sum(dim=1)[0])
    assert packed.shape == (16, kept) and packed.scheme == compact_scheme(scheme, 80, 0.5, nm)
    # the stored codes reproduce exactly what the solver put in the weight
    assert torch.equal(packed.dequantize().reshape(-1), result.weight[result.mask])
    layer = SparseLinear(result.mask, packed, None, None if nm is None else (nm.n, nm.m))
    assert torch.equal(layer.dense_weight(), result.weight)
    # half the weights at the compact scheme's bits, 1 mask bit each, and at most two 4-byte row paddings
    bound = 0.5 * packed.scheme.theoretical_bits_per_weight(kept) + 1 + 2 * 32 / 80
    assert 8 * layer.weight_nbytes / weight.numel() <= bound


def test_joint_quantization_beats_pruning_then_rounding():
    weight, hessian, _ = _correlated_layer(6, n=32, k=128)
    weight, hessian = weight.float(), hessian.float()
    scheme, nm = WeightScheme.parse("int4/g64"), NMPattern(2, 4)
    joint = sparsegpt_prune(weight, hessian, 0.5, nm, scheme, block_size=64)
    mask = magnitude_mask(weight, 0.5, nm)
    kept = weight[mask].reshape(32, 64)
    rounded = quantize_weight(kept, compact_scheme(scheme, 128, 0.5, nm)).dequantize().reshape(-1)
    naive = torch.zeros_like(weight).masked_scatter_(mask, rounded)
    assert reconstruction_error(weight, joint.weight, hessian) < reconstruction_error(weight, naive, hessian)


def test_sparsegpt_in_the_engine_leaves_compressed_layers_and_resumes(tmp_path):
    ids = torch.randint(0, 320, (4, 24))
    model = build_tiny_llama()
    config = SparseGPTConfig(pattern="2:4", scheme=WeightScheme.parse("int4/g32"), block_size=32)
    report = prune(model, config, ids, resume_dir=str(tmp_path / "resume"), batch_size=2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 14 and all(m.quantized and is_nm(m.keep_mask(), NMPattern(2, 4)) for m in layers.values())
    assert report.summary()["bytes_ratio"] < 0.15  # float32 dense -> 2:4 + int4/g32 kept values + bitmask
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    again = build_tiny_llama()
    resumed = prune(again, config, ids, resume_dir=str(tmp_path / "resume"), batch_size=2)
    assert resumed.extra["resumed_from_block"] == 2  # every block restored from disk, none recomputed
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)


@pytest.mark.parametrize("pattern, spec", [("2:4", None), ("2:4", "int4/g32"), (None, "int4/g32"), (None, None)])
def test_stacked_layers_sharing_a_hessian_solve_as_if_alone(pattern, spec):
    """q/k/v (or gate/up) are solved in one sweep over their stacked rows: the result is each layer's own,
    and unstructured sparsity still prunes exactly round(s·N·K) weights in each layer."""
    weight, hessian, _ = _correlated_layer(3, n=40)
    top, bottom = weight[:24], weight[24:] * 5   # layers of different scale: a shared count would favour one
    nm = NMPattern.parse(pattern) if pattern else None
    scheme = WeightScheme.parse(spec) if spec else None
    stacked = sparsegpt_prune(torch.cat([top, bottom]), hessian, 0.5, nm, scheme, block_size=32, row_splits=(24, 16))
    for part, (start, stop) in ((top, (0, 24)), (bottom, (24, 40))):
        rows = stacked.rows(start, stop)
        assert int((~rows.mask).sum()) == pruned_count(part.numel(), 0.5)
        alone = sparsegpt_prune(part, hessian, 0.5, nm, scheme, block_size=32)  # rows never mix: same as alone
        assert torch.equal(rows.mask, alone.mask)
        torch.testing.assert_close(rows.weight, alone.weight, rtol=1e-9, atol=1e-9)
    with pytest.raises(ModelpressError, match="do not add up"):
        sparsegpt_prune(weight, hessian, 0.5, row_splits=(24, 15))
