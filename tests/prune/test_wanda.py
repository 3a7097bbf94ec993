import torch
from conftest import build_tiny_llama

from modelpress.algorithms.prune import WandaConfig, prune
from modelpress.algorithms.prune.masks import NMPattern, is_nm
from modelpress.algorithms.prune.wanda import SquaredNormSum, wanda_mask, wanda_score
from modelpress.nn.sparse_linear import SparseLinear


def test_wanda_metric_equals_direct_computation():
    torch.manual_seed(0)
    weight = torch.randn(12, 20)
    batches = [torch.randn(3, 7, 20) * torch.linspace(0.1, 3, 20) for _ in range(4)]
    acc = SquaredNormSum(20, torch.device("cpu"))
    for x in batches:
        acc.add(x)
    tokens = torch.cat([x.reshape(-1, 20) for x in batches])
    direct = torch.stack([torch.stack([weight[i, j].abs() * tokens[:, j].norm() for j in range(20)]) for i in range(12)])
    assert acc.rows == 84
    torch.testing.assert_close(wanda_score(weight, acc.norm()), direct, rtol=1e-6, atol=1e-6)
    keep = wanda_mask(weight, acc.norm(), 0.5)
    for i in range(12):  # per output row: the 10 largest metrics stay
        assert set(keep[i].nonzero().squeeze(1).tolist()) == set(torch.topk(direct[i], 10).indices.tolist())


def test_wanda_differs_from_magnitude_when_channels_differ_in_scale():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norm = torch.tensor([10.0, 10.0, 0.1, 0.1])
    assert wanda_mask(weight, norm, 0.5).tolist() == [[True, True, False, False]]


def test_wanda_in_the_engine_prunes_with_the_layer_inputs_it_sees():
    model = build_tiny_llama()
    ids = torch.randint(0, 320, (4, 24))
    seen = []
    q = model.model.layers[0].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    weight = q.weight.detach().clone()
    expected = wanda_mask(weight, x.pow(2).sum(0).sqrt(), 0.5)

    report = prune(model, WandaConfig(sparsity=0.5), ids, batch_size=2)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SparseLinear)
    assert torch.equal(layer.keep_mask(), expected)
    assert torch.equal(layer.dense_weight(), weight * expected)  # Wanda keeps the original values
    assert report.sparsity == 0.5 and len(report.layers) == 14
    for info in report.layers.values():
        assert info.kept * 2 == info.total


def test_wanda_nm_pattern_is_valid_in_every_layer():
    model = build_tiny_llama(num_hidden_layers=1)
    prune(model, WandaConfig(pattern="4:8"), torch.randint(0, 320, (2, 16)))
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 7
    for layer in layers:
        assert is_nm(layer.keep_mask(), NMPattern(4, 8)) and layer.nnz * 2 == layer.in_features * layer.out_features
