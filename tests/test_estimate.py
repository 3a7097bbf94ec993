"""The memory calculator: headline figures, scale overhead, KV cache formula, model shapes read without
loading weights (checked against the packed bytes a real quantize run produces), and the CLI."""

import json

import pytest
import torch
from conftest import build_tiny_llama, tiny_llama_config

from modelpress.algorithms.quantize.gptq import GPTQ
from modelpress.cli import main
from modelpress.errors import ModelpressError
from modelpress.estimate import (
    FORMAT_ROWS,
    GB,
    LinearShape,
    ModelShapes,
    estimate_all_weights,
    estimate_kv_cache,
    estimate_weights,
    kv_shape_from_config,
    parse_parameter_count,
)
from modelpress.formats import WeightScheme, quantize_weight
from modelpress.nn.layers import find_linear_layers, linear_weight


@pytest.mark.parametrize("text, count", [("7B", 7 * 10**9), ("13b", 13 * 10**9), ("70B", 70 * 10**9),
                                         ("135M", 135 * 10**6), ("1.5B", 1_500_000_000), ("7000000000", 7 * 10**9),
                                         ("7_000", 7000), ("7e9", 7 * 10**9), (" 360M ", 360 * 10**6)])
def test_parameter_counts(text, count):
    assert parse_parameter_count(text) == count


@pytest.mark.parametrize("text", ["", "seven", "7X", "-7B", "0", "0B", "7BB", "1.5.0B", "nan"])
def test_bad_parameter_counts(text):
    with pytest.raises(ModelpressError, match="parameter count"):
        parse_parameter_count(text)


def by_label(rows):
    return {r.label: r for r in rows}


@pytest.mark.parametrize("count, fp32, fp16, int8, four_bit", [("7B", 28, 14, 7, 3.5), ("13B", 52, 26, 13, 6.5)])
def test_headline_figures(count, fp32, fp16, int8, four_bit):
    rows = by_label(estimate_all_weights(parse_parameter_count(count)))
    assert rows["fp32"].total_bytes == fp32 * GB
    assert rows["fp16/bf16"].total_bytes == fp16 * GB
    assert rows["int8/channel"].weight_bytes == int8 * GB
    for label in ("int4/g128", "int4-asym/g128", "nf4/g64", "nf4/g64/dq"):
        assert rows[label].weight_bytes == four_bit * GB  # before overhead
    assert [r.label for r in estimate_all_weights(10**9)] == [label for label, _ in FORMAT_ROWS]


def test_int4_g128_overhead_is_one_32nd_of_the_4_bit_bytes():
    row = by_label(estimate_all_weights(7 * 10**9))["int4/g128"]
    assert row.overhead_bytes * 32 == row.weight_bytes
    assert row.bits_per_weight == 4.125
    dq = by_label(estimate_all_weights(7 * 10**9))["nf4/g64/dq"]
    assert dq.bits_per_weight == pytest.approx(4.127, abs=5e-4)


@pytest.mark.parametrize("spec", [fmt for _, fmt in FORMAT_ROWS if isinstance(fmt, str)])
@pytest.mark.parametrize("shape", [(192, 576), (160, 96), (64, 100)])
def test_model_shapes_count_exactly_what_quantize_stores(spec, shape):
    estimate = estimate_weights(spec, spec, parameters=shape[0] * shape[1], linear=[LinearShape(*shape)])
    packed = quantize_weight(torch.randn(*shape), WeightScheme.parse(spec))
    assert estimate.weight_bytes + estimate.overhead_bytes == packed.nbytes
    assert estimate.weight_bytes == packed.qdata.numel()
    assert estimate.float_bytes == 0


def test_tiny_llama_shapes_match_a_quantized_model():
    model = build_tiny_llama()
    layers = find_linear_layers(model)
    shapes = ModelShapes(parameters=sum(p.numel() for p in model.parameters()),
                         linear=tuple(LinearShape(*linear_weight(m).shape) for m in layers.values()))
    row = by_label(estimate_all_weights(shapes))["int4/g128"]
    packed_bytes = sum(quantize_weight(linear_weight(m).detach(), WeightScheme.parse("int4/g128")).nbytes
                       for m in layers.values())
    assert row.weight_bytes + row.overhead_bytes == packed_bytes
    rest = shapes.parameters - shapes.quantized_parameters  # embedding (tied head) and norms, as float16
    assert row.float_bytes == rest * 2
    assert by_label(estimate_all_weights(shapes))["fp32"].total_bytes == shapes.parameters * 4


def test_kv_cache_formula_on_the_tiny_llama_config():
    layers, kv_heads, head_dim = kv_shape_from_config(tiny_llama_config())
    assert (layers, kv_heads, head_dim) == (2, 2, 16)
    kv = estimate_kv_cache(layers, kv_heads, head_dim, context=100, batch=3, dtype="float16")
    assert kv.total_bytes == 2 * 2 * 2 * 16 * 100 * 3 * 2
    assert estimate_kv_cache(2, 2, 16, 100, 3, "float32").total_bytes == 2 * kv.total_bytes


def test_kv_cache_on_smollm2_numbers():
    config = tiny_llama_config(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                               hidden_size=576)
    shape = kv_shape_from_config(config)
    assert shape == (30, 3, 64)
    fp16 = estimate_kv_cache(*shape, context=4096, batch=1, dtype="float16")
    assert fp16.bytes_per_token == 23040 == 2 * 30 * 3 * 64 * 2
    assert fp16.total_bytes == 23040 * 4096
    assert estimate_kv_cache(*shape, dtype="bfloat16").total_bytes == fp16.total_bytes
    # quantized caches carry their scales: int8 = 8 + 16/64 bits, int4 = 4 + (16 + 16)/32 bits per element
    assert estimate_kv_cache(*shape, dtype="int8").bytes_per_token == 2 * 30 * 3 * 64 * (8 + 16 / 64) / 8
    assert estimate_kv_cache(*shape, dtype="fp8").bytes_per_token == 2 * 30 * 3 * 64 * (8 + 16 / 64) / 8
    assert estimate_kv_cache(*shape, dtype="int4").bytes_per_token == 2 * 30 * 3 * 64 * 5 / 8


def test_kv_cache_head_dim_from_hidden_size():
    config = tiny_llama_config(head_dim=None, hidden_size=96, num_attention_heads=6, num_key_value_heads=None)
    config.head_dim = None
    config.num_key_value_heads = None
    assert kv_shape_from_config(config) == (2, 6, 16)


def test_bad_kv_arguments():
    with pytest.raises(ModelpressError, match="unknown KV cache dtype 'int3'"):
        estimate_kv_cache(2, 2, 16, dtype="int3")
    with pytest.raises(ModelpressError, match="context must be a positive integer, got 0"):
        estimate_kv_cache(2, 2, 16, context=0)


# ---- the command -----------------------------------------------------------------------------------------

def test_cli_params_headline_and_json(tmp_path, capsys):
    out = tmp_path / "est.json"
    assert main(["estimate", "--params", "7B", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "28.00 GB" in text and "14.00 GB" in text and "7.00 GB" in text and "3.50 GB" in text
    assert "--layers, --kv-heads, --head-dim" in text  # KV cache not guessed
    data = json.loads(out.read_text())
    assert set(data) == {"source", "parameters", "formats", "kv_cache", "kv_cache_note", "calibration"}
    assert data["parameters"] == 7 * 10**9 and data["kv_cache"] is None and data["kv_cache_note"]
    assert data["calibration"] is None   # not asked for
    row = data["formats"][0]
    assert set(row) == {"format", "scheme", "quantized_parameters", "weight_bytes", "overhead_bytes", "float_bytes",
                        "total_bytes", "total_gb", "total_gib", "bits_per_weight"}
    assert [r["format"] for r in data["formats"]] == [label for label, _ in FORMAT_ROWS]
    assert data["formats"][1]["total_gb"] == 14.0


def test_cli_params_with_kv_shape(tmp_path, capsys):
    out = tmp_path / "kv.json"
    args = ["estimate", "--params", "135M", "--layers", "30", "--kv-heads", "3", "--head-dim", "64",
            "--context", "2048", "--batch", "2", "--kv-dtype", "int8", "--json", str(out)]
    assert main(args) == 0
    kv = json.loads(out.read_text())["kv_cache"]
    assert kv["total_bytes"] == 2 * 30 * 3 * 64 * 2048 * 2 * (8 + 16 / 64) / 8
    assert {"layers", "kv_heads", "head_dim", "context", "batch", "dtype", "bits_per_element", "bytes_per_token",
            "total_bytes", "total_gb", "total_gib"} <= set(kv)
    assert "KV cache (int8" in capsys.readouterr().out


def test_cli_model_directory(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["estimate", str(tiny_llama_dir), "--context", "256", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    model = build_tiny_llama()
    assert data["parameters"] == sum(p.numel() for p in model.parameters())
    assert data["kv_cache"]["total_bytes"] == 2 * 2 * 2 * 16 * 256 * 2
    quantized = sum(m.weight.numel() for m in find_linear_layers(model).values())
    assert data["formats"][4]["quantized_parameters"] == quantized
    assert "float rest" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--params", "lots"], "cannot read parameter count 'lots'"),
    (["--params", "7B", "--kv-dtype", "int3"], "unknown KV cache dtype 'int3'"),
    (["some/dir/that/is/not/there", "--params", "7B"], "give a MODEL or --params, not both"),
    (["--params", "7B", "--calibrate"], "--calibrate needs a MODEL's shapes"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_missing_model_directory(tmp_path, capsys):
    assert main(["estimate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_default_model_smollm2(tmp_path):
    out = tmp_path / "d.json"
    assert main(["estimate", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kv_cache"]["bytes_per_token"] == 23040
    assert data["kv_cache"]["total_bytes"] == 23040 * 4096
    assert 130e6 < data["parameters"] < 140e6


# --- the calibration estimate -------------------------------------------------------------------------------


def _shapes(model_factory):
    from modelpress.engine.blocks import find_blocks
    from modelpress.estimate import block_layout

    model = model_factory()
    return model, ModelShapes(sum(p.numel() for p in model.parameters()), block=block_layout(model_factory),
                              blocks=len(find_blocks(model)))


def test_the_traced_layout_is_the_engines_plan():
    """Input groups, levels and widths from the fake-tensor trace equal engine/plan.py's on the real model."""
    from modelpress.engine.blocks import find_blocks
    from modelpress.engine.capture import capture_inputs
    from modelpress.engine.plan import plan_block
    from modelpress.engine.targets import find_targets
    from modelpress.nn.layers import DEFAULT_SKIP

    model, shapes = _shapes(build_tiny_llama)
    stack = find_blocks(model)
    captured = capture_inputs(model, stack, torch.randint(0, 320, (2, 8)), torch.device("cpu"), 2)
    block = stack.blocks[0]
    plan = plan_block(block, find_targets(block, DEFAULT_SKIP), captured.hidden[0], captured.calls[0][0])
    expected = [(g.level, g.targets[0].weight.shape[1], sum(t.weight.shape[0] for t in g.targets)) for g in plan.groups]
    assert [(g.level, g.inputs, g.rows) for g in shapes.block.groups] == expected
    assert shapes.block.traced and shapes.block.hidden_size == 96 and shapes.blocks == 2
    assert shapes.block.parameters == sum(p.numel() for p in block.parameters())


def test_a_mixture_of_experts_falls_back_to_every_layer_alone():
    from transformers import MixtralConfig, MixtralForCausalLM

    from modelpress.engine.blocks import find_blocks
    from modelpress.engine.targets import find_targets
    from modelpress.nn.layers import DEFAULT_SKIP

    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model, shapes = _shapes(lambda: MixtralForCausalLM(config).eval())
    targets = find_targets(find_blocks(model).blocks[0], DEFAULT_SKIP)
    assert not shapes.block.traced   # routing is data-dependent: no fake-tensor trace
    assert len(shapes.block.groups) == len(targets.linears) + len(targets.experts)
    assert sum(not g.reference for g in shapes.block.groups) == len(targets.experts)   # experts: no float reference


class HeldGPTQ(GPTQ):
    """GPTQ that records the bytes of the statistics it holds each time a solve starts (every group of the
    level, or of the block, is held then)."""

    peak = 0

    def solve(self, group):
        held = sum(h.sum.numel() * h.sum.element_size() for h in (*self._hessians.values(), *self._drifts.values()))
        self.peak = max(self.peak, held)
        return super().solve(group)


@pytest.mark.parametrize("float_target", [True, False])
def test_statistics_and_hidden_states_are_what_the_engine_holds(float_target):
    from modelpress.algorithms.quantize.gptq import GPTQConfig
    from modelpress.engine.blocks import find_blocks
    from modelpress.engine.runner import EngineSettings, run_sequential
    from modelpress.estimate import estimate_calibration

    model, shapes = _shapes(build_tiny_llama)
    samples, seq_len = 6, 16
    estimate = estimate_calibration(shapes, "gptq", samples, seq_len, 2, float_target=float_target)
    config = GPTQConfig(WeightScheme.parse("int4/g32"), float_target=float_target)
    algorithm = HeldGPTQ(config, stack=find_blocks(model))
    run_sequential(model, algorithm, torch.randint(0, 320, (samples, seq_len)), settings=EngineSettings(batch_size=2))
    assert algorithm.peak == estimate.statistics_bytes
    stream = samples * seq_len * 96 * 4
    assert estimate.hidden_bytes == (3 if float_target else 2) * stream == estimate.streams * stream
    assert estimate.block_bytes == shapes.block.parameters * 4 * (2 if float_target else 1)
    offloaded = estimate_calibration(shapes, "gptq", samples, seq_len, 2, float_target=float_target, offload=True)
    assert offloaded.host_hidden_bytes == estimate.hidden_bytes and offloaded.hidden_bytes < estimate.hidden_bytes
    assert offloaded.device_bytes < estimate.device_bytes


def test_a_7b_shape_holds_what_the_formulas_say():
    """Llama-2-7B's block (4096 wide, 11008 MLP): the float target's largest level is down_proj's, two float64
    11008 x 11008 matrices; plain GPTQ holds the whole block's four Hessians at once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelpress.estimate import estimate_calibration

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=2,
                         vocab_size=32000)
    _, shapes = _shapes(lambda: LlamaForCausalLM(config))
    fitted = estimate_calibration(shapes, "gptq", 128, 2048, float_target=True)
    plain = estimate_calibration(shapes, "gptq", 128, 2048, float_target=False)
    assert fitted.statistics_bytes == 2 * 8 * 11008**2
    assert plain.statistics_bytes == 8 * (3 * 4096**2 + 11008**2)
    assert fitted.hidden_bytes == 3 * 128 * 2048 * 4096 * 4 and plain.hidden_bytes == 2 * 128 * 2048 * 4096 * 4
    assert fitted.block_bytes == 2 * 4 * 202_383_360


def test_cli_calibration_estimate(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["estimate", str(tiny_llama_dir), "--calibrate", "--calib-samples", "16", "--calib-seq-len", "64",
                 "--device-memory", "0.001", "--json", str(out)]) == 0
    data = json.loads(out.read_text())["calibration"]
    kept, off = data["kept"], data["offloaded"]
    assert kept["method"] == "gptq" and kept["float_target"] and kept["hidden_bytes"] == 3 * 16 * 64 * 96 * 4
    assert off["host_hidden_bytes"] == kept["hidden_bytes"] and off["device_bytes"] < kept["device_bytes"]
    assert data["verdict"]["engine_offloads"] and not data["verdict"]["fits"]
    printed = capsys.readouterr().out
    assert "calibration, gptq with its float target: 16 windows x 64 tokens" in printed
    assert "does not fit" in printed
    between = (kept["device_bytes"] + off["device_bytes"]) / 2 / 1e9   # fits only with the hidden states offloaded
    assert main(["estimate", str(tiny_llama_dir), "--calibrate", "--calib-samples", "16", "--calib-seq-len", "64",
                 "--device-memory", str(between), "--json", str(out)]) == 0
    verdict = json.loads(out.read_text())["calibration"]["verdict"]
    assert not verdict["engine_offloads"] and not verdict["fits"] and verdict["fits_offloaded"]
    assert "with --offload-hidden it fits" in capsys.readouterr().out
    assert main(["estimate", str(tiny_llama_dir), "--calibrate", "awq", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["calibration"]["kept"]["method"] == "awq"
