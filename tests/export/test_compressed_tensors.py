"""The compressed-tensors exporter, checked by its real consumers: compressed-tensors' own decompressor must give
back our dequantized weights bit for bit, and transformers must load the folder and compute our logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import build_tiny_llama, char_tokenizer
from modelpress.export import export_model
from modelpress.export.ct_layers import integer_zero_points, pack_int32
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel
from modelpress.nn.dynamic import DynamicInt8Linear
from modelpress.nn.layers import find_linear_layers, replace_module
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.sparse_linear import SparseLinear
from modelpress.nn.w8a8_linear import W8A8Linear

compressed_tensors = pytest.importorskip("compressed_tensors")
SHAPES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def tiny(intermediate: int = 512, seed: int = 0):
    """K = 256 and 512 (multiples of 128), or 576 for down_proj (a ragged last group of 64 under g128)."""
    return build_tiny_llama(seed, intermediate_size=intermediate, **SHAPES)


def quantize(model, make) -> LoadedModel:
    """Replace every linear layer but the head by make(name, linear)."""
    for name, linear in find_linear_layers(model).items():
        replace_module(model, name, make(name, linear))
    return LoadedModel(model, None, source="tiny", float_source="tiny")


def with_scheme(spec: str):
    scheme = WeightScheme.parse(spec)
    return lambda name, linear: QuantLinear(quantize_weight(linear.weight, scheme, name=name))


def export(loaded: LoadedModel, tmp_path, windows: torch.Tensor | None = None):
    result = export_model(loaded, ["compressed-tensors"], tmp_path / "out", windows=windows)[0]
    return result, tmp_path / "out" / "compressed-tensors"


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(seed))


def kl(ours, theirs, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        p = F.log_softmax(ours(tokens).logits.float(), -1)
        q = F.log_softmax(theirs(tokens).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def load_hf(folder, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def ct_decompress(folder, name: str) -> torch.Tensor:
    """compressed-tensors' own decompressor on one layer's tensors, with the scheme config.json gives it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = {k.removeprefix(f"{name}."): v for k, v in load_file(str(folder / "model.safetensors")).items()
               if k.rpartition(".")[0] == name}
    group = next(g for g in config["config_groups"].values() if name in g["targets"] or g["targets"] == ["Linear"])
    scheme = QuantizationScheme(**group)
    return BaseCompressor.get_value_from_registry(group["format"]).decompress(tensors, scheme)["weight"]


# ---- the packing itself --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [64, 100, 576])
def test_packing_is_compressed_tensors_packing(bits, k):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    half = 2 ** (bits - 1)
    q = torch.randint(-half, half, (5, k), generator=torch.Generator().manual_seed(bits * k), dtype=torch.int8)
    ours = pack_int32((q.to(torch.int16) + half).to(torch.uint8), bits)
    assert torch.equal(ours, pack_to_int32(q, bits))


# ---- lossless layers: bit for bit through compressed-tensors' decompressor, and through transformers ----

LOSSLESS = ["int4/g128", "int8/channel", "int3/g128", "int2/g64", "ternary/g64", "fp8-e4m3/channel",
            "int4/g128/dq", "int4/g128/bfloat16", "int8/g128"]


@pytest.mark.parametrize("spec", LOSSLESS)
def test_lossless_layers_decompress_bit_for_bit(spec, tmp_path):
    loaded = quantize(tiny(intermediate=576), with_scheme(spec))
    result, folder = export(loaded, tmp_path)
    assert result.lossless and not result.runtime_weights
    for name, module in find_linear_layers(loaded.model).items():
        theirs = ct_decompress(folder, name)
        assert torch.equal(theirs, module.packed.dequantize(theirs.dtype)), name


@pytest.mark.parametrize("spec,intermediate", [("int4/g128", 512), ("int4/g128", 576), ("int8/channel", 512)])
def test_transformers_computes_our_logits(spec, intermediate, tmp_path):
    loaded = quantize(tiny(intermediate), with_scheme(spec))
    result, folder = export(loaded, tmp_path)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    assert kl(loaded.model, load_hf(folder), ids()) <= 1e-4
    if spec == "int4/g128" and intermediate == 512:   # codes plus one fp16 scale per 128 weights, nothing else
        assert result.linear_bits_per_weight == pytest.approx(4 + 16 / 128)


def test_ragged_rows_become_smaller_groups(tmp_path):
    loaded = quantize(tiny(576), with_scheme("int4/g128"))
    result, folder = export(loaded, tmp_path)
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    sizes = {g["weights"]["group_size"]: g["targets"] for g in groups.values()}
    assert sizes[64] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"] and 128 in sizes
    assert result.lossless and any("rows the group size does not divide" in note for note in result.notes)
    # the ragged layers pay one more fp16 scale per 128 weights: 16 / 64 instead of 16 / 128 bits
    assert result.linear_bits_per_weight > 4 + 16 / 128


# ---- W8A8 and 2:4 ----------------------------------------------------------------------------------------

def int8_scheme() -> WeightScheme:
    return WeightScheme.parse("int8/channel")


def prune_24(model) -> None:
    """Zero the two smallest of every 4 weights along each row of every linear layer but the head."""
    for linear in find_linear_layers(model).values():
        w = linear.weight.data
        groups = w.reshape(w.shape[0], -1, 4)
        keep = groups.abs().argsort(-1)[..., 2:]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        linear.weight.data = (groups * mask).reshape(w.shape)


def test_w8a8_is_int_quantized_with_dynamic_token_activations(tmp_path):
    loaded = quantize(tiny(), lambda name, linear: DynamicInt8Linear.from_linear(linear, int8_scheme()))
    result, folder = export(loaded, tmp_path)
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "int-quantized" and group["targets"] == ["Linear"]
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    assert result.lossless and result.linear_bits_per_weight == pytest.approx(8 + 16 / 256, rel=0.05)
    assert kl(loaded.model, load_hf(folder), ids()) <= 1e-4


def test_fp8_dynamic_is_float_quantized_with_dynamic_fp8_token_activations(tmp_path):
    from modelpress.nn.dynamic_fp8 import DynamicFp8Linear

    loaded = quantize(tiny(intermediate=576), lambda name, linear: DynamicFp8Linear.from_linear(linear))
    result, folder = export(loaded, tmp_path)
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert group["input_activations"] == {**group["input_activations"], "dynamic": True, "num_bits": 8,
                                          "strategy": "token", "type": "float"}
    assert result.lossless and any("FP8 dynamic" in note for note in result.notes)
    for name, module in find_linear_layers(loaded.model).items():
        theirs = ct_decompress(folder, name)
        assert torch.equal(theirs, module.packed.dequantize(theirs.dtype)), name
    # transformers quantizes the activations per token as we do (1e-6 here; weight-only fp8 would be 1e-4 away)
    assert kl(loaded.model, load_hf(folder), ids()) <= 1e-5


def test_w8a8_24_sparse_carries_sparsity_config(tmp_path):
    model = tiny()
    prune_24(model)
    names = sorted(find_linear_layers(model))
    loaded = quantize(model, lambda name, linear: DynamicInt8Linear.from_linear(linear, int8_scheme()))
    result, folder = export(loaded, tmp_path)
    sparsity = json.loads((folder / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    assert sorted(sparsity["targets"]) == names
    assert sparsity["global_sparsity"] >= 0.5
    assert kl(loaded.model, load_hf(folder), ids()) <= 1e-4


def test_float_24_sparse_layers_stay_float_and_exact(tmp_path):
    model = tiny()
    prune_24(model)

    def make(name, linear):   # one int8 layer, so that the file is a quantized checkpoint at all
        if name == "model.layers.0.self_attn.q_proj":
            return with_scheme("int8/channel")(name, linear)
        return SparseLinear.from_dense(linear.weight, linear.weight != 0, pattern=(2, 4))

    names = sorted(find_linear_layers(model))
    loaded = quantize(model, make)
    result, folder = export(loaded, tmp_path)
    sparsity = json.loads((folder / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sorted(sparsity["targets"]) == names
    assert result.lossless
    assert kl(loaded.model, load_hf(folder), ids()) <= 1e-4


# ---- re-rounded layers: reported, measured ---------------------------------------------------------------

def test_in_layer_smoothquant_factors_are_folded_and_reported(tmp_path):
    torch.manual_seed(1)

    def make(name, linear):
        smooth = torch.rand(linear.in_features) + 0.5
        return W8A8Linear.from_linear(linear, int8_scheme(), smooth=smooth) if "o_proj" in name else \
            DynamicInt8Linear.from_linear(linear, int8_scheme())

    loaded = quantize(tiny(), make)
    result, folder = export(loaded, tmp_path, windows=ids(1))
    folded = [layer for layer in result.layers if not layer.lossless]
    assert [layer.name for layer in folded] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert "SmoothQuant" in folded[0].reason and result.kl_divergence > 0
    assert kl(loaded.model, load_hf(folder), ids()) <= 1e-3


def test_asymmetric_float_offsets_are_re_rounded_to_integer_zero_points(tmp_path):
    loaded = quantize(tiny(), with_scheme("int4-asym/g128"))
    result, folder = export(loaded, tmp_path, windows=ids(1))
    assert not result.lossless and all("zero points" in layer.reason for layer in result.layers)
    assert result.kl_divergence > 0
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(ct_decompress(folder, name).float(), result.runtime_weights[name])
    theirs = load_hf(folder, dequantize=True)   # transformers 5.23 loads zero points only dequantized
    assert torch.equal(theirs.get_submodule(name).weight, result.runtime_weights[name])


def test_asymmetric_layers_of_different_row_lengths_share_one_group_size_and_load(tmp_path):
    # down_proj's K = 576 makes its own groups 64 wide, the others' 128: transformers decompresses asymmetric
    # checkpoints with one config group's arguments, so every asymmetric layer is written with groups of 64
    loaded = quantize(tiny(intermediate=576), with_scheme("int4-asym/g128"))
    result, folder = export(loaded, tmp_path, windows=ids(1))
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in config["config_groups"].values()] == [64]
    theirs = load_hf(folder, dequantize=True)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        assert torch.equal(ct_decompress(folder, name).float(), result.runtime_weights[name])
        assert torch.equal(theirs.get_submodule(name).weight, result.runtime_weights[name])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_integer_zero_point_schemes_export_losslessly(method, tmp_path):
    scheme = WeightScheme.parse("int4-asym/g128/zp")
    if method == "rtn":
        make = with_scheme("int4-asym/g128/zp")
    else:   # GPTQ's ranges go through the same storage rule, so its solution sits on an integer-zero grid too
        from modelpress.algorithms.quantize.gptq import gptq_quantize

        def make(name, linear):
            x = torch.randn(512, linear.in_features, generator=torch.Generator().manual_seed(5))
            return QuantLinear(gptq_quantize(linear.weight.detach().float(), x.T @ x / 512, scheme))
    loaded = quantize(tiny(), make)
    result, folder = export(loaded, tmp_path)
    assert result.lossless and not result.runtime_weights
    name = "model.layers.0.mlp.up_proj"
    exact = loaded.model.get_submodule(name).packed.dequantize()
    assert torch.equal(ct_decompress(folder, name).float(), exact)
    assert kl(loaded.model, load_hf(folder, dequantize=True), ids()) <= 1e-6


def test_integer_offsets_are_exact_zero_points():
    w = torch.randn(8, 256)
    p = quantize_weight(w, WeightScheme.parse("int4-asym/g128"))
    z = torch.randint(-8, 8, p.scale.shape).to(p.scale.dtype)
    p.scale = 2.0 ** torch.randint(-8, -4, p.scale.shape).to(p.scale.dtype)   # so that offsets are exact in fp16
    p.offset = -(z + 8) * p.scale   # w = scale·(u − 8 − z): an integer zero point
    q, scale, zero, exact = integer_zero_points(p)
    assert exact and torch.equal(zero.to(z.dtype), z)
    assert torch.equal((q.float() - zero.float().repeat_interleave(128, 1)) * scale.repeat_interleave(128, 1),
                       p.dequantize())


def test_act_order_groups_are_re_rounded_channels_are_not(tmp_path):
    def make(name, linear):
        perm = torch.randperm(linear.in_features, generator=torch.Generator().manual_seed(3))
        spec = "int8/channel" if "mlp" in name else "int4/g128"
        return QuantLinear(quantize_weight(linear.weight, WeightScheme.parse(spec), input_perm=perm))

    loaded = quantize(tiny(), make)
    result, folder = export(loaded, tmp_path, windows=ids(1))
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name["model.layers.0.mlp.up_proj"].lossless
    assert not by_name["model.layers.0.self_attn.q_proj"].lossless
    assert "g_idx" in by_name["model.layers.0.self_attn.q_proj"].reason and result.kl_divergence > 0
    exact = loaded.model.get_submodule("model.layers.0.mlp.up_proj").packed.dequantize(torch.float16)
    assert torch.equal(ct_decompress(folder, "model.layers.0.mlp.up_proj"), exact)


def test_nf4_is_re_rounded_to_int4(tmp_path):
    loaded = quantize(tiny(), with_scheme("nf4/g64"))
    result, folder = export(loaded, tmp_path, windows=ids(1))
    assert not result.lossless and "re-rounded to int4/g64" in result.layers[0].reason
    assert 0 < result.kl_divergence
    assert kl(loaded.model, load_hf(folder), ids()) == pytest.approx(result.kl_divergence, rel=1.0)


# ---- the command line ------------------------------------------------------------------------------------

def test_cli_export_then_eval_against_the_float_source(tmp_path):
    from modelpress.cli import main
    from modelpress.io.save import save_compressed

    model = tiny()
    float_dir = tmp_path / "float"
    model.save_pretrained(float_dir)
    char_tokenizer().save_pretrained(float_dir)
    loaded = quantize(tiny(), with_scheme("int4/g128"))
    loaded = LoadedModel(loaded.model, char_tokenizer(), source="q", float_source=str(float_dir))
    save_compressed(loaded, tmp_path / "q")
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "q"), "--to", "compressed-tensors", "--out", str(out),
                 "--measure-windows", "1", "--seq-len", "64"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["targets"][0]["lossless"] and report["targets"][0]["target"] == "compressed-tensors"

    from modelpress.api import default_reference
    from modelpress.io.model import load_model

    exported = load_model(str(out / "compressed-tensors"))
    assert default_reference(exported) == str(float_dir.resolve())
    assert kl(loaded.model, exported.model, ids()) <= 1e-4
