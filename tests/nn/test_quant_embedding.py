"""QuantEmbedding and the quantized output head (`quantize --head`): the gather equals dequantize-then-lookup
bit for bit, a tied head and embedding hold one packed tensor set, and the logits are the reference path's."""

import copy

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from modelpress.algorithms.quantize import HeadConfig, RTNConfig, method_names
from modelpress.algorithms.quantize.rtn import quantize_rtn
from modelpress.api import quantize_model
from modelpress.errors import ModelpressError
from modelpress.eval.size import measure_size
from modelpress.formats.packed import PackedWeight, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel
from modelpress.nn.quant_embedding import QuantEmbedding
from modelpress.nn.quant_linear import QuantLinear


@pytest.mark.parametrize("spec", ["int8/g32", "int4/g32", "int4-asym/g32", "int3-asym/channel", "nf4/g64",
                                  "fp8-e4m3/channel", "int8/tensor", "int4/g40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_equals_dequantize_then_embedding(spec, dtype):
    table = torch.randn(300, 96, generator=torch.Generator().manual_seed(0))
    packed = quantize_weight(table, WeightScheme.parse(spec))
    embedding = QuantEmbedding(packed, dtype=dtype)
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    expected = nn.functional.embedding(ids, packed.dequantize(dtype))
    got = embedding(ids)
    assert got.dtype == dtype and got.shape == (3, 11, 96)
    assert torch.equal(got, expected)


def test_schemes_the_gather_cannot_read_are_refused():
    table = torch.randn(64, 64)
    with pytest.raises(ModelpressError, match="double-quantized scales"):
        QuantEmbedding(quantize_weight(table, WeightScheme.parse("nf4/g64/dq")))
    with pytest.raises(ModelpressError, match="column permutation"):
        QuantEmbedding(quantize_weight(table, WeightScheme.parse("int4/g32"), input_perm=torch.randperm(64)))


def packed_ptrs(model: nn.Module) -> set[int]:
    return {t.data_ptr() for n, t in model.state_dict().items() if n.endswith(".qdata")}


def dequantized_reference(float_model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with every quantized weight replaced by its dequantized value (the reference path)."""
    reference = copy.deepcopy(float_model)
    for name, module in quantized.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            reference.get_submodule(name).weight.data = module.dequantized_weight(torch.float32)
    return reference


def test_tied_head_keeps_one_packed_table_and_the_reference_logits():
    model = build_tiny_llama()
    float_model = copy.deepcopy(model)
    loaded = LoadedModel(model, None, "tiny", "tiny")
    report = quantize_model(loaded, RTNConfig("int4/g32"), head="int8/g32")
    assert report.details["head"] == {"head": "lm_head", "tied_embedding": "model.embed_tokens",
                                      "scheme": "int8/g32", "float_bytes": 320 * 96 * 4,
                                      "packed_bytes": 320 * (96 + 3 * 2)}
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, QuantEmbedding) and isinstance(head, QuantLinear)
    for name in PackedWeight.TENSOR_NAMES:
        assert getattr(embedding, name) is getattr(head, name)
    assert embedding.tied_head is head
    ids = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(0))
    reference = dequantized_reference(float_model, model)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight   # still tied: one table set above
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_tied_head_moves_to_cuda_as_one_table_with_the_cpu_logits(cuda):
    model = build_tiny_llama()
    quantize_model(LoadedModel(model, None, "tiny", "tiny"), RTNConfig("int4/g32"), head="int8/g32")
    ids = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        model.to(cuda)
        embedding, head = model.model.embed_tokens, model.lm_head
        for name in PackedWeight.TENSOR_NAMES:                 # still one packed table set, now on the GPU
            mine = getattr(embedding, name)
            assert mine is getattr(head, name) and (mine is None or mine.device.type == "cuda")
        got = model(ids.to(cuda)).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_head_shrinks_the_model_and_is_counted_once():
    without = build_tiny_llama()
    quantize_rtn(without, RTNConfig("int4/g32"))
    with_head = build_tiny_llama()
    quantize_model(LoadedModel(with_head, None, "tiny", "tiny"), RTNConfig("int4/g32"), head="int8/g32")
    a, b = measure_size(without), measure_size(with_head)
    assert b.parameters == a.parameters                       # the tied table counted once, as the float model does
    assert a.weight_bytes - b.weight_bytes == 320 * 96 * 4 - 320 * (96 + 6)   # float32 table -> int8/g32 once
    assert b.quantized_parameters == a.quantized_parameters + 320 * 96


def test_a_move_keeps_the_tied_tensors_one_set():
    model = build_tiny_llama()
    quantize_model(LoadedModel(model, None, "tiny", "tiny"), RTNConfig("int4/g32"), head="int8/g32")
    moved: set[int] = set()

    def move(tensor):   # what .to(device) does: a new tensor per buffer, a tensor already there as it is
        if id(tensor) in moved:
            return tensor
        new = tensor.clone()
        moved.add(id(new))
        return new

    old = model.lm_head.qdata
    model._apply(move)
    assert model.lm_head.qdata is not old
    assert model.model.embed_tokens.qdata is model.lm_head.qdata
    assert model.model.embed_tokens.scale is model.lm_head.scale
    copied = copy.deepcopy(model)
    assert copied.model.embed_tokens.qdata is copied.lm_head.qdata and copied.model.embed_tokens.tied_head is copied.lm_head
    model.to(torch.bfloat16)
    assert model.model.embed_tokens(torch.tensor([1])).dtype == torch.bfloat16


def test_an_untied_head_becomes_a_quant_linear_alone():
    model = build_tiny_llama(tie_word_embeddings=False)
    report = quantize_model(LoadedModel(model, None, "tiny", "tiny"), HeadConfig("int4/g32"))
    assert report.method == "head" and report.details["head"]["tied_embedding"] is None
    assert isinstance(model.lm_head, QuantLinear) and type(model.model.embed_tokens) is nn.Embedding


def test_head_is_no_method_and_refusals_name_the_problem():
    assert "head" not in method_names()
    model = build_tiny_llama()
    with pytest.raises(ModelpressError, match="double-quantized"):
        quantize_model(LoadedModel(model, None, "tiny", "tiny"), HeadConfig("nf4/g64/dq"))
    assert type(model.model.embed_tokens) is nn.Embedding                 # refused before any change
    quantize_model(LoadedModel(model, None, "tiny", "tiny"), HeadConfig("int8/g32"))
    with pytest.raises(ModelpressError, match="already quantized"):
        quantize_model(LoadedModel(model, None, "tiny", "tiny"), HeadConfig("int8/g32"))
    with pytest.raises(ModelpressError, match="unknown number format"):
        quantize_model(LoadedModel(build_tiny_llama(), None, "tiny", "tiny"), RTNConfig("int4/g32"), head="int7")
    fresh = build_tiny_llama()          # a head the tied embedding cannot gather fails before the method runs
    with pytest.raises(ModelpressError, match="double-quantized"):
        quantize_model(LoadedModel(fresh, None, "tiny", "tiny"), RTNConfig("int4/g32"), head="nf4/g64/dq")
    assert not any(isinstance(m, QuantLinear) for m in fresh.modules())
