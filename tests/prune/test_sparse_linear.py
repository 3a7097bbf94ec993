import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama, char_tokenizer
from safetensors import safe_open

from modelpress.algorithms.prune import MagnitudeConfig, SparseGPTConfig, prune
from modelpress.algorithms.prune.masks import NMPattern, nm_mask
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.save import save_compressed
from modelpress.nn.sparse_linear import SparseLinear, pack_mask, unpack_mask


def test_mask_packing_round_trip_is_one_bit_per_weight():
    torch.manual_seed(0)
    mask = torch.rand(5, 77) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 12)  # ceil(77 / 8) = 10 bytes, padded to 12
    assert torch.equal(unpack_mask(packed, 77), mask)


def test_forward_equals_dense_masked_linear():
    torch.manual_seed(1)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    mask = nm_mask(weight.abs(), NMPattern(2, 4))
    layer = SparseLinear.from_dense(weight, mask, bias, (2, 4))
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), F.linear(x, weight * mask, bias))
    assert layer.nnz == 24 * 16


@pytest.mark.parametrize("spec", ["0.5", "2:4", "4:8"])
def test_fp16_save_reload_is_bit_exact_and_stores_at_least_40_percent_fewer_bytes(tmp_path, spec):
    model = build_tiny_llama().half()
    config = MagnitudeConfig(pattern=spec) if ":" in spec else MagnitudeConfig(sparsity=float(spec))
    report = prune(model, config)
    out = save_compressed(LoadedModel(model, char_tokenizer(), "tiny", "tiny"), tmp_path / "pruned")

    reloaded = load_model(str(out)).model
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    x = torch.randn(4, 96, dtype=torch.float16)
    for name in report.layers:
        original, loaded = model.get_submodule(name), reloaded.get_submodule(name)
        assert isinstance(loaded, SparseLinear) and loaded.pattern == original.pattern
        assert torch.equal(loaded.dense_weight(), original.dense_weight())
        if loaded.in_features == 96:
            assert torch.equal(loaded(x), original(x))

    # bytes as stored in the file, per pruned layer, against its dense fp16 weight
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        stored = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    for name, info in report.layers.items():
        layer_bytes = sum(_nbytes(stored[key]) for key in stored if key.startswith(name + "."))
        assert layer_bytes == info.stored_bytes
        assert layer_bytes <= 0.6 * info.dense_bytes, (name, layer_bytes, info.dense_bytes)
    assert report.summary()["bytes_ratio"] <= 0.6


def _nbytes(piece) -> int:
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I8": 1, "I32": 4}
    count = 1
    for dim in piece.get_shape():
        count *= dim
    return count * sizes[piece.get_dtype()]


def test_quantized_sparse_layers_reload_exactly(tmp_path):
    model = build_tiny_llama(num_hidden_layers=1)
    ids = torch.randint(0, 320, (2, 16))
    prune(model, SparseGPTConfig(pattern="2:4", scheme=WeightScheme.parse("int4/g32")), ids)
    out = save_compressed(LoadedModel(model, char_tokenizer(), "tiny", "tiny"), tmp_path / "joint")
    reloaded = load_model(str(out)).model
    layer = reloaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, SparseLinear) and layer.quantized and layer.pattern == (2, 4)
    assert torch.equal(layer.dense_weight(), model.model.layers[0].mlp.down_proj.dense_weight())
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_measured_size_counts_mask_and_kept_values():
    from modelpress.eval.size import measure_size

    model = build_tiny_llama()
    dense = measure_size(model)
    prune(model, MagnitudeConfig(sparsity=0.5))
    size = measure_size(model)
    assert size.bits_per_weight == 0.5 * 32 + 1  # float32 kept values + 1 mask bit (rows need no padding here)
    pruned_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, SparseLinear))
    assert size.parameters == dense.parameters and size.quantized_parameters == pruned_weights
    # the model shrank by exactly the dense float32 bytes of the pruned layers minus what they now store
    assert dense.weight_bytes - size.weight_bytes == 4 * pruned_weights - size.quantized_weight_bytes


def test_semi_structured_path_is_not_used_off_cuda():
    weight = torch.randn(64, 64, dtype=torch.float16)
    layer = SparseLinear.from_dense(weight, nm_mask(weight.abs().float(), NMPattern(2, 4)), None, (2, 4))
    assert layer._sparse_kernel(torch.randn(2, 64, dtype=torch.float16)) is None
