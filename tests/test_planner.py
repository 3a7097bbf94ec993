"""The planner (modelpress/planner): its forecast against the real run on a tiny model (bytes exact), budgets met,
only formats the runtime holds exactly (checked by exporting), the recipe it writes, and the command."""

import functools
import json

import pytest
import torch
import yaml
from conftest import build_tiny_llama, char_tokenizer, save_tiny_llama

import modelpress
from modelpress.errors import ModelpressError
from modelpress.eval.size import measure_size
from modelpress.planner import Budget, apply_plan, plan_model
from modelpress.planner.runtimes import RUNTIMES

IDS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))


@functools.cache
def cached_plan(budget, runtime, method="auto"):
    """Plans are pure results (frozen): tests share them, and each applies one to a fresh model."""
    return plan_model(build_tiny_llama(), budget, runtime, method, calibration=IDS)


def planned_and_run(budget, runtime, method="auto"):
    model = build_tiny_llama()
    plan = cached_plan(budget, runtime, method)
    report = apply_plan(model, plan, calibration=IDS)
    return model, plan, report


def exported_exactly(tmp_path, model, runtime) -> bool:
    """Every quantized layer goes through the runtime's exporter without re-rounding: for GGUF the blocks the
    exporter writes decode to our weight bit for bit; compressed-tensors says so per layer in its result."""
    from modelpress.export import gguf_blocks
    from modelpress.export.base import ExportOptions
    from modelpress.export.gguf import compressed_tensor
    from modelpress.nn.quant_linear import QuantLinear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if runtime == "llamacpp":
        for name, module in layers.items():
            tensor, layer, _ = compressed_tensor(name, module, ExportOptions())
            decoded = gguf_blocks.decode(tensor.data, gguf_blocks.Q[layer.target], module.packed.shape)
            if not (layer.lossless and torch.equal(decoded.float(), module.dequantized_weight())):
                return False
        return True
    modelpress.save(model, tmp_path / "q", tokenizer=char_tokenizer())
    result = modelpress.export(modelpress.load(str(tmp_path / "q")), ["compressed-tensors"], tmp_path / "export")[0]
    return all(layer.lossless for layer in result.layers if layer.name in layers) and len(layers) == 14


@pytest.mark.parametrize("runtime", ["llamacpp", "transformers"])
def test_forecast_bytes_are_exact_and_the_runtime_holds_every_layer(tmp_path, runtime):
    model, plan, report = planned_and_run(Budget(max_bits=5.2), runtime)
    assert plan.method == "rtn" and report.layers == len(plan.schemes) == 14
    assert set(plan.schemes.values()) <= set(RUNTIMES[runtime].candidates)
    assert len(set(plan.schemes.values())) > 1                          # really mixed at this budget
    size = measure_size(model)
    assert size.weight_bytes == plan.forecast.weight_bytes
    assert 8 * size.quantized_weight_bytes / size.quantized_parameters == pytest.approx(plan.forecast.bits_per_weight)
    assert plan.forecast.bits_per_weight <= 5.2
    installed = {name: m.scheme.spec for name, m in model.named_modules() if hasattr(m, "scheme")}
    assert installed == plan.schemes
    assert exported_exactly(tmp_path, model, runtime)


def test_gb_budget_counts_the_float_rest():
    model, plan, _ = planned_and_run(Budget(max_gb=0.0002), "modelpress")
    assert measure_size(model).weight_bytes == plan.forecast.weight_bytes <= 0.0002e9
    with pytest.raises(ModelpressError, match="below the smallest mix"):
        plan_model(build_tiny_llama(), Budget(max_gb=0.00001), "modelpress", calibration=IDS)


def test_kl_budget_is_met_on_the_measured_kl():
    smallest = cached_plan(Budget(max_kl=10.0), "llamacpp")          # any mix meets it: the cheapest one
    assert set(smallest.schemes.values()) == {"int4/g32"}
    bound = smallest.forecast.kl_divergence / 3
    tight = cached_plan(Budget(max_kl=bound), "llamacpp")
    assert tight.forecast.kl_divergence <= bound < smallest.forecast.kl_divergence
    assert tight.forecast.weight_bytes > smallest.forecast.weight_bytes


def test_forecast_kl_is_the_run_measured_on_the_sensitivity_windows():
    from modelpress.eval.quality import evaluate_quality

    model, plan, _ = planned_and_run(Budget(max_bits=5.2), "llamacpp")
    reference = build_tiny_llama()
    with torch.no_grad():
        real = evaluate_quality({"q": model}, IDS, reference=reference)["q"].kl_divergence
    assert plan.forecast.kl_divergence == pytest.approx(real, rel=1e-4)
    check = plan.sensitivity["kl_check"]
    assert check["ratio"] == pytest.approx(check["measured_rtn"] / check["fisher_estimate"])
    # the float layers are back in the planned model: planning changes nothing
    planned_on = build_tiny_llama()
    plan_model(planned_on, Budget(max_bits=5.2), "llamacpp", calibration=IDS[:1])
    assert all(torch.equal(a, b) for a, b in zip(planned_on.state_dict().values(), reference.state_dict().values()))


def test_gptq_plan_runs_with_the_same_bytes():
    model, plan, report = planned_and_run(Budget(max_bits=5.2), "llamacpp", method="gptq")
    assert report.method == "gptq" and "upper bound" in plan.forecast.kl_basis
    assert measure_size(model).weight_bytes == plan.forecast.weight_bytes
    assert plan.forecast.seconds > 0 and plan.forecast.peak_memory_bytes > 0


def test_recipe_builds_the_same_config(tmp_path):
    from modelpress.algorithms.quantize import config_for_method
    from modelpress.formats.scheme import WeightScheme

    plan = cached_plan(Budget(max_bits=5.2), "llamacpp")
    recipe = yaml.safe_load(plan.write_recipe(tmp_path / "plan.yaml").read_text())
    assert [next(iter(stage)) for stage in recipe["stages"]] == ["quantize", "export"]
    fields = dict(recipe["stages"][0]["quantize"])
    method, scheme = fields.pop("method"), fields.pop("scheme")
    fields["schemes"] = {name: WeightScheme.parse(spec) for name, spec in fields["schemes"].items()}
    config = config_for_method(method, scheme, **{**fields, "skip": tuple(fields["skip"])})
    assert config == plan.config()
    model = build_tiny_llama()
    modelpress.quantize(model, config)
    assert measure_size(model).weight_bytes == plan.forecast.weight_bytes


def test_plan_command(tmp_path, tiny_text):
    from modelpress.cli import main

    path = save_tiny_llama(tmp_path / "tiny")
    code = main(["plan", str(path), "--max-bits", "5", "--runtime", "llamacpp", "--calib-text", str(tiny_text),
                 "--calib-samples", "4", "--calib-seq-len", "64", "--json", str(tmp_path / "plan.json"),
                 "--write-recipe", str(tmp_path / "plan.yaml")])
    assert code == 0
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["forecast"]["bits_per_weight"] <= 5 and len(saved["schemes"]) == 14
    assert (tmp_path / "plan.yaml").read_text().startswith("# modelpress plan for llamacpp")
    with pytest.raises(SystemExit):                              # two budgets: argparse refuses
        main(["plan", str(path), "--max-bits", "5", "--max-kl", "0.1"])


def test_budget_needs_exactly_one_bound():
    with pytest.raises(ModelpressError, match="exactly one"):
        Budget(max_gb=1.0, max_kl=0.1)
    with pytest.raises(ModelpressError, match="positive"):
        Budget(max_bits=-1)
    with pytest.raises(ModelpressError, match="unknown runtime"):
        plan_model(build_tiny_llama(), Budget(max_bits=4), "vllm", calibration=IDS)


def test_the_memory_baseline_counts_mapped_weight_files_whole(tmp_path):
    # a safetensors file is mapped lazily: its pages become resident only as weights are read, which a
    # quantizer does for every weight, so the forecast's baseline counts the mapping whole from the start
    from safetensors.torch import load_file, save_file

    from modelpress.planner.forecast import mapped_weight_file_bytes, resident_bytes

    save_file({"w": torch.randn(1024, 1024)}, tmp_path / "w.safetensors")
    before_mapped, before = mapped_weight_file_bytes(), resident_bytes()
    tensors = load_file(tmp_path / "w.safetensors")
    assert mapped_weight_file_bytes() - before_mapped >= 4 * 2**20
    assert resident_bytes() - before >= 4 * 2**20 - 2**20   # counted before a single page is read
    assert tensors["w"].shape == (1024, 1024)
