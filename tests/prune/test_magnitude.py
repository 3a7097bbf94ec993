import pytest
import torch
from conftest import build_tiny_llama

from modelpress.algorithms.prune import MagnitudeConfig, prune
from modelpress.errors import ModelpressError
from modelpress.nn.layers import find_linear_layers
from modelpress.nn.sparse_linear import SparseLinear


def _reference_layer(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Plain magnitude pruning: zero the round(s·numel) smallest |w| (ties by position)."""
    flat = weight.detach().reshape(-1).clone()
    count = int(flat.numel() * sparsity + 0.5)
    flat[torch.argsort(flat.abs(), stable=True)[:count]] = 0
    return flat.reshape(weight.shape)


def _reference_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out = weight.detach().clone()
    for r in range(out.shape[0]):
        for start in range(0, out.shape[1], m):
            group = out[r, start:start + m]
            drop = sorted(range(m), key=lambda i: (abs(float(group[i])), i))[: m - n]
            group[drop] = 0
    return out


def _weights(model):
    return {name: m.weight.detach().clone() for name, m in find_linear_layers(model).items()}


def test_layer_magnitude_equals_plain_reference():
    model = build_tiny_llama()
    before = _weights(model)
    report = prune(model, MagnitudeConfig(sparsity=0.37))
    modules = dict(model.named_modules())
    for name, weight in before.items():
        layer = modules[name]
        assert isinstance(layer, SparseLinear)
        assert torch.equal(layer.dense_weight(), _reference_layer(weight, 0.37))
        assert report.layers[name].kept == weight.numel() - int(weight.numel() * 0.37 + 0.5)


def test_nm_magnitude_equals_plain_reference():
    model = build_tiny_llama(num_hidden_layers=1)
    before = _weights(model)
    prune(model, MagnitudeConfig(pattern="2:4"))
    modules = dict(model.named_modules())
    for name, weight in before.items():
        assert torch.equal(modules[name].dense_weight(), _reference_nm(weight, 2, 4))
        assert modules[name].pattern == (2, 4)


def test_global_magnitude_uses_one_threshold_over_all_layers():
    model = build_tiny_llama()
    before = _weights(model)
    report = prune(model, MagnitudeConfig(sparsity=0.5, scope="global"))
    everything = torch.cat([w.abs().reshape(-1) for w in before.values()])
    threshold = everything.sort().values[int(everything.numel() * 0.5 + 0.5) - 1]
    modules = dict(model.named_modules())
    per_layer = []
    for name, weight in before.items():
        keep = modules[name].keep_mask()
        assert (weight.abs()[keep] >= threshold).all() and (weight.abs()[~keep] <= threshold).all()
        per_layer.append(report.layers[name].sparsity)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    assert max(per_layer) - min(per_layer) > 0.01  # layers do lose different shares


def test_dense_storage_keeps_zeros_in_linear_layers():
    model = build_tiny_llama(num_hidden_layers=1)
    report = prune(model, MagnitudeConfig(sparsity=0.5, compress=False))
    for name, module in find_linear_layers(model).items():
        assert isinstance(module, torch.nn.Linear)
        assert (module.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
        assert report.layers[name].stored_bytes == report.layers[name].dense_bytes


def test_magnitude_config_errors_name_the_value():
    with pytest.raises(ModelpressError, match="1.2"):
        MagnitudeConfig(sparsity=1.2)
    with pytest.raises(ModelpressError, match="global"):
        MagnitudeConfig(pattern="2:4", scope="global")
    with pytest.raises(ModelpressError, match="scope"):
        MagnitudeConfig(sparsity=0.5, scope="row")
