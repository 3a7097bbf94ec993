"""`--to peft`: our LoRA adapters in PEFT's layout, loaded by PEFT onto the base they were trained on."""

import json

import pytest
import torch
from conftest import build_tiny_llama, save_tiny_llama
from safetensors.torch import load_file

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.cli import main
from modelpress.errors import ModelpressError
from modelpress.export import ExportOptions, export_model
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, load_model
from modelpress.nn.cpu_backend import CPU_BACKEND
from modelpress.train.lora import ADAPTERS_FILE, LoRAConfig, add_lora, load_adapters, lora_layers

IDS = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
ATOL_FP32 = 1e-5   # float32 base and adapters: the same products, summed in another order
FAST = ("--steps", "2", "--seq-len", "32", "--train-windows", "4", "--lr", "1e-3")


def logits(model):
    with torch.no_grad(), CPU_BACKEND.disabled():
        return model(input_ids=IDS).logits


def with_adapters(model, seed=1):
    adapters = add_lora(model, LoRAConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_b.normal_(0, 0.05, generator=g)
    return adapters


def load_peft(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def test_qlora_adapters_load_in_peft_on_their_dequantized_base(tmp_path):
    model = build_tiny_llama(0)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    adapters = with_adapters(model)
    loaded = LoadedModel(model, None, source="tiny-int4", float_source="tiny")
    result, merged = export_model(loaded, ["peft", "hf"], tmp_path / "out", ExportOptions(hf_dtype="float32"))
    folder = tmp_path / "out" / "peft"
    assert len(lora_layers(model)) == 14   # the exporter leaves the model as it was
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, "base")
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tensors = load_file(folder / "adapter_model.safetensors")
    name = "model.layers.1.self_attn.k_proj"
    assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (4, 96)
    assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], adapters[name].lora_b.detach())
    assert len(tensors) == 28 and result.lossless
    assert any("quantized base (int4/g32)" in note for note in result.notes)
    peft_model = load_peft(folder / "base", folder)
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=ATOL_FP32)
    # --to hf of the same model merges the adapters into the dequantized base in float32
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf", dtype=torch.float32)
    torch.testing.assert_close(logits(hf_model), logits(model), rtol=0, atol=ATOL_FP32)
    assert any("14 LoRA adapters merged" in note for note in merged.notes)
    # the base is the quantized model without its adapters, not the float model
    base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
    weight = base.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(weight, adapters[name].base.dequantized_weight(torch.float32))


def test_adapters_on_an_unchanged_float_model_point_at_it(tmp_path):
    source = save_tiny_llama(tmp_path / "tiny")
    loaded = load_model(str(source))
    with_adapters(loaded.model)
    result = export_model(loaded, ["peft"], tmp_path / "out")[0]
    folder = tmp_path / "out" / "peft"
    assert not (folder / "base").exists() and sorted(result.files) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(source)
    peft_model = load_peft(source, folder)
    torch.testing.assert_close(logits(peft_model), logits(loaded.model), rtol=0, atol=ATOL_FP32)


def test_cli_exports_the_adapters_saved_by_finetune(tmp_path, tiny_text):
    saved, out = tmp_path / "lora", tmp_path / "exported"
    assert main(["finetune", str(save_tiny_llama(tmp_path / "m")), "--lora", "--quantize", "int4/g32", "--rank", "4",
                 "--merge", "none", "--text", str(tiny_text), *FAST, "--out", str(saved)]) == 0
    assert main(["export", str(saved), "--to", "peft", "--out", str(out), "--hf-dtype", "float32",
                 "--measure-windows", "0"]) == 0
    ours = load_model(str(saved))
    load_adapters(ours.model, saved / ADAPTERS_FILE)
    peft_model = load_peft(out / "peft" / "base", out / "peft")
    torch.testing.assert_close(logits(peft_model), logits(ours.model), rtol=0, atol=ATOL_FP32)
    assert json.loads((out / "export.json").read_text())["targets"][0]["target"] == "peft"
    # adapters already merged into a saved model have lost their base: refused
    meta = json.loads((saved / "modelpress.json").read_text())
    meta["report"]["merge"] = "rtn"
    (saved / "modelpress.json").write_text(json.dumps(meta))
    with pytest.raises(ModelpressError, match="merged into the saved model"):
        export_model(load_model(str(saved)), ["peft"], tmp_path / "again")


def test_a_model_without_adapters_is_refused(tmp_path):
    loaded = LoadedModel(build_tiny_llama(0), None, source="tiny", float_source="tiny")
    with pytest.raises(ModelpressError, match="no LoRA adapters"):
        export_model(loaded, ["peft"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_float16_base_is_measured_with_the_adapters_on(tmp_path):
    model = build_tiny_llama(0)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    adapters = with_adapters(model)
    loaded = LoadedModel(model, None, source="tiny-int4", float_source="tiny")
    result = export_model(loaded, ["peft"], tmp_path / "out", windows=IDS)[0]
    assert not result.lossless
    # every adapted layer is swapped below its adapter, so the adapter stays in the measurement
    assert set(result.runtime_weights) == {f"{name}.base" for name in adapters} | {"lm_head"}
    assert 0 < result.kl_divergence < 1e-3
    assert len(lora_layers(model)) == 14
