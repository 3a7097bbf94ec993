"""transformers' from_pretrained with the "modelpress" quantization method (modelpress/hf.py): a saved directory
loads as our packed layers, and a float checkpoint is quantized at load time; logits equal modelpress.load's."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_llama, save_tiny_llama
from transformers import AutoModelForCausalLM

import modelpress
from modelpress import GPTQ, RTN
from modelpress.errors import ModelpressError
from modelpress.nn.quant_linear import QuantLinear

IDS = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def packed_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if any(k.endswith(f".{n}") for n in ("qdata", "scale"))}


@pytest.mark.parametrize("spec", ["int4/g32", "nf4/g64/dq", "int3-asym/g32", "int8/channel"])
def test_from_pretrained_loads_a_saved_directory_as_packed_layers(tmp_path, spec):
    model = build_tiny_llama()
    modelpress.quantize(model, RTN(spec))
    modelpress.save(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelpress"

    modelpress.hf.register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    reference = modelpress.load(str(tmp_path / "q")).model
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    ours, theirs = packed_state(reference), packed_state(loaded)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:                                      # the stored bytes, dtype included (fp16 scales stay fp16)
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert torch.equal(logits(loaded), logits(reference))
    assert not hasattr(reference.config, "quantization_config")   # modelpress.load drops it: exports stay plain


def test_gptq_act_order_permutation_loads(tmp_path):
    model = build_tiny_llama()
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    modelpress.quantize(model, GPTQ("int4/g32", static_groups=False), calibration=ids)
    modelpress.save(model, tmp_path / "q")
    modelpress.hf.register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.model.layers[0].mlp.down_proj.input_perm is not None
    assert torch.equal(logits(loaded), logits(modelpress.load(str(tmp_path / "q")).model))


def test_quantization_config_quantizes_at_load_time(tmp_path):
    path = save_tiny_llama(tmp_path / "float")
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=modelpress.ModelpressConfig("nf4/g64"))
    reference = modelpress.load(str(path))
    modelpress.quantize(reference, RTN("nf4/g64"))
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.scheme.spec == "nf4/g64" for m in layers)
    assert not isinstance(loaded.lm_head, QuantLinear)                  # the output head stays float (skip)
    assert torch.equal(logits(loaded), logits(reference.model))
    # what transformers now holds, saved by modelpress and loaded back by transformers, is the same model
    modelpress.save(loaded, tmp_path / "again")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), logits(reference.model))


def test_config_needs_a_scheme_or_layers():
    with pytest.raises(ModelpressError, match="takes a scheme"):
        modelpress.ModelpressConfig()
    with pytest.raises(ModelpressError, match="int7"):
        modelpress.ModelpressConfig("int7/g32")


def test_import_modelpress_does_not_import_transformers():
    code = "import sys, modelpress; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
