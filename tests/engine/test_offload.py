"""Hidden states carried in host memory (engine/states.py): the same results as a run that keeps them on
the device, less device memory, and the automatic rule that decides it."""

import pytest
import torch
from conftest import build_tiny_llama
from tiny_models import token_ids

from modelpress.algorithms.quantize.awq import AWQ, AWQConfig
from modelpress.algorithms.quantize.gptq import GPTQ, GPTQConfig
from modelpress.engine.blocks import find_blocks
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.engine.states import HostStates, offload_decision, peak_streams, stored
from modelpress.formats.scheme import WeightScheme

SETTINGS = EngineSettings(batch_size=2)
SCHEME = WeightScheme.parse("int4/g32")


def _algorithm(name, model):
    if name == "gptq":   # float target on (the default): two streams carried
        return GPTQ(GPTQConfig(SCHEME), stack=find_blocks(model))
    return AWQ(AWQConfig(SCHEME), stack=find_blocks(model))   # runs the block on every batch in prepare_block


def _assert_same_state(a, b):
    expected, got = a.state_dict(), b.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_host_states_hand_out_copies_on_the_device_and_keep_their_own():
    tensors = [torch.randn(2, 3, 4) for _ in range(3)]
    states = HostStates(iter(tensors), "cpu")
    assert len(states) == 3
    assert all(torch.equal(a, b) for a, b in zip(states, tensors))
    assert torch.equal(states[-1], tensors[-1])
    half = states[1:]
    assert isinstance(half, HostStates) and len(half) == 2
    assert half.host[0].data_ptr() == states.host[1].data_ptr()   # a slice shares the host copies
    assert stored(states) == states.host and stored(None) == [] and stored(tensors) == tensors


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_an_offloaded_run_is_bit_identical(method):
    ids = token_ids(320, 6, 32)
    kept, offloaded = build_tiny_llama(num_hidden_layers=3), build_tiny_llama(num_hidden_layers=3)
    report_kept = run_sequential(kept, _algorithm(method, kept), ids, settings=SETTINGS, offload=False)
    report_off = run_sequential(offloaded, _algorithm(method, offloaded), ids, settings=SETTINGS, offload=True)
    assert not report_kept.offloaded and report_off.offloaded
    _assert_same_state(kept, offloaded)
    assert report_kept.notes == report_off.notes


def test_the_rule_offloads_only_when_the_streams_would_crowd_the_device(monkeypatch):
    assert offload_decision(torch.device("cpu"), 10**12, 3, 0) == (False, None)   # host memory is the device
    gb = 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gb)
    cuda = torch.device("cuda")
    # 22 GB free (20 + 2 held unused by the allocator), 2 GB of blocks: 20 GB of room, streams may take 10
    assert offload_decision(cuda, int(3.3 * gb), peak_streams(True), 2 * gb) == (False, None)
    offload, why = offload_decision(cuda, int(3.4 * gb), peak_streams(True), 2 * gb)
    assert offload and "3 x 3.40 GB" in why and "20.00 GB left on cuda" in why
    assert offload_decision(cuda, 5 * gb, peak_streams(False), 2 * gb)[0] is False
    assert offload_decision(cuda, 5 * gb, peak_streams(False), 3 * gb)[0] is True


def test_offloading_on_cuda_is_bit_identical_and_takes_less_device_memory(cuda):
    ids = token_ids(320, 64, 128)
    peaks, models = {}, {}
    for offload in (False, True):
        model = build_tiny_llama(num_hidden_layers=3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        report = run_sequential(model, _algorithm("gptq", model), ids, cuda, settings=EngineSettings(batch_size=8),
                                offload=offload)
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - start
        models[offload] = model
        assert report.offloaded == offload
    _assert_same_state(models[False], models[True])
    hidden = find_blocks(models[False]).blocks[0].self_attn.q_proj.in_features
    stream = ids.numel() * hidden * 4
    # three streams on the device without offload, about two batches of them with it
    assert peaks[False] - peaks[True] > 2 * stream, (peaks, stream)


def test_the_engine_applies_the_rule_and_says_so(monkeypatch, caplog):
    """offload=None: the engine asks the rule with the run's sizes (three streams with the float target) and
    warns when it offloads."""
    import modelpress.engine.runner as runner

    seen = []

    def rule(device, stream_bytes, streams, block_bytes):
        seen.append((device.type, stream_bytes, streams, block_bytes))
        return True, "hidden states to the host (test)"

    monkeypatch.setattr(runner, "offload_decision", rule)
    ids = token_ids(320, 6, 32)
    model = build_tiny_llama(num_hidden_layers=2)
    block = sum(p.numel() for p in find_blocks(model).blocks[0].parameters()) * 4
    with caplog.at_level("WARNING", logger="modelpress.engine.runner"):
        report = run_sequential(model, _algorithm("gptq", model), ids, settings=SETTINGS)
    assert report.offloaded and "hidden states to the host (test)" in caplog.text
    assert seen == [("cpu", 6 * 32 * 96 * 4, 3, 2 * block)]


def test_the_policy_reaches_the_engine_from_the_settings_and_the_command_line():
    """`--offload-hidden` -> CalibrationSettings.offload_hidden -> offload_policy around the method's runner."""
    import argparse

    from modelpress.commands.common import add_calibration_arguments, calibration_settings
    from modelpress.engine.states import offload_policy

    parser = argparse.ArgumentParser()
    add_calibration_arguments(parser, "calibration", "resume")
    assert calibration_settings(parser.parse_args([])).offload_hidden is None
    assert calibration_settings(parser.parse_args(["--offload-hidden"])).offload_hidden is True
    assert calibration_settings(parser.parse_args(["--no-offload-hidden"])).offload_hidden is False
    ids = token_ids(320, 4, 16)
    for policy in (True, False):
        model = build_tiny_llama(num_hidden_layers=1)
        with offload_policy(policy):
            report = run_sequential(model, _algorithm("gptq", model), ids, settings=SETTINGS)
        assert report.offloaded is policy
    model = build_tiny_llama(num_hidden_layers=1)
    with offload_policy(True):   # an explicit argument wins over the policy
        assert not run_sequential(model, _algorithm("gptq", model), ids, settings=SETTINGS, offload=False).offloaded
