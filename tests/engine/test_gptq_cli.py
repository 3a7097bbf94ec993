"""`modelpress quantize --method gptq` end to end on a tiny model, and calibration windows."""

import json

import pytest
import torch
from conftest import CharTokenizer

from modelpress.api import CalibrationSettings, calibration_windows
from modelpress.cli import main
from modelpress.io.model import load_model
from modelpress.io.text import load_text
from modelpress.nn.quant_linear import QuantLinear


@pytest.mark.parametrize("static", [True, False])
def test_quantize_gptq_then_eval(tiny_llama_dir, tiny_text, tmp_path, static):
    out, report_file, eval_file = tmp_path / "q", tmp_path / "q.json", tmp_path / "e.json"
    layout = [] if static else ["--no-static-groups"]
    assert main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--format", "int4", "--group-size", "32",
                 "--calib-text", str(tiny_text), "--calib-samples", "4", "--calib-seq-len", "64", *layout,
                 "--resume", str(tmp_path / "resume"), "--out", str(out), "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["method"] == "gptq" and report["scheme"] == "int4/g32" and report["layers"] == 14
    assert report["static_groups"] is static
    layers = [m for m in load_model(str(out)).model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    # static groups: the scheme's own layout, 4 bits + a float16 scale per 32 weights; permuted: + int32 per input
    assert all((m.input_perm is None) == static for m in layers)
    assert (report["bits_per_weight"] == pytest.approx(4.5)) == static
    assert report["calibration"]["samples"] == 4 and report["unobserved_layers"] == []
    assert (tmp_path / "resume" / "state.json").exists()
    assert main(["eval", str(out), "--text", str(tiny_text), "--windows", "2", "--seq-len", "64", "--no-speed",
                 "--json", str(eval_file)]) == 0
    result = json.loads(eval_file.read_text())
    assert result["reference"] == str(tiny_llama_dir)
    assert result["kl_divergence"] is not None and 0 <= result["kl_divergence"] < 1
    assert result["bits_per_weight"] < 5


def test_calibration_windows_come_after_the_evaluation_text(tiny_text):
    tokenizer = CharTokenizer()
    ids = torch.tensor(tokenizer(load_text(str(tiny_text)).text)["input_ids"])
    windows = calibration_windows(tokenizer, CalibrationSettings(text=str(tiny_text), samples=3, seq_len=100))
    start = 205 * 100  # 40 x 512 evaluation tokens, rounded up to whole 100-token windows
    assert torch.equal(windows, ids[start : start + 300].view(3, 100))


def test_no_static_groups_is_refused_for_methods_without_gptq(tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--format", "int4", "--no-static-groups",
                 "--out", str(tmp_path / "q")]) == 2
    assert "applies to methods gptq and awq-gptq" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quantize_diagnose_prints_and_reports_calibration_coverage(tiny_llama_dir, tiny_text, tmp_path, capsys):
    report_file = tmp_path / "q.json"
    assert main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--format", "int4", "--group-size", "32",
                 "--calib-text", str(tiny_text), "--calib-samples", "4", "--calib-seq-len", "64",
                 "--diagnose", str(tiny_text), "--out", str(tmp_path / "q"), "--json", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert "token coverage" in out and "activation distance" in out
    diagnostics = json.loads(report_file.read_text())["calibration_diagnostics"]
    assert diagnostics["evaluation_text"] == str(tiny_text) and diagnostics["calibration_windows"] == 4
    assert 0 < diagnostics["token_coverage"] <= 1
    assert len(diagnostics["block_activation_distance"]) == 2 and diagnostics["mean_activation_distance"] > 0
