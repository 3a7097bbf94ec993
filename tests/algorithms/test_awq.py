"""AWQ: folds that leave the float model unchanged, producers found by data flow (not names), a scale search
never worse than RTN and clearly better with outlier channels, a clip search that never raises the error."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from modelpress.algorithms.quantize.awq import (
    AWQConfig,
    candidate_scale,
    quantize_awq,
    scaled_objective,
    search_clip,
    search_scales,
)
from modelpress.algorithms.quantize.gptq import layer_objective
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.algorithms.quantize.smoothing import apply_fold, find_producers, foldable_groups
from modelpress.engine.algorithm import LayerSolution
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.errors import ModelpressError
from modelpress.formats.packed import fake_quantize, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.quant_linear import QuantLinear


def calibration_ids(seed: int = 0, n: int = 8, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


class RandomFold:
    """A test algorithm: folds random scales into every producer found, leaves weights as they are."""

    sequential = False

    def __init__(self) -> None:
        self.producers: dict[str, str | None] = {}
        self.labels: dict[str, str] = {}

    def describe(self) -> str:
        return "random fold"

    def prepare_block(self, context) -> None:
        groups = foldable_groups(context)
        found = find_producers(context, groups)
        gen = torch.Generator().manual_seed(context.index)
        for group in groups:
            producer = found[group.key]
            self.producers[f"{context.index}.{group.key}"] = None if producer is None else producer.name
            if producer is not None:
                self.labels[f"{context.index}.{group.key}"] = producer.label
                k = group.targets[0].weight.shape[1]
                apply_fold(context, producer, group, producer.tie(2.0 ** (torch.rand(k, generator=gen) * 6 - 3)))

    def observe(self, group, inputs) -> None:
        pass

    def solve(self, group):
        return [LayerSolution(t.weight.detach().clone()) for t in group.targets]

    def finish_block(self, index: int) -> None:
        pass


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def random_folds_keep_the_model(model) -> RandomFold:
    """Fold random scales into every producer found: the float model's logits must not change."""
    ids = calibration_ids()
    with torch.no_grad():
        before = model(ids).logits
    algo = RandomFold()
    run_sequential(model, algo, ids, settings=EngineSettings(batch_size=4))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    return algo


@pytest.mark.parametrize("kv_heads", [6, 2])
def test_folds_leave_the_float_llama_unchanged_and_producers_follow_data_flow(kv_heads):
    model = build_tiny_llama(num_key_value_heads=kv_heads)
    algo = random_folds_keep_the_model(model)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, build_tiny_llama(
        num_key_value_heads=kv_heads).model.layers[0].input_layernorm.weight)  # the folds did happen
    for i in range(2):
        assert algo.producers[f"{i}.self_attn.q_proj"] == "input_layernorm"
        assert algo.producers[f"{i}.mlp.gate_proj"] == "post_attention_layernorm"
        assert algo.producers[f"{i}.mlp.down_proj"] == "mlp.up_proj"       # through act(gate) * up
        # v_proj -> o_proj, also when a value head serves several query heads (scales tied, Producer.tie)
        assert algo.producers[f"{i}.self_attn.o_proj"] == "self_attn.v_proj"


def test_fused_qkv_with_grouped_query_attention_folds_into_its_value_rows():
    """Phi-3's qkv_proj holds 64 query, 32 key and 32 value rows (4 query heads share 2 value heads): o_proj's
    scales are tied in pairs and folded into the last 32 rows, found from the data."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    algo = random_folds_keep_the_model(Phi3ForCausalLM(config).eval())
    assert algo.producers["0.self_attn.o_proj"] == algo.producers["1.self_attn.o_proj"] == "self_attn.qkv_proj"
    assert algo.labels["0.self_attn.o_proj"] == "self_attn.qkv_proj[96:128] (each row feeds 2 input channels)"


def first_block_context(model, ids):
    from modelpress.engine.blocks import find_blocks
    from modelpress.engine.capture import capture_inputs
    from modelpress.engine.context import BlockContext
    from modelpress.engine.plan import plan_block
    from modelpress.engine.targets import find_targets

    stack = find_blocks(model)
    captured = capture_inputs(model, stack, ids, torch.device("cpu"), batch_size=4)
    block = stack.blocks[0]
    targets = find_targets(block, ())
    plan = plan_block(block, targets, captured.hidden[0], captured.calls[0][0])
    return BlockContext(0, block, targets, plan, captured.hidden, captured.calls[0])


def test_only_folds_that_commute_with_the_data_path_are_accepted():
    """q_proj and k_proj have as many outputs as o_proj has inputs, gate_proj as many as down_proj: shapes fit,
    but softmax and the activation function do not commute with a per-channel scale."""
    from modelpress.algorithms.quantize.smoothing import Producer, _fold_is_exact, _trace

    context = first_block_context(build_tiny_llama(num_key_value_heads=6), calibration_ids())
    groups = {g.key: g for g in foldable_groups(context)}
    trace, reference = _trace(context, list(groups.values()))
    expected = {("self_attn.o_proj", "self_attn.v_proj"): True, ("self_attn.o_proj", "self_attn.q_proj"): False,
                ("self_attn.o_proj", "self_attn.k_proj"): False, ("mlp.down_proj", "mlp.up_proj"): True,
                ("mlp.down_proj", "mlp.gate_proj"): False}
    before = {n: p.clone() for n, p in context.block.state_dict().items()}
    for (group, producer), exact in expected.items():
        inputs = trace.group_inputs[group]
        assert _fold_is_exact(context, Producer(producer, "linear"), groups[group], inputs, reference) == exact
    assert all(torch.equal(p, before[n]) for n, p in context.block.state_dict().items())  # trials leave no trace


def test_folds_work_on_gpt2_layernorms_with_bias_and_conv1d_weights():
    model = tiny_gpt2()
    ids = calibration_ids()
    with torch.no_grad():
        before = model(ids).logits
    algo = RandomFold()
    run_sequential(model, algo, ids, settings=EngineSettings(batch_size=4))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
    assert algo.producers["0.attn.c_attn"] == "ln_1"
    assert algo.producers["0.mlp.c_fc"] == "ln_2"
    assert algo.producers["0.attn.c_proj"] == "attn.c_attn"   # its value third (rows 2K:3K) of the fused q/k/v
    assert algo.producers["0.mlp.c_proj"] is None      # behind GELU: no fold commutes with it


# ---- the scale search ---------------------------------------------------------------------------------

def outlier_activations(rows: int, k: int, seed: int, outliers: int = 4, factor: float = 50.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    x[:, :outliers] *= factor
    return x


def test_candidate_scales_are_normalised_and_alpha_zero_is_identity():
    mean = torch.rand(64) * 10 + 0.01
    assert torch.equal(candidate_scale(mean, 0.0), torch.ones(64))
    s = candidate_scale(mean, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    # larger activations -> larger scales, monotonically
    order = torch.argsort(mean)
    assert torch.all(s[order][1:] >= s[order][:-1])


@pytest.mark.parametrize("spec", ["int4/g32", "int3/g32", "int4-asym/g32", "nf4/g32"])
def test_scale_search_beats_rtn_with_outlier_channels(spec):
    scheme = WeightScheme.parse(spec)
    x = outlier_activations(512, 96, seed=1)
    hessian = x.T @ x / x.shape[0]
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(48, 96, generator=gen), torch.randn(16, 96, generator=gen)]
    found = search_scales(x.abs().mean(0), weights, hessian, scheme, grid=20)
    rtn = sum(layer_objective(w, fake_quantize(w, scheme), hessian) for w in weights)
    assert found.rtn_objective == pytest.approx(rtn, rel=1e-6)
    assert found.objective < 0.7 * rtn and found.alpha > 0
    # the reported objective is what the chosen scales really give, computed from the activations
    direct = sum(float(((x @ w.T - (x / found.scale) @ fake_quantize(w * found.scale, scheme).T) ** 2).sum())
                 for w in weights) / x.shape[0]
    assert found.objective == pytest.approx(direct, rel=1e-3)
    assert scaled_objective(weights, found.scale, hessian, scheme) == pytest.approx(found.objective)


def test_scale_search_never_worse_than_rtn_without_outliers():
    scheme = WeightScheme.parse("int4/g32")
    for seed in range(4):
        x = outlier_activations(256, 64, seed=seed, outliers=0)
        hessian = x.T @ x / x.shape[0]
        w = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
        found = search_scales(x.abs().mean(0), [w], hessian, scheme, grid=10, duo_scaling=True)
        assert found.objective <= found.rtn_objective


# ---- the clip search ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["int4/g32", "int3/g16", "int4-asym/g32", "int2-asym/g16", "nf4/g32", "fp4/g32",
                                  "int8/channel", "int4/channel"])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_search_never_increases_the_layer_objective(spec, seed):
    scheme = WeightScheme.parse(spec)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 80, generator=gen) * torch.distributions.StudentT(3.0).sample((24, 80))  # heavy tails
    x = torch.randn(300, 80, generator=gen) @ (torch.eye(80) + 0.2 * torch.randn(80, 80, generator=gen))
    hessian = x.T @ x / x.shape[0]
    scale, offset = search_clip(w, hessian, scheme, grid=10, max_shrink=0.5)
    clipped = quantize_weight(w, scheme, scale=scale, offset=offset).dequantize()
    ours = layer_objective(w, clipped, hessian)
    rtn = layer_objective(w, fake_quantize(w, scheme), hessian)
    assert ours <= rtn
    if scheme.bits <= 3:
        assert ours < 0.95 * rtn   # heavy-tailed weights at 2-3 bits: clipping clearly pays


def test_clip_search_declines_schemes_without_per_group_ranges():
    w, h = torch.randn(8, 32), torch.eye(32)
    assert search_clip(w, h, WeightScheme.parse("int4/tensor")) is None
    assert search_clip(w, h, WeightScheme.parse("nf4/g16/dq")) is None


# ---- the whole algorithm on a tiny model with outlier channels ----------------------------------------

def outlier_llama(kv_heads: int = 2):
    """A tiny Llama whose norms make 4 input channels of every attention and MLP group 50x larger."""
    model = build_tiny_llama(num_key_value_heads=kv_heads)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 50
            layer.post_attention_layernorm.weight[:4] *= 50
    return model


def logits_error(model, reference, ids) -> float:
    with torch.no_grad():
        return float((model(ids).logits - reference).norm() / reference.norm())


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_awq_beats_rtn_on_a_model_with_outlier_channels(solver):
    scheme = WeightScheme.parse("int4/g32")
    ids, held_out = calibration_ids(0), calibration_ids(1)
    float_model = outlier_llama()
    with torch.no_grad():
        reference = float_model(held_out).logits
    rtn = outlier_llama()
    quantize_rtn(rtn, RTNConfig(scheme))
    awq = outlier_llama()
    report = quantize_awq(awq, AWQConfig(scheme, scale_grid=10, clip_grid=10, solver=solver), ids, batch_size=4)
    assert all(isinstance(m, QuantLinear) for n, m in awq.named_modules() if n.endswith("_proj"))
    notes = report.run.notes
    assert notes["model.layers.0.self_attn.q_proj"].get("awq", notes["model.layers.0.self_attn.q_proj"])["scaled"]
    for name, layer_notes in notes.items():
        scaling = layer_notes.get("awq", layer_notes)
        if "scale_objective" in scaling:
            assert scaling["scale_objective"] <= scaling["scale_rtn_objective"], name
    # grouped-query attention: o_proj's scales tied over the query heads sharing a value head, folded into v_proj
    o_proj = notes["model.layers.0.self_attn.o_proj"]
    assert o_proj.get("awq", o_proj)["producer"] == "self_attn.v_proj (each row feeds 3 input channels)"
    assert logits_error(awq, reference, held_out) < 0.8 * logits_error(rtn, reference, held_out)


def test_config_validates():
    scheme = WeightScheme.parse("int4")
    with pytest.raises(ModelpressError, match="max_shrink"):
        AWQConfig(scheme, max_shrink=1.0)
    with pytest.raises(ModelpressError, match="solver"):
        AWQConfig(scheme, solver="magic")
    with pytest.raises(ModelpressError, match="grid"):
        AWQConfig(scheme, scale_grid=0)


def test_quantize_model_runs_awq_from_the_api(tiny_llama_dir, tiny_text):
    from modelpress.api import CalibrationSettings, quantize_model
    from modelpress.io.model import load_model

    loaded = load_model(str(tiny_llama_dir))
    calibration = CalibrationSettings(text=str(tiny_text), samples=4, seq_len=32, batch_size=2, eval_tokens=256)
    info = quantize_model(loaded, AWQConfig("int4/g32"), calibration).to_json()
    assert info["method"] == "awq" and info["layers"] == 14 and info["calibration"]["samples"] == 4
    unscaled = info["unscaled_layers"]
    assert info["scaled_layers"] + len(unscaled) == 14
    assert not any(reason.startswith("no ") for reason in unscaled.values())   # every group has a producer


@pytest.mark.slow
def test_awq_beats_rtn_on_the_default_model(default_model):
    """On SmolLM2-135M (H100, 128 x 512 calibration, 40 x 512 windows: KL 0.18 against RTN's 0.63)."""
    import copy

    from modelpress.api import CalibrationSettings, calibration_windows
    from modelpress.eval.quality import evaluate_quality
    from modelpress.io.text import load_text, make_windows

    scheme = WeightScheme.parse("int4/g128")
    ids = calibration_windows(default_model.tokenizer, CalibrationSettings(samples=4, seq_len=256))
    awq = copy.deepcopy(default_model.model)
    report = quantize_awq(awq, AWQConfig(scheme, scale_grid=10, clip_grid=10), ids)   # coarse grids: ~1 CPU minute
    summary = report.summary()
    assert summary["scaled_layers"] >= 150               # q, k, v, gate, up (and down where it pays) of 30 blocks
    assert not [n for n, why in summary["unscaled_layers"].items() if why.startswith("no ")]   # all have producers
    # 9 query heads share 3 value heads: o_proj's scales are tied in threes and folded into v_proj
    assert all(report.run.notes[f"model.layers.{i}.self_attn.o_proj"]["producer"]
               == "self_attn.v_proj (each row feeds 3 input channels)" for i in range(30))
    assert all(report.run.notes[f"model.layers.{i}.mlp.down_proj"]["producer"] == "mlp.up_proj" for i in range(30))
    rtn = copy.deepcopy(default_model.model)
    quantize_rtn(rtn, RTNConfig(scheme))
    windows = make_windows(default_model.tokenizer, load_text(None), seq_len=256, eval_windows=4).eval
    with torch.no_grad():
        result = evaluate_quality({"awq": awq, "rtn": rtn}, windows, reference=default_model.model)
    assert result["awq"].kl_divergence < 0.6 * result["rtn"].kl_divergence
