import pytest
import torch
from conftest import build_tiny_llama

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.errors import ModelpressError
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.quant_linear import QuantLinear


def test_rtn_replaces_linears_but_not_the_head_and_drops_float_weights():
    model = build_tiny_llama(tie_word_embeddings=False)
    float_up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    layers = quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    assert len(layers) == 14
    assert not isinstance(model.lm_head, QuantLinear)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and not hasattr(up, "weight")
    expected = quantize_weight(float_up, WeightScheme.parse("int4/g32")).dequantize()
    assert torch.equal(up.dequantized_weight(), expected)


def test_skip_patterns_and_forward_close_to_float():
    model = build_tiny_llama()
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int8/channel"), skip=("lm_head", "*down_proj")))
    assert not isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.02


def test_conv1d_layers_of_gpt2_are_quantized_in_out_order():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=64)).eval()
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int8/channel")))
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, QuantLinear) and (attn.out_features, attn.in_features) == (192, 64)
    with torch.no_grad():
        assert (model(ids).logits - ref).norm() / ref.norm() < 0.02


def test_nan_weight_is_refused_with_the_layer_name():
    model = build_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ModelpressError, match=r"model\.layers\.1\.self_attn\.q_proj.*NaN"):
        quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
