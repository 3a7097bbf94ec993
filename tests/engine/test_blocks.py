import pytest
import torch
from conftest import build_tiny_llama
from tiny_models import build_tiny_gpt2, build_tiny_mixtral, load_bert
from torch import nn

from modelpress.engine.blocks import find_blocks, move_outside_blocks
from modelpress.errors import ModelpressError


@pytest.mark.parametrize("build, path, count", [
    (build_tiny_llama, "model.layers", 2),
    (build_tiny_gpt2, "transformer.h", 2),
    (build_tiny_mixtral, "model.layers", 2),
    (load_bert, "encoder.layer", 6),
])
def test_finds_the_repeated_blocks_by_structure(build, path, count):
    stack = find_blocks(build())
    assert stack.path == path and len(stack) == count
    assert stack.block_name(1) == f"{path}.1"


def test_a_model_without_blocks_is_refused_with_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ModelpressError, match="repeated blocks"):
        find_blocks(model)


def test_moving_the_outside_keeps_tied_weights_tied_and_blocks_in_place():
    model = build_tiny_llama(tie_word_embeddings=True)
    stack = find_blocks(model)
    move_outside_blocks(model, stack, "meta")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.model.norm.weight.device.type == "meta"
    assert all(p.device == torch.device("cpu") for p in stack.blocks.parameters())
