import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from modelpress.algorithms.prune import ExpertPruneConfig, prune
from modelpress.errors import ModelpressError

IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def tiny_mixtral(seed: int = 0, experts: int = 8):
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=2, max_position_embeddings=128)
    return MixtralForCausalLM(config).eval()


def _direct_routing(model):
    """Per layer: tokens routed to each expert and Σ routing weight · ‖expert output‖, from the router's own
    outputs and the experts' weights, computed here without modelpress."""
    inputs = {}
    handles = [block.mlp.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
               for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    for h in handles:
        h.remove()
    result = []
    for i, block in enumerate(model.model.layers):
        x = inputs[i]
        _, weights, index = block.mlp.gate(x)
        experts = block.mlp.experts
        tokens = torch.bincount(index.reshape(-1), minlength=experts.num_experts)
        contribution = torch.zeros(experts.num_experts, dtype=torch.float64)
        for e in range(experts.num_experts):
            token, slot = torch.where(index == e)
            gate, up = torch.nn.functional.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
            contribution[e] = (weights[token, slot] * y.norm(dim=-1)).sum()
        result.append((tokens, contribution))
    return result


def test_expert_report_matches_direct_routing_and_pruned_model_loads(tmp_path):
    model = tiny_mixtral()
    direct = _direct_routing(model)
    down = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    report = prune(model, ExpertPruneConfig(sparsity=0.25), IDS)
    assert (report.experts_before, report.experts_after) == (8, 6)
    for (tokens, contribution), stats in zip(direct, report.layers.values()):
        assert torch.equal(stats.tokens.long(), tokens)
        assert stats.tokens.sum() == IDS.numel() * 2  # every token routed to its top-2
        torch.testing.assert_close(stats.contribution, contribution, rtol=1e-4, atol=1e-6)
        assert stats.exact
        assert stats.kept == sorted(torch.topk(contribution, 6).indices.tolist())
        coverage = stats.coverage()
        assert coverage["contribution"] == pytest.approx(float(contribution[stats.kept].sum() / contribution.sum()))
        assert len(stats.rows()) == 8 and sum(r["kept"] for r in stats.rows()) == 6
    kept0 = report.layers["model.layers.0.mlp.experts"].kept
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, down[kept0])
    assert model.config.num_local_experts == 6 and model.model.layers[0].mlp.gate.weight.shape == (6, 64)
    assert report.parameters_after < report.parameters_before

    with torch.no_grad():
        out = model(input_ids=IDS, use_cache=False).logits
    model.save_pretrained(tmp_path / "pruned")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS, use_cache=False).logits, out, rtol=1e-5, atol=1e-5)


def test_frequency_criterion_keeps_the_most_routed_experts():
    model = tiny_mixtral(seed=1)
    tokens = [t for t, _ in _direct_routing(model)]
    report = prune(model, ExpertPruneConfig(sparsity=0.5, criterion="frequency"), IDS)
    for count, stats in zip(tokens, report.layers.values()):
        assert stats.kept == sorted(torch.topk(count.double(), 4).indices.tolist())
        assert stats.coverage()["tokens"] == pytest.approx(float(count[stats.kept].sum() / count.sum()))


def test_expert_pruning_refuses_fewer_experts_than_top_k_and_dense_models():
    with pytest.raises(ModelpressError, match="top|fewer"):
        prune(tiny_mixtral(experts=2), ExpertPruneConfig(sparsity=0.5), IDS)
    from conftest import build_tiny_llama

    with pytest.raises(ModelpressError, match="expert"):
        prune(build_tiny_llama(), ExpertPruneConfig(sparsity=0.5), torch.randint(0, 320, (2, 8)))
