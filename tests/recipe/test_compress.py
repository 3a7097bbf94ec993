"""`modelpress compress` / `modelpress.compress` on a tiny model: a recipe end to end, the reference run once
across stages, the quality gate (nothing exported, measured attribution), resume after SIGKILL bit for bit."""

from __future__ import annotations

import copy
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

import modelpress
from modelpress.algorithms.prune import StructuredConfig
from modelpress.algorithms.quantize import GPTQConfig, RTNConfig
from modelpress.api import CalibrationSettings, EvalSettings
from modelpress.cli import main
from modelpress.errors import ModelpressError
from modelpress.eval.quality import evaluate_quality
from modelpress.io.model import load_model
from modelpress.nn.layers import replace_module
from modelpress.recipe import Export, Gate, Recipe
from modelpress.recipe.run import GateFailed
from modelpress.train.recover import LoRA

BLOCKS = 4


def pipeline_yaml(text: Path, prune: bool = True) -> str:
    first = "  - structured: {target: neurons, sparsity: 0.25}\n" if prune else ""
    return f"""\
calibration: {{text: {text}, samples: 8, seq_len: 64}}
evaluation: {{text: {text}, windows: 3, seq_len: 64}}
reference_top_k: null
stages:
{first}  - gptq: {{scheme: int4/g32}}
  - lora: {{rank: 4, steps: 3, windows: 4, top_k: 16, merge: rtn}}
  - evaluate: {{text: {text}, windows: 2, seq_len: 64}}
  - export: {{targets: [compressed-tensors]}}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from modelpress.io.text import default_corpus

    root = tmp_path_factory.mktemp("compress")
    text = root / "text.txt"
    text.write_text(default_corpus()[:60_000], encoding="utf-8")
    model = save_tiny_llama(root / "m", num_hidden_layers=BLOCKS)
    (root / "recipe.yaml").write_text(pipeline_yaml(text))
    assert main(["compress", str(model), "--recipe", str(root / "recipe.yaml"), "--out", str(root / "whole")]) == 0
    return root


def tensor_files(out: Path) -> dict[str, tuple[dict, bytes]]:
    """Every tensor file a run wrote (stage models, exports): relative path -> (header, every byte after it).
    The header is compared as JSON: safetensors writes its metadata map in an order that varies between
    processes (a Rust HashMap), so only there can two identical files differ in their bytes."""
    files = {}
    for path in sorted((out / "stages").rglob("*.safetensors")):
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        files[str(path.relative_to(out))] = (json.loads(data[8: 8 + size]), data[8 + size:])
    return files


def test_a_recipe_runs_end_to_end(work):
    out = work / "whole"
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["structured", "gptq", "lora", "evaluate", "export"]
    assert (out / "report.md").read_text().count("\n| ") == 6 and (out / "report.png").stat().st_size > 0
    sizes = [report["reference"]["weight_bytes"]] + [s["size"]["weight_bytes"] for s in report["stages"][:3]]
    assert sizes[0] > sizes[1] > sizes[2] == sizes[3]          # pruning, then int4, then merged adapters (same scheme)
    # each stage's KL is what evaluate_quality measures for its saved model against the float model
    from modelpress.python_api import eval_windows

    float_model = load_model(str(work / "m"))
    windows = eval_windows(float_model.tokenizer, str(work / "text.txt"), EvalSettings(windows=3, seq_len=64))[1].eval
    for stage in report["stages"][:3]:
        saved = load_model(str(out / "stages" / f"{stage['index']:02d}-{stage['name']}" / "model"))
        expected = evaluate_quality({"s": saved.model}, windows, reference=float_model.model)["s"]
        assert stage["quality"]["kl_divergence"] == pytest.approx(expected.kl_divergence, rel=1e-5, abs=1e-9)
        assert stage["quality"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    export = out / "stages" / "05-export" / "export" / "compressed-tensors"
    assert (export / "config.json").exists() and report["stages"][4]["report"]["targets"][0]["lossless"]
    assert not list((out / "stages").glob(".*"))               # no resume state or partial folders left


def test_the_reference_runs_once_across_stages(work, tmp_path):
    loaded = load_model(str(work / "m"))
    calls = []
    def count(module, args, kwargs, output):
        if module is loaded.model:        # not the copies the stages run on (deepcopy copies hooks too)
            calls.append(tuple(kwargs["input_ids"].shape))

    loaded.model.register_forward_hook(count, with_kwargs=True)
    text = str(work / "text.txt")
    recipe = Recipe([StructuredConfig("neurons", 0.25), RTNConfig("int4/g32"),
                     EvalSettings(text=text, windows=3, seq_len=64, speed=False)],
                    calibration=CalibrationSettings(text=text, samples=4, seq_len=64),
                    evaluation=EvalSettings(text=text, windows=3, seq_len=64, speed=False), gate=Gate(max_kl=10.0))
    report = modelpress.compress(loaded, recipe, out=tmp_path / "run")
    # two stages and an evaluate stage scored on the same windows, a gate judged: the float model ran once
    # per evaluation window, and for nothing else
    assert len(report.stages) == 3 and report.gate.passed
    assert calls == [(1, 64)] * 3
    assert len(list((tmp_path / "run" / "reference").glob("*.safetensors"))) == 1
    assert report.stages[2].quality == pytest.approx(report.stages[1].quality)   # same windows, same model


def test_a_missed_gate_exports_nothing_and_names_the_costly_layers(work, tmp_path, capsys):
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(pipeline_yaml(work / "text.txt", prune=False).replace(
        "gptq: {scheme: int4/g32}", "rtn: {scheme: int3/g32}").replace(
        "  - lora: {rank: 4, steps: 3, windows: 4, top_k: 16, merge: rtn}\n", ""))
    argv = ["compress", str(work / "m"), "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--max-kl", "1e-9"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "quality gate missed: KL" in printed and "layers contributing most KL (measured" in printed
    assert not (tmp_path / "run" / "stages" / "03-export").exists()
    gate = json.loads((tmp_path / "run" / "report.json").read_text())["gate"]
    assert not gate["passed"] and len(gate["attribution"]) == 10
    kls = [row["kl_divergence"] for row in gate["attribution"]]
    assert kls == sorted(kls, reverse=True) and kls[0] > 0
    # the top layer's figure is the KL of the float model with only that layer taken from the compressed one
    float_model = load_model(str(work / "m")).model
    compressed = load_model(str(tmp_path / "run" / "stages" / "01-rtn" / "model")).model
    top = gate["attribution"][0]["layer"]
    probe = copy.deepcopy(float_model)
    replace_module(probe, top, compressed.get_submodule(top))
    from modelpress.python_api import eval_windows

    windows = eval_windows(load_model(str(work / "m")).tokenizer, str(work / "text.txt"),
                           EvalSettings(windows=3, seq_len=64))[1].eval[:2]
    expected = evaluate_quality({"p": probe}, windows, reference=float_model)["p"].kl_divergence
    assert kls[0] == pytest.approx(expected, rel=1e-5)
    assert main(argv[:-2]) == 0           # the same run without the gate goes on and exports
    assert (tmp_path / "run" / "stages" / "03-export" / "export" / "compressed-tensors").is_dir()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["resumed_stages"] == 2   # nothing redone


def test_python_gate_raises_and_out_is_needed_for_exports(work):
    loaded = load_model(str(work / "m"))
    text = str(work / "text.txt")
    settings = dict(calibration=CalibrationSettings(text=text, samples=4, seq_len=64),
                    evaluation=EvalSettings(text=text, windows=2, seq_len=64, speed=False))
    with pytest.raises(GateFailed, match="quality gate missed: top-1 agreement"):
        modelpress.compress(loaded, Recipe([RTNConfig("int2/g32")], gate=Gate(min_top1=0.999), **settings))
    with pytest.raises(ModelpressError, match="needs out="):
        modelpress.compress(loaded, [RTNConfig("int4/g32"), Export(("hf",))])


def test_a_head_stage_that_cannot_run_fails_before_any_stage_runs(work, tmp_path):
    from modelpress.algorithms.quantize import HeadConfig

    loaded = load_model(str(work / "m"))             # tied head: its embedding cannot gather /dq scales
    text = str(work / "text.txt")
    recipe = Recipe([GPTQConfig("int4/g32"), HeadConfig("nf4/g64/dq")],
                    calibration=CalibrationSettings(text=text, samples=4, seq_len=64),
                    evaluation=EvalSettings(text=text, windows=2, seq_len=64, speed=False))
    with pytest.raises(ModelpressError, match="double-quantized"):
        modelpress.compress(loaded, recipe, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_quantize_max_kl_saves_nothing_on_a_miss(work, tmp_path, capsys):
    argv = ["quantize", str(work / "m"), "--format", "int2", "--group-size", "32", "--calib-text",
            str(work / "text.txt"), "--out", str(tmp_path / "q")]
    assert main([*argv, "--max-kl", "1e-6"]) == 1
    assert "quality gate missed" in capsys.readouterr().out and not (tmp_path / "q").exists()
    assert main([*argv, "--max-kl", "100"]) == 0 and (tmp_path / "q" / "model.safetensors").exists()


def test_quantize_max_kl_with_a_calibration_mix(work, tmp_path):
    # a mix is no text: the gate scores the evaluation windows of its first corpus
    argv = ["quantize", str(work / "m"), "--format", "int4", "--group-size", "32", "--calib-text", "mix:docs,dialogue",
            "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(tmp_path / "q")]
    assert main([*argv, "--max-kl", "100"]) == 0 and (tmp_path / "q" / "model.safetensors").exists()


def run_and_kill(argv: list[str], when, timeout: float = 120.0) -> None:
    """Run the CLI in a child process and SIGKILL it as soon as `when()` holds (polled every ms)."""
    env = {**os.environ, "PYTHONPATH": str(Path(modelpress.__file__).parents[1]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}   # the same threads as this process: same rounding
    child = subprocess.Popen([sys.executable, "-m", "modelpress", *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not when():
            assert child.poll() is None, "the run finished before the kill point"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_killed_inside_and_between_stages_then_resumed_is_bit_identical(work):
    out = work / "killed"
    argv = ["compress", str(work / "m"), "--recipe", str(work / "recipe.yaml"), "--out", str(out)]
    stages = out / "stages"
    # 1: inside GPTQ, once its first block is on disk; 2: right after GPTQ finished (the LoRA stage starting)
    run_and_kill(argv, lambda: (stages / ".02-gptq.resume" / "block-0000.safetensors").exists())
    assert not (stages / "02-gptq").exists()
    run_and_kill(argv, lambda: (stages / "02-gptq").exists())
    assert not (stages / "03-lora").exists()
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_stages"] == 2
    assert tensor_files(out) == tensor_files(work / "whole") and len(tensor_files(out)) >= 4


def test_resume_refuses_a_changed_recipe(work, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "a.yaml").write_text(pipeline_yaml(work / "text.txt").replace("windows: 4, top_k", "windows: 2, top_k"))
    (out / "stages").mkdir(parents=True)
    (out / "recipe.json").write_text((work / "whole" / "recipe.json").read_text())
    assert main(["compress", str(work / "m"), "--recipe", str(tmp_path / "a.yaml"), "--out", str(out)]) == 2
    assert "holds a run of another recipe" in capsys.readouterr().err


def test_a_rotate_stage_keeps_the_function_and_gptq_after_it_runs_on_the_rotated_model(work, tmp_path):
    from modelpress.recipe.yaml_recipe import parse_recipe

    text = work / "text.txt"
    recipe = parse_recipe(f"""\
calibration: {{text: {text}, samples: 4, seq_len: 64}}
evaluation: {{text: {text}, windows: 2, seq_len: 64}}
reference_top_k: null
stages:
  - rotate: {{kind: orthogonal, seed: 2}}
  - gptq: {{scheme: int8/channel}}
""")
    assert recipe.stages[0] == modelpress.Rotate(kind="orthogonal", seed=2)
    report = modelpress.compress(load_model(str(work / "m")), recipe, out=tmp_path / "run")
    rotated, quantized = report.stages
    assert rotated.kind == "transform" and not rotated.report["untied_head"]    # a final norm of gain one
    assert rotated.quality["kl_divergence"] < 1e-6          # the same function as the float model (measured 2e-8)
    assert quantized.quality["kl_divergence"] < 1e-3
    saved = load_model(str(tmp_path / "run" / "stages" / "01-rotate" / "model")).model
    norm = saved.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))                      # the gains went into the weights
    assert saved.lm_head.weight is saved.model.embed_tokens.weight       # saved and loaded tied
