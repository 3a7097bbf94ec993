"""`modelpress distill` and `modelpress finetune` on tiny saved models."""

import json
import re

import pytest
import torch
from conftest import save_tiny_llama

from modelpress.cli import main
from modelpress.io.model import load_model
from modelpress.nn.quant_linear import QuantLinear
from modelpress.train.lora import load_adapters

FAST = ("--steps", "2", "--seq-len", "32", "--train-windows", "4", "--lr", "1e-3")


def run_cli(*args):
    return main([str(a) for a in args])


def test_distill_with_a_cached_top_k_teacher(tmp_path, tiny_text):
    teacher = save_tiny_llama(tmp_path / "teacher", seed=0)
    student = save_tiny_llama(tmp_path / "student", seed=1, num_hidden_layers=1)
    cache, report = tmp_path / "cache.safetensors", tmp_path / "r.json"
    out = tmp_path / "out"
    code = run_cli("distill", "--teacher", teacher, "--student", student, "--text", tiny_text, *FAST,
                   "--top-k", "8", "--cache", cache, "--temperature", "2", "--alpha", "0.5", "--out", out,
                   "--json", report)
    assert code == 0 and cache.exists()
    data = json.loads(report.read_text())
    assert data["steps"] == 2 and data["top_k"] == 8 and data["windows"] == 4 and data["seq_len"] == 32
    loaded = load_model(str(out))
    assert loaded.model.config.num_hidden_layers == 1
    trained = loaded.model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    original = load_model(str(student)).model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, original)
    # an existing cache is reused: the teacher is not even loaded
    code = run_cli("distill", "--teacher", tmp_path / "missing", "--student", student, "--text", tiny_text, *FAST,
                   "--top-k", "8", "--cache", cache, "--temperature", "2", "--out", out, "--overwrite")
    assert code == 0


def test_distill_refuses_a_student_with_another_vocabulary(tmp_path, tiny_text, capsys):
    teacher = save_tiny_llama(tmp_path / "teacher", seed=0)
    student = save_tiny_llama(tmp_path / "student", seed=1, vocab_size=256)
    code = run_cli("distill", "--teacher", teacher, "--student", student, "--text", tiny_text, *FAST,
                   "--out", tmp_path / "out")
    assert code == 2
    assert "teacher has 320 outputs, student 256" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_finetune_qat_saves_packed_layers(tmp_path, tiny_text):
    model = save_tiny_llama(tmp_path / "m")
    out = tmp_path / "qat"
    assert run_cli("finetune", model, "--qat", "int4/g32", "--text", tiny_text, *FAST, "--out", out) == 0
    meta = json.loads((out / "modelpress.json").read_text())
    assert len(meta["layers"]) == 14 and meta["report"]["mode"] == "qat"
    loaded = load_model(str(out))
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14


@pytest.mark.parametrize("merge", ["rtn", "none"])
def test_finetune_qlora_merges_or_keeps_adapters_apart(tmp_path, tiny_text, merge):
    model = save_tiny_llama(tmp_path / "m")
    out = tmp_path / "lora"
    code = run_cli("finetune", model, "--lora", "--quantize", "int4/g32", "--rank", "4", "--merge", merge,
                   "--text", tiny_text, *FAST, "--out", out)
    assert code == 0 and (out / "adapters.safetensors").exists()
    loaded = load_model(str(out))
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14
    if merge == "none":
        assert len(load_adapters(loaded.model, out / "adapters.safetensors")) == 14


def test_finetune_lora_on_a_float_model_needs_a_teacher_choice(tmp_path, tiny_text, capsys):
    model = save_tiny_llama(tmp_path / "m")
    assert run_cli("finetune", model, "--lora", "--text", tiny_text, *FAST, "--out", tmp_path / "x") == 2
    assert "--teacher none" in capsys.readouterr().err


# a loss that becomes NaN (a learning rate that blows the weights up) stops the run; nothing is written

BLOW_UP = ("--steps", "8", "--seq-len", "16", "--train-windows", "2", "--lr", "1e30")


@pytest.mark.parametrize("command, precision", [("distill", "fp32"), ("distill", "fp16"),
                                                ("finetune-lora", "bf16"), ("finetune-qat", "fp32")])
def test_nan_loss_stops_training_and_saves_nothing(tmp_path, tiny_text, capsys, command, precision):
    model = save_tiny_llama(tmp_path / "m")
    out = tmp_path / "out"
    argv = {"distill": ["distill", "--teacher", model, "--student", model],
            "finetune-lora": ["finetune", model, "--lora", "--quantize", "int4/g32", "--teacher", "none"],
            "finetune-qat": ["finetune", model, "--qat", "int4/g32", "--teacher", "none"]}[command]
    capsys.readouterr()
    assert run_cli(*argv, "--text", tiny_text, *BLOW_UP, "--precision", precision, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    diverged = r"(training loss|gradients) became .* the weights are those after step|QAT weights left what int4/g32"
    assert re.search(diverged, err), err
    assert f"--out {out} was not created" in err, err
    if precision == "fp16":
        assert "consecutive steps" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    if command == "distill":   # an existing output is left as it was
        out.mkdir()
        (out / "modelpress.json").write_text("{}")
        assert run_cli(*argv, "--text", tiny_text, *BLOW_UP, "--precision", precision, "--out", out,
                       "--overwrite") == 2
        assert f"the existing {out} is left as it was" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == ["modelpress.json"]
