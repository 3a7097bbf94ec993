"""GGUF export: blocks bit for bit against our packed weights (gguf-py's decoder as the independent reader),
names, RoPE row order, tokenizer keys, re-rounding reported, and llama.cpp's own logits when it is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from modelpress.errors import ModelpressError
from modelpress.export import ExportOptions, export_model, llamacpp
from modelpress.export.gguf import GGUF_FILE
from modelpress.export.gguf_arch import permute_rows
from modelpress.export.gguf_blocks import encode_lossless, lossless_type
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, default_gguf_path, gguf_float_cache
from modelpress.nn.layers import find_linear_layers, linear_weight, replace_module
from modelpress.nn.quant_linear import QuantLinear

Q = GGMLQuantizationType


@pytest.mark.parametrize("spec,qtype", [("int4/g32", Q.Q4_0), ("int4/g128", Q.Q4_0), ("int4-asym/g32", Q.Q4_1),
                                        ("int4-asym/g64", Q.Q4_1), ("int8/channel", Q.Q8_0), ("int8/g32", Q.Q8_0),
                                        ("int5/g32", Q.Q5_0), ("int5-asym/g64", Q.Q5_1), ("int4/tensor", Q.Q4_0)])
def test_lossless_blocks_decode_to_our_weight(spec, qtype):
    weight = torch.randn(24, 320, generator=torch.Generator().manual_seed(1)) * 0.05
    weight[3, 7] = 0.9  # an outlier: its group's scale differs from the rest
    packed = quantize_weight(weight, WeightScheme.parse(spec))
    found, reason = lossless_type(packed)
    assert found == qtype, reason
    blocks = encode_lossless(packed, qtype)
    decoded = np.asarray(gguf_quants.dequantize(blocks, qtype), dtype=np.float32).reshape(packed.shape)
    assert torch.equal(torch.from_numpy(decoded), packed.dequantize())


@pytest.mark.parametrize("spec,why", [("nf4/g64", "no GGML block type"), ("int4/g16", "not whole blocks"),
                                      ("int4/g64/dq", "double-quantized"), ("int3/g128", "no GGML block type")])
def test_schemes_without_a_block_type_say_why(spec, why):
    packed = quantize_weight(torch.randn(8, 256), WeightScheme.parse(spec))
    assert lossless_type(packed)[0] is None
    assert why in lossless_type(packed)[1]


def test_act_order_permutation_is_not_lossless():
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    packed = quantize_weight(torch.randn(8, 128), WeightScheme.parse("int4/g32"), input_perm=perm)
    assert lossless_type(packed)[0] is None and "activation order" in lossless_type(packed)[1]


def test_rope_permutation_is_llama_cpp_row_order():
    # head dim 8: llama.cpp wants (x0, x4), (x1, x5), ... of each head as adjacent rows
    order = permute_rows(16, 2)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_float_cache(default_gguf_path()))


def tiny(model_type: str, tokenizer, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=True,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model, tokenizer, source=f"tiny-{model_type}", float_source=f"tiny-{model_type}")


def quantize_all(loaded: LoadedModel, spec: str, perm: bool = False) -> None:
    scheme = WeightScheme.parse(spec)
    for name, module in find_linear_layers(loaded.model).items():
        weight = linear_weight(module).detach()
        input_perm = torch.randperm(weight.shape[1]) if perm else None
        packed = quantize_weight(weight, scheme, input_perm=input_perm)
        replace_module(loaded.model, name, QuantLinear(packed, module.bias))


def gguf_weights(path) -> dict[str, torch.Tensor]:
    reader = GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = np.asarray(gguf_quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), dtype=np.float32)
        out[tensor.name] = torch.from_numpy(values.reshape(shape))
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tiny_model_exports_losslessly_with_names_order_and_tokenizer(model_type, bpe_tokenizer, tmp_path):
    loaded = tiny(model_type, bpe_tokenizer)
    quantize_all(loaded, "int4/g32")
    float16 = export_model(loaded, ["gguf"], tmp_path / "f16")[0]  # a float32 embedding rounds in F16: said so
    assert [layer.name for layer in float16.layers if not layer.lossless] == ["model.embed_tokens"]
    assert set(float16.runtime_weights) == {"model.embed_tokens", "lm_head"}  # the tied head computes with it too
    result = export_model(loaded, ["gguf"], tmp_path / "out", ExportOptions(gguf_float_type="F32"))[0]
    assert result.lossless and not result.runtime_weights
    assert result.linear_bits_per_weight == pytest.approx(4.5)
    path = tmp_path / "out" / "gguf" / GGUF_FILE
    weights = gguf_weights(path)
    config = loaded.model.config
    for layer in range(2):
        attn = loaded.model.model.layers[layer].self_attn
        q, k = attn.q_proj.dequantized_weight(), attn.k_proj.dequantized_weight()
        if model_type == "llama":
            q, k = q[permute_rows(q.shape[0], config.num_attention_heads)], k[permute_rows(k.shape[0], 2)]
        else:  # Qwen2: NEOX RoPE, rows as they are; biases on q/k/v
            assert torch.equal(weights[f"blk.{layer}.attn_q.bias"], attn.q_proj.bias.detach())
        assert torch.equal(weights[f"blk.{layer}.attn_q.weight"], q)
        assert torch.equal(weights[f"blk.{layer}.attn_k.weight"], k)
        mlp = loaded.model.model.layers[layer].mlp
        assert torch.equal(weights[f"blk.{layer}.ffn_down.weight"], mlp.down_proj.dequantized_weight())
    assert torch.equal(weights["token_embd.weight"], loaded.model.model.embed_tokens.weight.detach())
    assert "output.weight" not in weights  # tied: llama.cpp reuses the embedding
    fields = GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == model_type
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(bpe_tokenizer)
    assert fields[f"{model_type}.attention.head_count_kv"].contents() == 2
    assert "TEMPLATE" in (tmp_path / "out" / "gguf" / "Modelfile").read_text()


def test_unmappable_layers_are_requantized_and_measured(bpe_tokenizer, tmp_path):
    loaded = tiny("llama", bpe_tokenizer)
    quantize_all(loaded, "nf4/g64")
    windows = torch.randint(0, len(bpe_tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    result = export_model(loaded, ["gguf"], tmp_path / "out", windows=windows)[0]
    changed = [layer for layer in result.layers if not layer.lossless and layer.name.startswith("model.layers")]
    assert len(changed) == 14 and all("nf4 has no GGML block type" in layer.reason for layer in changed)
    assert {layer.target for layer in changed} == {"Q4_1"}  # K=64 rows: no k-quant fits; nearest 4-bit legacy type
    assert result.kl_divergence is not None and result.kl_divergence > 0
    weights = gguf_weights(tmp_path / "out" / "gguf" / GGUF_FILE)
    down = result.runtime_weights["model.layers.0.mlp.down_proj"]
    assert torch.equal(weights["blk.0.ffn_down.weight"], down)  # what we measured is what the file holds


def test_act_order_layers_fall_back_and_fixed_fallback_type(bpe_tokenizer, tmp_path):
    loaded = tiny("llama", bpe_tokenizer)
    quantize_all(loaded, "int4/g32", perm=True)
    result = export_model(loaded, ["gguf"], tmp_path / "out", ExportOptions(gguf_fallback="Q8_0"))[0]
    assert {layer.target for layer in result.layers if not layer.lossless and "layers" in layer.name} == {"Q8_0"}
    with pytest.raises(ModelpressError, match="unknown GGML type"):
        export_model(loaded, ["gguf"], tmp_path / "bad", ExportOptions(gguf_fallback="Q9_9"))
    assert not (tmp_path / "bad").exists()


def test_unknown_architecture_is_refused_before_writing(tmp_path):
    from tests.engine.tiny_models import build_tiny_gpt2

    loaded = LoadedModel(build_tiny_gpt2(), None, "gpt2", "gpt2")
    with pytest.raises(ModelpressError, match="does not know architecture 'gpt2'"):
        export_model(loaded, ["gguf"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


needs_llamacpp = pytest.mark.skipif(not llamacpp.available(),
                                    reason="llama.cpp tools not installed (bash scripts/install_llamacpp.sh)")


@needs_llamacpp
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llama_cpp_runs_the_export_with_our_logits(model_type, bpe_tokenizer, tmp_path):
    loaded = tiny(model_type, bpe_tokenizer, seed=3)
    for param in loaded.model.parameters():  # sharper distributions than init's, so the KL means something
        param.data.mul_(4.0 if param.dim() == 2 else 1.0)
    quantize_all(loaded, "int4/g32")
    export_model(loaded, ["gguf"], tmp_path / "out")
    windows = torch.randint(0, len(bpe_tokenizer), (2, 64), generator=torch.Generator().manual_seed(1))
    theirs = torch.log_softmax(llamacpp.logits(tmp_path / "out" / "gguf" / GGUF_FILE, windows, threads=2), -1)
    with torch.no_grad():
        ours = torch.log_softmax(loaded.model(input_ids=windows).logits.float(), -1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).mean().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert kl < 1e-2 and agree > 0.9, (kl, agree)


@pytest.fixture(scope="module")
def default_export(default_model, tmp_path_factory):
    """The default model re-quantized to int4-asym/g32 (its own Q4_1 grid) and exported: (model, GGUF path)."""
    import copy

    loaded = copy.deepcopy(default_model)
    quantize_all(loaded, "int4-asym/g32")
    out = tmp_path_factory.mktemp("default-export") / "out"
    export_model(loaded, ["gguf"], out)
    return loaded, out / "gguf" / GGUF_FILE


@pytest.mark.slow
def test_default_model_export_is_its_source_gguf_tensor_for_tensor(default_export):
    ours = GGUFReader(str(default_export[1]))
    source = GGUFReader(str(default_gguf_path()))
    theirs = {t.name: t for t in source.tensors}
    assert len(ours.tensors) == len(theirs) == 272
    for tensor in ours.tensors:
        other = theirs[tensor.name]
        assert tensor.tensor_type == other.tensor_type, tensor.name
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8), np.asarray(other.data).view(np.uint8)), tensor.name


@pytest.mark.slow
@needs_llamacpp
def test_llama_cpp_logits_of_the_default_export_are_ours(default_export):
    """The goal: KL(ours || llama.cpp) <= 1e-2 over 8 windows of 512 tokens of the default text (llama.cpp
    quantizes activations to 8 bits in its CPU matmuls, so a lossless file still differs a little)."""
    from modelpress.io.text import load_text, make_windows

    loaded, path = default_export
    windows = make_windows(loaded.tokenizer, load_text(None), 512, 8).eval
    theirs = torch.log_softmax(llamacpp.logits(path, windows, threads=2), -1)
    total = 0.0
    with torch.no_grad():
        for i, window in enumerate(windows):
            ours = torch.log_softmax(loaded.model(input_ids=window[None]).logits[0].float(), -1)
            total += (ours.exp() * (ours - theirs[i])).sum(-1).mean().item()
    assert total / len(windows) <= 1e-2


@pytest.mark.slow
@needs_llamacpp
def test_llama_cpp_runs_the_rotated_default_model_with_our_logits(default_model, tmp_path):
    """The default model rotated (its head untied), int8/g32, exported: llama.cpp's logits within 1e-2 KL of ours
    on 4 windows of 256 (measured 1.2e-3, top-1 agreement 0.98)."""
    import copy

    from modelpress.algorithms.rotate import rotate_residual
    from modelpress.io.text import load_text, make_windows

    loaded = copy.deepcopy(default_model)
    assert rotate_residual(loaded.model).untied_head
    quantize_all(loaded, "int8/g32")
    export_model(loaded, ["gguf"], tmp_path / "out")
    windows = make_windows(loaded.tokenizer, load_text(None), 256, 4).eval
    theirs = torch.log_softmax(llamacpp.logits(tmp_path / "out" / "gguf" / GGUF_FILE, windows, threads=2), -1)
    with torch.no_grad():
        ours = torch.log_softmax(loaded.model(input_ids=windows).logits.float(), -1)
    assert (ours.exp() * (ours - theirs)).sum(-1).mean().item() < 1e-2


def test_eval_loads_the_exported_gguf_and_compares_with_its_float_source(bpe_tokenizer, tmp_path, monkeypatch):
    from modelpress.api import default_reference
    from modelpress.io.model import load_model

    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    loaded = tiny("llama", bpe_tokenizer)
    loaded.float_source = str(tmp_path / "float-model")
    quantize_all(loaded, "int4-asym/g32")
    export_model(loaded, ["gguf"], tmp_path / "out", ExportOptions(gguf_float_type="F32"))
    back = load_model(str(tmp_path / "out" / "gguf" / GGUF_FILE))
    assert default_reference(back) == str(tmp_path / "float-model")
    ids = torch.randint(0, len(bpe_tokenizer), (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = loaded.model(input_ids=ids).logits, back.model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_rotated_model_exports_with_its_own_output_head(model_type, bpe_tokenizer, tmp_path):
    """A tied model rotated (algorithms/rotate.py) has an untied head and unit norms: a plain GGUF of its kind,
    read back with our loader and, where installed, run by llama.cpp with our logits."""
    from modelpress.algorithms.rotate import rotate_residual
    from modelpress.io.model import load_model

    loaded = tiny(model_type, bpe_tokenizer, seed=6)
    with torch.no_grad():      # a final norm of gain other than one: the head cannot stay tied to the embedding
        loaded.model.model.norm.weight.uniform_(0.5, 1.5)
    assert rotate_residual(loaded.model).untied_head
    quantize_all(loaded, "int4/g32")
    export_model(loaded, ["gguf"], tmp_path / "out", ExportOptions(gguf_float_type="F32"))
    path = tmp_path / "out" / "gguf" / GGUF_FILE
    weights = gguf_weights(path)
    assert "output.weight" in weights and not torch.equal(weights["output.weight"], weights["token_embd.weight"])
    assert torch.equal(weights["blk.0.attn_norm.weight"], torch.ones(64))
    ids = torch.randint(0, len(bpe_tokenizer), (1, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = loaded.model(input_ids=ids).logits.float()
        back = load_model(str(path)).model(input_ids=ids).logits.float()
    torch.testing.assert_close(back, ours, rtol=1e-4, atol=1e-4)
    if llamacpp.available():
        theirs = torch.log_softmax(llamacpp.logits(path, ids, threads=2), -1)
        mine = torch.log_softmax(ours, -1)
        assert (mine.exp() * (mine - theirs)).sum(-1).mean().item() < 1e-2


def test_structurally_pruned_model_writes_its_new_widths(bpe_tokenizer, tmp_path):
    from modelpress.algorithms.prune.structure import Unit
    from modelpress.algorithms.prune.structured import slice_unit

    loaded = tiny("llama", bpe_tokenizer, seed=5)
    mlp = Unit("channels", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
    for layer, start in ((0, 0), (1, 32)):   # each layer keeps 96 of 128 neurons (ResizedLinear, config unchanged)
        slice_unit(loaded.model.model.layers[layer], mlp, torch.arange(start, start + 96), None, plain=False)
    quantize_all(loaded, "int4/g32")
    export_model(loaded, ["gguf"], tmp_path / "out", ExportOptions(gguf_float_type="F32"))
    path = tmp_path / "out" / "gguf" / GGUF_FILE
    assert GGUFReader(str(path)).fields["llama.feed_forward_length"].contents() == 96
    assert gguf_weights(path)["blk.1.ffn_down.weight"].shape == (64, 96)
    if llamacpp.available():
        ids = torch.randint(0, len(bpe_tokenizer), (1, 48), generator=torch.Generator().manual_seed(4))
        theirs = torch.log_softmax(llamacpp.logits(path, ids, threads=2), -1)
        with torch.no_grad():
            ours = torch.log_softmax(loaded.model(input_ids=ids).logits.float(), -1)
        assert (ours.exp() * (ours - theirs)).sum(-1).mean().item() < 1e-2


@pytest.mark.parametrize("bos", [False, True])
def test_the_bos_rule_travels_through_the_gguf_and_back(bpe_tokenizer, tmp_path, bos):
    """Whether every window starts with BOS follows the tokenizer into the GGUF key llama.cpp reads
    (tokenizer.ggml.add_bos_token), and loading the GGUF gives a tokenizer that adds BOS exactly then
    (transformers' GGUF conversion ignores the key; evaluation and calibration windows depend on it)."""
    import copy

    from modelpress.io.model import load_model
    from modelpress.io.text import tokenizer_bos

    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.add_bos_token = bos
    loaded = tiny("llama", tokenizer)
    quantize_all(loaded, "int8/g32")
    export_model(loaded, ["gguf"], tmp_path / "out")
    path = tmp_path / "out" / "gguf" / GGUF_FILE
    assert GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"].contents() == bos
    back = load_model(str(path))
    assert (tokenizer_bos(back.tokenizer) is not None) == bos
    again = tmp_path / "again"     # a GGUF source keeps its keys, but the BOS rule follows the tokenizer
    back.tokenizer.add_bos_token = not bos
    export_model(back, ["gguf"], again)
    assert GGUFReader(str(again / "gguf" / GGUF_FILE)).fields["tokenizer.ggml.add_bos_token"].contents() == (not bos)


# ---- a quantized output head (`quantize --head`) ---------------------------------------------------------

def with_head(loaded: LoadedModel, spec: str, head: str) -> LoadedModel:
    from modelpress.algorithms.quantize import HeadConfig
    from modelpress.api import quantize_model

    quantize_all(loaded, spec)
    quantize_model(loaded, HeadConfig(head))
    return loaded


@pytest.mark.parametrize("head,qtype", [("int8/g32", Q.Q8_0), ("int4/g32", Q.Q4_0), ("int4-asym/g32", Q.Q4_1)])
def test_tied_quantized_head_is_token_embd_once_bit_for_bit(head, qtype, bpe_tokenizer, tmp_path):
    loaded = with_head(tiny("llama", bpe_tokenizer), "int4/g32", head)
    result = export_model(loaded, ["gguf"], tmp_path / "out")[0]
    assert result.lossless and not result.runtime_weights
    assert result.linear_bits_per_weight == pytest.approx(4.5)     # the table is not a decoder linear layer
    assert any(n.startswith(f"model.embed_tokens: {head} -> {qtype.name}, bit for bit") for n in result.notes)
    assert any(n.startswith("lm_head: tied to model.embed_tokens") for n in result.notes)
    reader = GGUFReader(str(tmp_path / "out" / "gguf" / GGUF_FILE))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == qtype and "output.weight" not in types
    weights = gguf_weights(tmp_path / "out" / "gguf" / GGUF_FILE)
    assert torch.equal(weights["token_embd.weight"], loaded.model.model.embed_tokens.dequantized_weight())


def test_untied_quantized_head_is_its_own_output_tensor(bpe_tokenizer, tmp_path):
    loaded = tiny("llama", bpe_tokenizer)
    loaded.model.lm_head.weight = torch.nn.Parameter(loaded.model.lm_head.weight.detach().clone() * 2)
    loaded.model.config.tie_word_embeddings = False
    with_head(loaded, "int4/g32", "int8/g32")
    result = export_model(loaded, ["gguf"], tmp_path / "out", ExportOptions(gguf_float_type="F32"))[0]
    assert result.lossless
    weights = gguf_weights(tmp_path / "out" / "gguf" / GGUF_FILE)
    assert torch.equal(weights["output.weight"], loaded.model.lm_head.dequantized_weight())
    assert torch.equal(weights["token_embd.weight"], loaded.model.model.embed_tokens.weight.detach())


def test_float_exports_write_the_dequantized_table_and_say_so(bpe_tokenizer, tmp_path):
    from safetensors import safe_open

    loaded = with_head(tiny("llama", bpe_tokenizer), "int4/g32", "int8/g32")
    ct, hf = export_model(loaded, ["compressed-tensors", "hf"], tmp_path / "out")
    table = loaded.model.model.embed_tokens.dequantized_weight()
    ct_layers = {layer.name: layer for layer in ct.layers}
    assert ct_layers["model.embed_tokens"].lossless and ct_layers["model.embed_tokens"].target == "float32"
    assert any("compressed-tensors keeps the output head and embeddings float" in n for n in ct.notes)
    with safe_open(tmp_path / "out" / "compressed-tensors" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), table)
        assert not any(k.startswith("lm_head") or k.endswith(".qdata") and "embed" in k for k in f.keys())
    hf_layers = {layer.name: layer for layer in hf.layers}
    exact = torch.equal(table.half().float(), table)
    assert hf_layers["model.embed_tokens"].lossless == exact          # int8 x fp16 scale needs more than fp16
    assert hf_layers["model.embed_tokens"].source == "int8/g32 embedding"


@needs_llamacpp
def test_llama_cpp_runs_a_quantized_tied_head_with_our_logits(bpe_tokenizer, tmp_path):
    loaded = tiny("llama", bpe_tokenizer, seed=3)
    for param in loaded.model.parameters():  # sharper distributions than init's, so the KL means something
        param.data.mul_(4.0 if param.dim() == 2 else 1.0)
    with_head(loaded, "int4/g32", "int8/g32")
    export_model(loaded, ["gguf"], tmp_path / "out")
    windows = torch.randint(0, len(bpe_tokenizer), (2, 64), generator=torch.Generator().manual_seed(1))
    theirs = torch.log_softmax(llamacpp.logits(tmp_path / "out" / "gguf" / GGUF_FILE, windows, threads=2), -1)
    with torch.no_grad():
        ours = torch.log_softmax(loaded.model(input_ids=windows).logits.float(), -1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).mean().item()
    assert kl < 1e-2, kl


@pytest.mark.slow
def test_default_model_head_int8_g32_is_the_source_q8_0_token_embd(default_model, tmp_path):
    """The default model's embedding is dequantized Q8_0: int8/g32 with float16 scales reproduces it, so the
    exported token_embd is the source GGUF's byte for byte."""
    import copy

    from modelpress.algorithms.quantize import HeadConfig
    from modelpress.api import quantize_model

    loaded = copy.deepcopy(default_model)
    quantize_model(loaded, HeadConfig("int8/g32"))
    result = export_model(loaded, ["gguf"], tmp_path / "out")[0]
    assert any(n.startswith("model.embed_tokens: int8/g32 -> Q8_0, bit for bit") for n in result.notes)
    ours = {t.name: t for t in GGUFReader(str(tmp_path / "out" / "gguf" / GGUF_FILE)).tensors}
    theirs = {t.name: t for t in GGUFReader(str(default_gguf_path())).tensors}
    assert ours["token_embd.weight"].tensor_type == theirs["token_embd.weight"].tensor_type == Q.Q8_0
    assert np.array_equal(np.asarray(ours["token_embd.weight"].data).view(np.uint8),
                          np.asarray(theirs["token_embd.weight"].data).view(np.uint8))
