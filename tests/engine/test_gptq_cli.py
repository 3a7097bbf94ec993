"""`modelpress quantize --method gptq` end to end on a tiny model, and calibration windows."""

import json

import torch
from conftest import CharTokenizer

from modelpress.api import CalibrationSettings, calibration_windows
from modelpress.cli import main
from modelpress.io.text import load_text


def test_quantize_gptq_then_eval(tiny_llama_dir, tiny_text, tmp_path):
    out, report_file, eval_file = tmp_path / "q", tmp_path / "q.json", tmp_path / "e.json"
    assert main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--format", "int4", "--group-size", "32",
                 "--calib-text", str(tiny_text), "--calib-samples", "4", "--calib-seq-len", "64",
                 "--resume", str(tmp_path / "resume"), "--out", str(out), "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["method"] == "gptq" and report["scheme"] == "int4/g32" and report["layers"] == 14
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
