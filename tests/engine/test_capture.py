import pytest
import torch
from conftest import build_tiny_llama
from tiny_models import build_tiny_gpt2, build_tiny_mixtral, load_bert, token_ids

from modelpress.engine.blocks import find_blocks
from modelpress.engine.capture import capture_inputs, run_block


@pytest.mark.parametrize("build, vocab", [(build_tiny_llama, 320), (build_tiny_gpt2, 256), (load_bert, 1000),
                                          (build_tiny_mixtral, 256)])
def test_replaying_captured_inputs_through_the_blocks_reproduces_the_model(build, vocab):
    model = build()
    stack = find_blocks(model)
    ids = token_ids(vocab, 5, 24)
    expected = []
    handle = stack.blocks[-1].register_forward_hook(
        lambda _m, _a, out: expected.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    captured = capture_inputs(model, stack, ids, torch.device("cpu"), batch_size=2)
    assert [h.shape[0] for h in captured.hidden] == [2, 2, 1]
    assert len(captured.calls) == len(stack) and all(len(c) == 3 for c in captured.calls)
    with torch.no_grad():
        hidden = captured.hidden
        for block, calls in zip(stack.blocks, captured.calls):
            hidden = [run_block(block, h, c) for h, c in zip(hidden, calls)]
    assert torch.allclose(torch.cat(hidden), expected[0], atol=1e-5)


def test_keyword_arguments_are_captured_and_shared_tensors_stored_once():
    model = build_tiny_llama()
    stack = find_blocks(model)
    captured = capture_inputs(model, stack, token_ids(320, 2, 16), torch.device("cpu"), batch_size=2)
    first, second = (calls[0].kwargs for calls in captured.calls)
    assert {"position_embeddings", "position_ids"} <= set(first)
    cos, _ = first["position_embeddings"]
    assert cos.shape[-2] == 16
    assert second["position_embeddings"][0] is cos  # the same tensor object for every block
    assert not hasattr(stack.blocks[0], "forward") or "forward" not in vars(stack.blocks[0])
