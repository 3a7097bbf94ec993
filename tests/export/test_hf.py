"""`--to hf`: plain float HF directories that transformers loads by itself, holding what modelpress computes."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer
from safetensors.torch import load_file

from modelpress.algorithms.prune.magnitude import MagnitudeConfig, prune_magnitude
from modelpress.algorithms.prune.structure import Unit
from modelpress.algorithms.prune.structured import StructuredConfig, prune_structured, slice_unit
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.algorithms.quantize.smoothquant import SmoothQuantConfig, quantize_smoothquant
from modelpress.errors import ModelpressError
from modelpress.export import ExportOptions, export_model
from modelpress.export.measure import swapped_weights
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel
from modelpress.nn.cpu_backend import CPU_BACKEND
from modelpress.nn.dynamic import quantize_dynamic
from modelpress.nn.layers import replace_module
from modelpress.nn.quant_experts import QuantExperts
from modelpress.nn.sparse_linear import ResizedLinear
from modelpress.nn.w8a8_linear import W8A8Linear

INT4 = WeightScheme.parse("int4/g32")
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
ATOL_FP32 = 1e-5   # float32 export, same math in another process / module tree: summation order only


def export(model, out, dtype="float32", tokenizer=None):
    loaded = LoadedModel(model, tokenizer, source="tiny", float_source="tiny")
    return export_model(loaded, ["hf"], out, ExportOptions(hf_dtype=dtype))[0]


def logits(model, ids=IDS):
    with torch.no_grad(), CPU_BACKEND.disabled():   # dequantize-then-matmul: the export's own arithmetic
        return model(input_ids=ids).logits


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# Runs with modelpress made unimportable: the export must need nothing but transformers.
PLAIN_LOAD = """
import sys, torch
sys.modules["modelpress"] = None
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = torch.load(sys.argv[1])
out = {}
for name, folder in zip(("float32", "float16"), sys.argv[3:]):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        out[name] = model(input_ids=ids).logits
assert not any(m.startswith("modelpress") for m in sys.modules if sys.modules[m] is not None)
save_file(out, sys.argv[2])
"""


def test_int4_model_loads_in_plain_transformers_without_modelpress(tmp_path):
    model = build_tiny_llama(0)
    with torch.no_grad():   # float tensors already float16 values: only the int4 layers re-round in float16
        for p in model.parameters():
            p.copy_(p.half().float())
    quantize_rtn(model, RTNConfig(INT4))
    exact = export(model, tmp_path / "f32", "float32", char_tokenizer())
    half = export(model, tmp_path / "f16", "float16", char_tokenizer())
    torch.save(IDS, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", PLAIN_LOAD, tmp_path / "ids.pt", tmp_path / "logits.safetensors",
                          tmp_path / "f32" / "hf", tmp_path / "f16" / "hf"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = load_file(tmp_path / "logits.safetensors")
    ours = logits(model)
    assert exact.lossless and not exact.runtime_weights      # int4 x float16 scales: exact in float32
    torch.testing.assert_close(theirs["float32"], ours, rtol=0, atol=ATOL_FP32)
    # float16: exactly our model with the re-rounded weights the result reports swapped in
    assert half.runtime_weights and set(half.runtime_weights) == {n for n in (l.name for l in half.layers
                                                                             if not l.lossless)}
    with swapped_weights(model, half.runtime_weights):
        rounded = logits(model)
    torch.testing.assert_close(theirs["float16"], rounded, rtol=0, atol=ATOL_FP32)
    assert (theirs["float16"] - ours).abs().max() < 2e-3 * ours.abs().max()
    config = json.loads((tmp_path / "f16" / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    assert not any("modelpress" in f for f in half.files) and "tokenizer.json" in half.files


def test_lossless_flags_describe_the_float16_file(tmp_path):
    model = build_tiny_llama(0)
    # bfloat16 scales (8-bit significand) times int4 codes (|code| <= 8) fit float16's 11 bits: exact;
    # float16 scales times codes generally do not
    exact_layer = "model.layers.1.mlp.up_proj"
    quantize_rtn(model, RTNConfig(INT4, schemes={exact_layer: WeightScheme.parse("int4/g32/bfloat16")}))
    result = export(model, tmp_path / "out", "float16")
    stored = load_file(tmp_path / "out" / "hf" / "model.safetensors")
    layers = {layer.name: layer for layer in result.layers}
    exact = {}
    for name, module in model.named_modules():
        if hasattr(module, "dequantized_weight"):
            exact[name] = torch.equal(stored[f"{name}.weight"].float(), module.dequantized_weight(torch.float32))
            assert layers[name].lossless == exact[name]
            assert exact[name] or torch.equal(result.runtime_weights[name], stored[f"{name}.weight"].float())
            assert exact[name] or "max abs error" in layers[name].reason
    assert exact[exact_layer] and layers[exact_layer].source == "int4/g32/bfloat16"
    assert sum(exact.values()) == 1 and len(exact) == 14
    assert all(t.dtype == torch.float16 for t in stored.values())


def build_tiny_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128, tie_word_embeddings=False)
    return MixtralForCausalLM(config).eval()


def smoothquant(model):
    quantize_smoothquant(model, SmoothQuantConfig(), IDS, batch_size=2)
    # every group here has a producer to fold into; one layer keeps its factors itself, as a layer with none would
    attention = model.model.layers[0].self_attn
    float_layer = torch.nn.Linear(attention.o_proj.in_features, attention.o_proj.out_features, bias=False)
    smooth = torch.rand(attention.o_proj.in_features, generator=torch.Generator().manual_seed(0)) + 0.5
    attention.o_proj = W8A8Linear.from_linear(float_layer, SmoothQuantConfig().scheme, smooth=smooth)
    assert any(isinstance(m, W8A8Linear) and m.smooth is not None for m in model.modules())


def quant_experts(model):
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(experts, name).detach()
            replace_module(experts, name, QuantExperts([quantize_weight(p, INT4) for p in param]))
    QuantExperts.prepare_model(model)


KINDS = {
    "w8a8-smoothed": (build_tiny_llama, smoothquant),
    "dynamic-int8": (build_tiny_llama, lambda m: quantize_dynamic(m)),
    "sparse-2:4": (build_tiny_llama, lambda m: prune_magnitude(m, MagnitudeConfig(pattern="2:4"))),
    "quant-experts": (build_tiny_mixtral, quant_experts),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_layer_kind_becomes_the_architecture_own_module(tmp_path, kind):
    build, compress = KINDS[kind]
    model = build(seed=0)
    compress(model)
    result = export(model, tmp_path / "out")
    exported = load_hf(tmp_path / "out" / "hf")
    assert type(exported) is type(model)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in exported.modules())
    with swapped_weights(model, result.runtime_weights):
        ours = logits(model)
    torch.testing.assert_close(logits(exported), ours, rtol=0, atol=ATOL_FP32)
    activation_quantized = [layer for layer in result.layers if "int8 per token" in layer.reason]
    assert bool(activation_quantized) == (kind in ("w8a8-smoothed", "dynamic-int8"))
    assert all(layer.name in result.runtime_weights for layer in activation_quantized)


def test_uniformly_pruned_quantized_model_is_a_smaller_hf_model(tmp_path):
    model = build_tiny_llama(0)
    prune_structured(model, StructuredConfig("neurons", 0.25, multiple_of=8), IDS)   # tiny widths: 160 -> 120
    quantize_rtn(model, RTNConfig(INT4))
    export(model, tmp_path / "out")
    exported = load_hf(tmp_path / "out" / "hf")
    assert exported.config.intermediate_size == 120
    assert exported.model.layers[0].mlp.down_proj.weight.shape == (96, 120)
    torch.testing.assert_close(logits(exported), logits(model), rtol=0, atol=ATOL_FP32)


def cut(model, layer: int, unit: Unit, keep: torch.Tensor, groups: int | None = None) -> None:
    slice_unit(model.model.layers[layer], unit, keep, groups, plain=False)   # ResizedLinear: config unchanged


MLP = Unit("channels", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
ATTENTION = Unit("heads", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj")


def test_per_layer_widths_that_agree_are_written_into_the_config(tmp_path):
    model = build_tiny_llama(0)
    for layer, start in ((0, 0), (1, 32)):
        cut(model, layer, MLP, torch.arange(start, start + 128))
        cut(model, layer, ATTENTION, torch.tensor([layer]), groups=2)   # keep one key/value group of two
    assert isinstance(model.model.layers[1].mlp.down_proj, ResizedLinear)
    assert model.config.intermediate_size == 160   # the model's own config still says the old sizes
    result = export(model, tmp_path / "out")
    exported = load_hf(tmp_path / "out" / "hf")
    config = exported.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (128, 3, 1)
    assert config.head_dim == 16 and any("intermediate_size 160 -> 128" in note for note in result.notes)
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in build_tiny_llama(0).parameters())
    torch.testing.assert_close(logits(exported), logits(model), rtol=0, atol=ATOL_FP32)


def test_widths_that_differ_per_layer_are_refused(tmp_path):
    model = build_tiny_llama(0)
    cut(model, 0, MLP, torch.arange(128))
    cut(model, 1, MLP, torch.arange(96))
    with pytest.raises(ModelpressError, match=r"widths differ per layer \(intermediate_size: 96 in model.layers.1"
                                              r".*128 in model.layers.0"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ModelpressError, match="'float8'"):
        export(build_tiny_llama(0), tmp_path / "out", "float8")
