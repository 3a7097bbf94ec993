"""Mixed precision end to end: the budget on real packed bytes, per-layer schemes through RTN/GPTQ/AWQ, the
saved map reloading bit for bit, a better mix than uniform on a model with planted sensitive layers, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama

from modelpress.algorithms.quantize import config_for_method
from modelpress.algorithms.quantize.awq import AWQConfig, quantize_awq
from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.algorithms.quantize.mixed_run import MixedConfig, parse_candidates, plan_mixed
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.api import CalibrationSettings, quantize_model
from modelpress.cli import main
from modelpress.errors import ModelpressError
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import load_model
from modelpress.io.save import save_compressed
from modelpress.nn.quant_linear import QuantLinear

INT3, INT4, INT8 = (WeightScheme.parse(s) for s in ("int3/g32", "int4/g32", "int8/channel"))
SENSITIVE = ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj")


def windows(n=4, seq=48, seed=0):
    return torch.randint(0, 320, (n, seq), generator=torch.Generator().manual_seed(seed))


def planted_model():
    """A tiny llama whose two SENSITIVE layers have 10x larger weights than the rest: their rounding error
    dominates the output error at 3-4 bits."""
    model = build_tiny_llama(initializer_range=0.04)
    with torch.no_grad():
        for name in SENSITIVE:
            model.get_submodule(name).weight.mul_(10)
    return model


@torch.no_grad()
def kl(reference, model, ids):
    ref = F.log_softmax(reference(ids, use_cache=False).logits.float(), -1)
    got = F.log_softmax(model(ids, use_cache=False).logits.float(), -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_planted_sensitive_layers_get_wide_formats_and_the_mix_beats_uniform_at_fewer_bits():
    model, ids = planted_model(), windows()
    uniform = copy.deepcopy(model)
    quantize_rtn(uniform, RTNConfig(scheme=INT4))
    uniform_bits = measure_size(uniform).bits_per_weight
    plan = plan_mixed(model, MixedConfig(target_bits=uniform_bits, candidates=(INT3, INT4, INT8)), ids)
    for name in SENSITIVE:
        assert plan.choice.schemes[name] == "int8/channel"
    assert "int3/g32" in plan.choice.schemes.values()        # paid for by narrower layers elsewhere
    mixed = copy.deepcopy(model)
    quantize_rtn(mixed, RTNConfig(scheme=INT4, schemes=plan.schemes()))
    assert measure_size(mixed).bits_per_weight <= uniform_bits
    held_out = windows(seed=1)
    assert kl(model, mixed, held_out) < 0.25 * kl(model, uniform, held_out)


@pytest.mark.parametrize("method, static", [("rtn", True), ("gptq", True), ("gptq", False)])
def test_budget_holds_on_real_packed_bytes(tiny_llama_dir, tiny_text, method, static):
    loaded = load_model(str(tiny_llama_dir))
    calibration = CalibrationSettings(text=str(tiny_text), samples=4, seq_len=64)
    # a tight budget between the candidates: GPTQ's stored column permutation (permuted layout) must be
    # counted to stay under, and must not be counted with static groups for the budget to be used
    config = MixedConfig(target_bits=4.3, candidates=(INT3, INT4, INT8), method=method, sensitivity_samples=2,
                         static_groups=static)
    info = quantize_model(loaded, config, calibration).to_json()
    mixed = info["mixed"]
    stored = quant_layers(loaded.model)
    assert set(stored) == set(mixed["layers"]) and len(stored) == 14
    real = 8 * sum(m.weight_nbytes for m in stored.values()) / sum(m.in_features * m.out_features
                                                                   for m in stored.values())
    assert real == pytest.approx(mixed["achieved_bits_per_weight"]) == pytest.approx(measure_size(loaded.model).bits_per_weight)
    assert real <= 4.3
    assert real > 4.0                                        # the budget was used, not left idle
    for name, layer in mixed["layers"].items():
        assert stored[name].scheme.spec == layer["scheme"]
        assert layer["bits"] == 8 * stored[name].weight_nbytes
    assert len({v["scheme"] for v in mixed["layers"].values()}) >= 2
    if method == "gptq" and not static:
        assert any(m.input_perm is not None for m in stored.values())
    else:
        assert all(m.input_perm is None for m in stored.values())


def test_gptq_and_awq_honour_per_layer_schemes_and_an_all_default_map_changes_nothing():
    model, ids = build_tiny_llama(), windows(n=2, seq=32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    override = {"model.layers.0.self_attn.q_proj": INT8, "model.layers.1.mlp.down_proj": INT3}
    for run, config in ((quantize_gptq, GPTQConfig(scheme=INT4, schemes=override)),
                        (quantize_awq, AWQConfig(scheme=INT4, schemes=override, scale_grid=4, clip_grid=4))):
        mixed = copy.deepcopy(model)
        run(mixed, config, ids)
        got = {n: m.scheme for n, m in quant_layers(mixed).items()}
        assert got == {n: override.get(n, INT4) for n in names}
    plain, same = copy.deepcopy(model), copy.deepcopy(model)
    quantize_gptq(plain, GPTQConfig(scheme=INT4), ids)
    quantize_gptq(same, GPTQConfig(scheme=INT3, schemes={n: INT4 for n in names}), ids)
    for name, layer in quant_layers(plain).items():
        other = quant_layers(same)[name]
        assert torch.equal(layer.qdata, other.qdata) and torch.equal(layer.scale, other.scale)


def test_saved_mixed_model_reloads_each_layer_with_its_own_scheme_bit_for_bit(tiny_llama_dir, tiny_text, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    config = MixedConfig(target_bits=4.6, candidates=(INT3, INT4, INT8), method="gptq", sensitivity_samples=2)
    info = quantize_model(loaded, config, CalibrationSettings(text=str(tiny_text), samples=4, seq_len=64)).to_json()
    save_compressed(loaded, tmp_path / "out", report=info)
    back = load_model(str(tmp_path / "out"))
    before, after = quant_layers(loaded.model), quant_layers(back.model)
    assert set(before) == set(after)
    for name, layer in before.items():
        assert after[name].scheme == layer.scheme
        for tensor in ("qdata", "scale", "offset", "input_perm"):
            a, b = getattr(layer, tensor), getattr(after[name], tensor)
            assert (a is None and b is None) or torch.equal(a, b)
    ids = windows(n=1)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, back.model(ids).logits)
    meta = json.loads((tmp_path / "out" / "modelpress.json").read_text())
    assert {n: v["scheme"] for n, v in meta["report"]["mixed"]["layers"].items()} == \
        {n: m.scheme.spec for n, m in before.items()}


def test_cli_target_bits_end_to_end(tiny_llama_dir, tiny_text, tmp_path):
    out, report_file, eval_file = tmp_path / "q", tmp_path / "q.json", tmp_path / "e.json"
    assert main(["quantize", str(tiny_llama_dir), "--target-bits", "4.5", "--candidates", "int3/g32", "int4/g32",
                 "nf4/g32", "int8/channel", "--calib-text", str(tiny_text), "--calib-samples", "4",
                 "--calib-seq-len", "64", "--sensitivity-samples", "2", "--out", str(out),
                 "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["scheme"] == "mixed" and report["method"] == "rtn"
    mixed = report["mixed"]
    assert mixed["target_bits"] == 4.5 and mixed["achieved_bits_per_weight"] <= 4.5
    assert report["bits_per_weight"] == pytest.approx(mixed["achieved_bits_per_weight"])
    assert mixed["candidates"] == ["int3/g32", "int4/g32", "nf4/g32", "int8/channel"]
    assert len(mixed["layers"]) == 14 and mixed["sensitivity"]["windows"] == 2
    assert mixed["estimated_kl"] == pytest.approx(sum(v["estimated_kl"] for v in mixed["layers"].values()))
    assert main(["eval", str(out), "--text", str(tiny_text), "--windows", "2", "--seq-len", "64", "--no-speed",
                 "--json", str(eval_file)]) == 0
    result = json.loads(eval_file.read_text())
    assert result["bits_per_weight"] == pytest.approx(mixed["achieved_bits_per_weight"])


@pytest.mark.parametrize("extra, message", [
    (["--target-bits", "2.5"], "below the smallest candidate mix"),
    (["--target-bits", "4.5", "--candidates", "int4/g32", "int9/g32"], "bad candidate scheme 'int9/g32'"),
    (["--target-bits", "4.5", "--candidates", "int4/g32", "int4/g32"], "given twice"),
    (["--target-bits", "4.5", "--format", "int4"], "either --format"),
    ([], "either --format"),
    (["--target-bits", "4.5", "--group-size", "64"], "describe one --format"),
    (["--target-bits", "0"], "positive number of bits"),
    (["--target-bits", "4.5", "--method", "smoothquant"], "mixed precision works with methods"),
    (["--target-bits", "4.5", "--no-static-groups"], "applies to methods gptq and awq-gptq, not 'rtn'"),
])
def test_cli_errors_are_clear(tiny_llama_dir, tiny_text, tmp_path, capsys, extra, message):
    args = ["quantize", str(tiny_llama_dir), "--calib-text", str(tiny_text), "--calib-samples", "2",
            "--calib-seq-len", "32", "--sensitivity-samples", "1", "--out", str(tmp_path / "q"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_candidate_specs_parse_and_configs_validate():
    assert [s.spec for s in parse_candidates(["int4", "nf4/g32/dq"])] == ["int4/g128", "nf4/g32/dq"]
    with pytest.raises(ModelpressError, match="at least one candidate"):
        parse_candidates([])
    with pytest.raises(ModelpressError, match="must be a WeightScheme"):
        RTNConfig(scheme=INT4, schemes={"model.layers.0.mlp.up_proj": "int8/channel"})
    with pytest.raises(ModelpressError, match="applies to methods rtn, gptq, awq and awq-gptq"):
        config_for_method("smoothquant", INT8, schemes={"x": INT8})
