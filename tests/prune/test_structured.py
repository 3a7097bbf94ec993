import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer
from transformers import AutoModelForCausalLM

from modelpress.algorithms.prune import StructuredConfig, prune
from modelpress.algorithms.prune.structured import count_parameters, trace_units
from modelpress.engine.blocks import find_blocks
from modelpress.errors import ModelpressError
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.save import save_compressed
from modelpress.nn.sparse_linear import ResizedLinear

IDS = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))


def _save(model, path):
    return save_compressed(LoadedModel(model, char_tokenizer(), "tiny", "tiny"), path)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_units_are_found_by_structure():
    model = build_tiny_llama()
    stack = find_blocks(model)
    heads = trace_units(model, stack, IDS, "heads")[0]
    channels = trace_units(model, stack, IDS, "channels")[0]
    assert [(u.producers, u.consumer) for u in heads] == [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj")]
    # o_proj -> norm -> gate_proj mixes channels (the residual stream) and is not a unit
    assert [(u.producers, u.consumer) for u in channels] == [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")]


def test_uniform_neurons_load_in_plain_transformers_with_smaller_shapes(tmp_path):
    model = build_tiny_llama()
    before = count_parameters(model)
    report = prune(model, StructuredConfig("neurons", 0.5, multiple_of=8), IDS)   # tiny widths: 160 -> 80
    assert model.config.intermediate_size == 80
    for block in model.model.layers:
        assert block.mlp.gate_proj.weight.shape == (80, 96) and block.mlp.down_proj.weight.shape == (96, 80)
    assert report.parameters_after == before - 2 * 3 * 96 * 80 == count_parameters(model)
    plain = AutoModelForCausalLM.from_pretrained(_save(model, tmp_path / "neurons"))
    assert type(plain.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert count_parameters(plain) == report.parameters_after
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=0)


def test_kept_neurons_are_the_highest_activation_times_weight_norm():
    model = build_tiny_llama(num_hidden_layers=1)
    down = model.model.layers[0].mlp.down_proj
    seen = []
    handle = down.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    _logits(model)
    handle.remove()
    score = torch.cat(seen).norm(dim=0) * down.weight.detach().norm(dim=0)
    expected = torch.sort(torch.topk(score, 80).indices).values
    weight = down.weight.detach().clone()
    prune(model, StructuredConfig("neurons", 0.5, multiple_of=8), IDS)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, weight[:, expected])


def test_uniform_heads_remove_whole_key_value_groups(tmp_path):
    model = build_tiny_llama()
    attention = model.model.layers[1].self_attn
    q, k, o = (attention.q_proj.weight.detach().clone(), attention.k_proj.weight.detach().clone(),
               attention.o_proj.weight.detach().clone())
    report = prune(model, StructuredConfig("heads", 0.5), IDS)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (3, 1, 16)
    kept = report.widths["model.layers.1.self_attn.o_proj"]
    assert kept == [96, 48]
    new = model.model.layers[1].self_attn
    group = 0 if torch.equal(new.k_proj.weight, k[:16]) else 1  # one of the two groups stays, whole
    assert torch.equal(new.k_proj.weight, k[16 * group:16 * (group + 1)])
    assert torch.equal(new.q_proj.weight, q[48 * group:48 * (group + 1)])
    assert torch.equal(new.o_proj.weight, o[:, 48 * group:48 * (group + 1)])
    plain = AutoModelForCausalLM.from_pretrained(_save(model, tmp_path / "heads"))
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=0)
    out = plain.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # KV cache of the new shape
    assert out.shape == (1, 12)


def test_layers_go_by_least_change_and_the_rest_renumber(tmp_path):
    model = build_tiny_llama(num_hidden_layers=4)
    changes = []
    for block in model.model.layers:
        block.register_forward_hook(lambda _m, args, out: changes.append(
            float((1 - torch.nn.functional.cosine_similarity(args[0], out[0] if isinstance(out, tuple) else out,
                                                             dim=-1)).mean())))
    _logits(model)
    least = min(range(4), key=lambda i: changes[i])
    for block in model.model.layers:
        block._forward_hooks.clear()
    report = prune(model, StructuredConfig("layers", 0.25), IDS)
    assert report.removed_layers == [least]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    plain = AutoModelForCausalLM.from_pretrained(_save(model, tmp_path / "layers"))
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=0)
    assert plain.generate(IDS[:1, :8], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 11)


def test_non_uniform_widths_load_through_modelpress_only(tmp_path):
    model = build_tiny_llama(num_hidden_layers=3)
    report = prune(model, StructuredConfig("neurons", 0.4, uniform=False), IDS)
    widths = sorted({after for _, after in report.widths.values()})
    assert len(widths) > 1 and all(w % 32 == 0 for w in widths)   # the default multiple_of
    assert model.config.intermediate_size == 160  # the config cannot say per-layer widths
    out = _save(model, tmp_path / "mixed")
    loaded = load_model(str(out)).model
    for name, (_, after) in report.widths.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, ResizedLinear) and layer.in_features == after
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    # plain transformers (no modelpress.hf registered, as earlier tests in this process may have done) refuses
    # it: the shapes disagree with the config
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                            "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(out)], capture_output=True, text=True)
    assert probe.returncode != 0 and ("size mismatch" in probe.stderr or "Error" in probe.stderr), probe.stderr[-500:]


def test_structured_config_errors():
    with pytest.raises(ModelpressError, match="target"):
        StructuredConfig("rows", 0.5)
    with pytest.raises(ModelpressError, match="1.0"):
        StructuredConfig("neurons", 1.0)
