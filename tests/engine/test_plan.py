import torch
from conftest import build_tiny_llama
from tiny_models import build_tiny_gpt2, build_tiny_mixtral, token_ids

from modelpress.engine.blocks import find_blocks
from modelpress.engine.capture import capture_inputs
from modelpress.engine.plan import plan_block
from modelpress.engine.targets import find_targets
from modelpress.nn.quant_experts import QuantExperts


def _plan(model, vocab):
    QuantExperts.prepare_model(model)  # as the runner does: experts run one by one, so they can be seen
    stack = find_blocks(model)
    captured = capture_inputs(model, stack, token_ids(vocab, 2, 16), torch.device("cpu"), batch_size=2)
    block = stack.blocks[0]
    targets = find_targets(block)
    return plan_block(block, targets, captured.hidden[0], captured.calls[0][0])


def test_llama_levels_and_shared_inputs():
    plan = _plan(build_tiny_llama(), 320)
    groups = {g.key: (g.level, [t.name for t in g.targets]) for g in plan.groups}
    assert groups == {
        "self_attn.q_proj": (0, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        "self_attn.o_proj": (1, ["self_attn.o_proj"]),
        "mlp.gate_proj": (2, ["mlp.gate_proj", "mlp.up_proj"]),
        "mlp.down_proj": (3, ["mlp.down_proj"]),
    }
    assert plan.early_stop == {0, 1, 2}


def test_gpt2_conv1d_chain():
    plan = _plan(build_tiny_gpt2(), 256)
    assert [(g.key, g.level) for g in sorted(plan.groups, key=lambda g: g.level)] == [
        ("attn.c_attn", 0), ("attn.c_proj", 1), ("mlp.c_fc", 2), ("mlp.c_proj", 3)]
    # Conv1D weights are presented as (out, in)
    c_attn = plan.groups[0].targets[0]
    assert c_attn.weight.shape == (192, 64)


def test_fused_experts_become_one_target_per_expert():
    plan = _plan(build_tiny_mixtral(experts=4), 256)
    level = plan.level_of()
    for e in range(4):
        assert level[f"mlp.experts.gate_up_proj.{e}"] == 2
        assert level[f"mlp.experts.down_proj.{e}"] == 3
    expert = next(g for g in plan.groups if g.key == "mlp.experts.down_proj.1")
    assert expert.targets[0].weight.shape == (64, 96)
    assert 2 not in plan.early_stop  # the eager expert loop interleaves levels 2 and 3
