import json

import pytest
from transformers import AutoModelForCausalLM

from modelpress.cli import main
from modelpress.io.model import load_model
from modelpress.nn.sparse_linear import SparseLinear


def _calib(tiny_text):
    return ["--calib-text", str(tiny_text), "--calib-samples", "2", "--calib-seq-len", "32", "--calib-batch-size", "2"]


def test_prune_wanda_2_4_writes_a_compressed_model(tiny_llama_dir, tiny_text, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "report.json"
    code = main(["prune", str(tiny_llama_dir), "--method", "wanda", "--pattern", "2:4", *_calib(tiny_text),
                 "--out", str(out), "--json", str(report)])
    assert code == 0
    info = json.loads(report.read_text())
    assert info["method"] == "wanda" and info["target"] == "2:4" and info["sparsity"] == 0.5
    assert info["bytes_ratio"] < 0.6 and info["calibration"]["samples"] == 2
    assert "-> " in capsys.readouterr().out
    model = load_model(str(out)).model
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 14 and all(m.pattern == (2, 4) for m in layers)


def test_prune_structured_heads_loads_in_plain_transformers(tiny_llama_dir, tiny_text, tmp_path):
    out = tmp_path / "heads"
    assert main(["prune", str(tiny_llama_dir), "--method", "structured", "--target", "heads", "--sparsity", "0.5",
                 *_calib(tiny_text), "--out", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.num_key_value_heads == 1 and plain.model.layers[0].self_attn.o_proj.in_features == 48


def test_prune_magnitude_needs_no_calibration_text(tiny_llama_dir, tmp_path):
    out = tmp_path / "mag"
    assert main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.3", "--scope", "global",
                 "--out", str(out)]) == 0
    layers = [m for m in load_model(str(out)).model.modules() if isinstance(m, SparseLinear)]
    kept = sum(m.nnz for m in layers) / sum(m.in_features * m.out_features for m in layers)
    assert kept == pytest.approx(0.7, abs=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--method", "magnitude", "--sparsity", "1.5"], "1.5"),
    (["--method", "wanda", "--pattern", "4:2"], "4:2"),
    (["--method", "wanda", "--sparsity", "0.5", "--quantize", "int4"], "--quantize"),
    (["--method", "magnitude", "--sparsity", "0.3", "--pattern", "2:4"], "disagrees"),
    (["--method", "structured", "--target", "heads"], "--sparsity"),
])
def test_prune_bad_arguments_give_one_line_errors(tiny_llama_dir, tmp_path, capsys, args, message):
    code = main(["prune", str(tiny_llama_dir), *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and not (tmp_path / "x").exists()
