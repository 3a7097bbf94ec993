"""`modelpress quantize --method gptq --resume DIR` killed with SIGKILL (no clean-up of any kind) at several
points, then resumed: the output is bit for bit the output of an uninterrupted run (issue 14, item 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import load_file

import modelpress
from modelpress.cli import main

BLOCKS = 6


def quantize_argv(model: Path, text: Path, resume: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--method", "gptq", "--format", "int4", "--group-size", "32",
            "--calib-text", str(text), "--calib-samples", "8", "--calib-seq-len", "64", "--resume", str(resume),
            "--out", str(out), *extra]


def blocks_done(resume: Path) -> int:
    try:
        return json.loads((resume / "state.json").read_text())["blocks_done"]
    except (OSError, ValueError, KeyError):
        return 0


def run_and_kill(argv: list[str], resume: Path, when, timeout: float = 60.0) -> None:
    """Run the CLI in a child process and SIGKILL it as soon as `when(resume)` holds (polled every ms)."""
    env = {**os.environ, "PYTHONPATH": str(Path(modelpress.__file__).parents[1]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}   # the same threads as this process: same rounding
    child = subprocess.Popen([sys.executable, "-m", "modelpress", *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not when(resume):
            assert child.poll() is None, "the run finished before the kill point"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_gptq_killed_twice_then_resumed_is_bit_identical(tmp_path, tiny_text):
    model = save_tiny_llama(tmp_path / "m", num_hidden_layers=BLOCKS)
    assert main(quantize_argv(model, tiny_text, tmp_path / "r-whole", tmp_path / "whole")) == 0
    resume, out = tmp_path / "resume", tmp_path / "out"
    argv = quantize_argv(model, tiny_text, resume, out)
    # 1: as soon as block 0's file appears (state.json may not be committed yet); 2: half-way through
    run_and_kill(argv, resume, lambda r: (r / "block-0000.safetensors").exists())
    run_and_kill(argv, resume, lambda r: blocks_done(r) >= BLOCKS // 2)
    done = blocks_done(resume)
    assert BLOCKS // 2 <= done < BLOCKS and not out.exists()
    assert main(argv) == 0   # resumes from the last commit
    report = json.loads((out / "modelpress.json").read_text())["report"]
    assert report["resumed_from_block"] == done
    expected, got = weights(tmp_path / "whole"), weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not list(resume.glob(".*partial-*")) and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("changed", [("--group-size", "64"), ("--calib-samples", "4"), ("--calib-seq-len", "32"),
                                     ("--format", "int8"), ("--no-static-groups",), ("--skip", "lm_head", "*down_proj")])
def test_resume_from_the_cli_refuses_a_run_with_other_settings(tmp_path, tiny_text, capsys, changed):
    model = save_tiny_llama(tmp_path / "m", num_hidden_layers=2)
    resume = tmp_path / "resume"
    assert main(quantize_argv(model, tiny_text, resume, tmp_path / "a")) == 0
    state = (resume / "state.json").read_bytes()
    argv = quantize_argv(model, tiny_text, resume, tmp_path / "b")
    index = argv.index(changed[0]) if changed[0] in argv else len(argv)
    argv[index: index + len(changed)] = changed
    capsys.readouterr()
    assert main(argv) == 2
    assert "other settings or data" in capsys.readouterr().err
    assert (resume / "state.json").read_bytes() == state and not (tmp_path / "b").exists()
