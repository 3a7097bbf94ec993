"""An interrupted run resumed from its directory ends exactly where an uninterrupted run ends."""

import pytest
import torch
from conftest import build_tiny_llama
from tiny_models import token_ids

from modelpress.algorithms.quantize.gptq import GPTQ, GPTQConfig
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme

SETTINGS = EngineSettings(batch_size=2)


class Interrupted(Exception):
    pass


class FailingGPTQ(GPTQ):
    """GPTQ that dies at its first solve in block `fail_block` (a stand-in for a crash or Ctrl-C)."""

    def __init__(self, config, fail_block):
        super().__init__(config)
        self.fail_block, self.block = fail_block, 0

    def solve(self, group):
        if self.block == self.fail_block:
            raise Interrupted
        return super().solve(group)

    def finish_block(self, block_index):
        super().finish_block(block_index)
        self.block = block_index + 1


def _config(**overrides):
    return GPTQConfig(WeightScheme.parse("int4/g32"), **overrides)


@pytest.mark.parametrize("true_sequential, float_target, offload",
                         [(False, False, False), (True, False, False), (True, True, False), (True, True, True)])
def test_resume_after_an_interrupt_is_bit_identical(tmp_path, true_sequential, float_target, offload):
    """float_target: the float model's hidden states are saved beside the quantized model's and resumed too;
    offload: the interrupted and resumed runs carry them in host memory (engine/states.py), the whole run not."""
    ids = token_ids(320, 6, 32)
    config = _config(true_sequential=true_sequential, float_target=float_target)
    whole = build_tiny_llama(num_hidden_layers=3)
    run_sequential(whole, GPTQ(config), ids, settings=SETTINGS)

    resumed = build_tiny_llama(num_hidden_layers=3)
    with pytest.raises(Interrupted):
        run_sequential(resumed, FailingGPTQ(config, fail_block=1), ids, resume_dir=tmp_path, settings=SETTINGS,
                       offload=offload)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-0000.safetensors", "hidden-0001.safetensors",
                                                           "state.json"]
    fresh = build_tiny_llama(num_hidden_layers=3)  # a new process starts from the float model again
    report = run_sequential(fresh, GPTQ(config), ids, resume_dir=tmp_path, settings=SETTINGS, offload=offload)
    assert report.resumed_from_block == 1 and report.offloaded == offload
    assert len(report.notes) == 3 * 7 and report.layers == 3 * 7
    expected, got = whole.state_dict(), fresh.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_refuses_a_directory_of_another_run(tmp_path):
    ids = token_ids(320, 4, 32)
    run_sequential(build_tiny_llama(), GPTQ(_config()), ids, resume_dir=tmp_path, settings=SETTINGS)
    with pytest.raises(ModelpressError, match="other settings or data"):
        run_sequential(build_tiny_llama(), GPTQ(_config(damp=0.05)), ids, resume_dir=tmp_path, settings=SETTINGS)
    with pytest.raises(ModelpressError, match="other settings or data"):
        run_sequential(build_tiny_llama(), GPTQ(_config()), ids[:2], resume_dir=tmp_path, settings=SETTINGS)


def test_a_finished_run_resumes_to_the_same_model_without_work(tmp_path):
    ids = token_ids(320, 4, 32)
    first = build_tiny_llama()
    run_sequential(first, GPTQ(_config()), ids, resume_dir=tmp_path, settings=SETTINGS)
    again = build_tiny_llama()
    report = run_sequential(again, FailingGPTQ(_config(), fail_block=0), ids, resume_dir=tmp_path,
                            settings=SETTINGS)  # would raise if it solved anything
    assert report.resumed_from_block == 2
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])
