"""Packed experts (QuantExperts) survive save/load and keep answering like the fused parameter did."""

import torch
from tiny_models import build_tiny_mixtral, last_hidden, token_ids

from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel
from modelpress.io.save import load_compressed, save_compressed
from modelpress.nn.quant_experts import QuantExperts


def test_quant_experts_index_like_the_fused_parameter():
    torch.manual_seed(0)
    fused = torch.randn(3, 8, 32)
    scheme = WeightScheme.parse("int4/g16")
    packed = [quantize_weight(fused[e], scheme) for e in range(3)]
    experts = QuantExperts(packed)
    assert experts.shape == (3, 8, 32) and len(experts) == 3
    for e in range(3):
        assert torch.equal(experts[e], packed[e].dequantize())
        assert torch.equal(experts[torch.tensor(e)], packed[e].dequantize())
    assert torch.equal(experts[torch.tensor([2, 0])], torch.stack([packed[2].dequantize(), packed[0].dequantize()]))
    transposed = QuantExperts(packed, transposed=True)
    assert torch.equal(transposed[1], packed[1].dequantize().t())


def test_a_quantized_moe_model_saves_and_loads(tmp_path):
    model = build_tiny_mixtral(experts=4, top_k=2)
    ids = token_ids(256, 4, 32)
    quantize_gptq(model, GPTQConfig(WeightScheme.parse("int4/g32")), ids, batch_size=2)
    before = last_hidden(model, ids)
    save_compressed(LoadedModel(model, None, source="tiny", float_source="tiny"), tmp_path / "moe")
    loaded = load_compressed(tmp_path / "moe")
    assert isinstance(loaded.model.model.layers[1].mlp.experts.down_proj, QuantExperts)
    assert torch.equal(last_hidden(loaded.model, ids), before)
