"""Blocks streamed from safetensors (issue 15, item 1): the result is bit for bit the in-memory result, and
host memory during calibration stays near one block, not the model.

The memory test runs each side in a child process and reads the kernel's peak resident set (VmHWM, reset
after imports through /proc/self/clear_refs) so that only the calibration is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer
from safetensors.torch import load_file
from tiny_models import token_ids

import modelpress
from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.cli import main
from modelpress.engine.stream import open_streamed
from modelpress.errors import ModelpressError
from modelpress.io.model import LoadedModel, load_hf
from modelpress.io.save import save_compressed

# deep enough that the model (~290 MB of float32) dwarfs one block (~12 MB) and allocator noise
DEEP = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64)


class RoundToNearest:
    """The cheapest layer algorithm for the engine (no statistics, RTN solves): the memory test measures
    the engine's streaming, not a solver's workspace (GPTQ's own is measured in bench/distributed.py)."""

    sequential = False

    def describe(self) -> str:
        return "rtn through the engine int4/g128"

    def observe(self, group, inputs) -> None:
        return None

    def solve(self, group):
        from modelpress.engine.algorithm import LayerSolution
        from modelpress.formats.packed import quantize_weight
        from modelpress.formats.scheme import as_scheme

        return [LayerSolution(quantize_weight(t.weight, as_scheme("int4/g128"))) for t in group.targets]

    def finish_block(self, block_index: int) -> None:
        return None


@pytest.mark.parametrize("float_target", [False, True])
def test_streamed_gptq_from_shards_equals_in_memory_gptq(tmp_path, float_target):
    """float_target: the float copy of each block is made from the streamed block, held while it is compressed."""
    build_tiny_llama(num_hidden_layers=3).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    ids = token_ids(320, 6, 24, seed=1)
    config = GPTQConfig("int4/g32", float_target=float_target)
    plain = load_hf(str(tmp_path / "m"))
    quantize_gptq(plain.model, config, ids, batch_size=2)
    save_compressed(plain, tmp_path / "plain")

    streamed = open_streamed(tmp_path / "m", tmp_path / "work")
    quantize_gptq(streamed, config, ids, batch_size=2)
    assert all(t.is_meta for t in streamed.model.layers.state_dict().values())   # nothing left in memory
    save_compressed(LoadedModel(streamed, None, "m", "m"), tmp_path / "streamed")
    expected, got = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "streamed" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_streaming_refuses_what_it_cannot_stream(tmp_path, tiny_llama_dir, capsys):
    assert main(["quantize", str(tiny_llama_dir), "--stream", "--format", "int4", "--out", str(tmp_path / "o")]) == 2
    assert "--stream works with the block-by-block methods (gptq, awq, awq-gptq); rtn" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o.*"))
    bare = tmp_path / "bare"                   # a config without safetensors weights
    bare.mkdir()
    (bare / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ModelpressError, match="neither model.safetensors nor"):
        open_streamed(bare, tmp_path / "work")


def peak_growths(model_dir: Path, work: Path) -> dict:
    """Plain load then streamed run in one child process: each one's peak RSS above what the process held
    just before it, in bytes. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed
    tensors of a few MB go back to the system as tensors of hundreds of MB always do; otherwise its
    dynamic threshold keeps them in the heap and the peak measures the allocator, not the engine."""
    here = Path(__file__).parent
    paths = [str(Path(modelpress.__file__).parents[1]), str(here.parent), str(here)]
    env = {"PYTHONPATH": ":".join(paths), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    done = subprocess.run([sys.executable, __file__, str(model_dir), str(work)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_streamed_calibration_holds_about_one_block_not_the_model(tmp_path):
    model = build_tiny_llama(**DEEP)
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(tmp_path / "m")
    del model
    growth = peak_growths(tmp_path / "m", tmp_path / "work")
    assert growth["plain"] >= model_bytes                        # the meter sees a loaded model
    # the float block, its dequantized copy and packed form, activations (< 1 MB here) and a fixed 32 MiB
    # for the interpreter and allocator: nothing that grows with depth
    assert growth["streamed"] <= 2 * block_bytes + 32 * 2**20, (growth, block_bytes, model_bytes)


def _child(model_dir: str, work: str) -> None:
    """Run the engine on the plain then the streamed model; print each peak RSS growth as JSON."""
    import gc

    from modelpress.engine.runner import EngineSettings, run_sequential

    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    ids = token_ids(320, 4, 32, seed=1)
    run_sequential(build_tiny_llama(num_hidden_layers=1), RoundToNearest(), ids)   # lazy imports, allocator warm
    growth = {}
    for mode in ("plain", "streamed"):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")           # peak RSS := current RSS
        start = status("VmRSS:")
        model = load_hf(model_dir).model if mode == "plain" else open_streamed(model_dir, work)
        run_sequential(model, RoundToNearest(), ids, settings=EngineSettings(batch_size=4))
        growth[mode] = status("VmHWM:") - start
        del model
    print(json.dumps(growth))


if __name__ == "__main__":
    _child(*sys.argv[1:3])


@pytest.mark.parametrize("method", [["wanda", "--sparsity", "0.5"], ["sparsegpt", "--pattern", "2:4"]])
def test_streamed_pruning_from_shards_equals_in_memory_pruning(tmp_path, method):
    build_tiny_llama(num_hidden_layers=3).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    char_tokenizer().save_pretrained(tmp_path / "m")
    common = ["prune", str(tmp_path / "m"), "--method", *method, "--calib-text", "default", "--calib-samples", "4",
              "--calib-seq-len", "32"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    expected = load_file(tmp_path / "plain" / "model.safetensors")
    got = load_file(tmp_path / "streamed" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not list(tmp_path.glob(".streamed.*"))   # the block work directory is gone


def test_streamed_pruning_refuses_pruners_that_need_the_whole_model(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "o"
    assert main(["prune", str(tiny_llama_dir), "--stream", "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out)]) == 2
    assert "--stream works with the block-by-block pruners (wanda, sparsegpt)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
