import json
import os

import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel, load_model
from modelpress.io.save import load_compressed, save_compressed
from modelpress.nn.quant_linear import QuantLinear


def quantized_tiny(spec: str) -> LoadedModel:
    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    return LoadedModel(model, char_tokenizer(), source="tiny", float_source="tiny-float")


@pytest.mark.parametrize("spec", ["int4/g32", "int3-asym/g64", "int4-asym/g32/zp", "nf4/g64/dq", "fp8-e4m3/channel",
                                  "ternary/tensor"])
def test_reload_is_bit_identical_with_identical_logits(tmp_path, spec):
    loaded = quantized_tiny(spec)
    save_compressed(loaded, tmp_path / "out")
    again = load_compressed(tmp_path / "out")
    before, after = loaded.model.state_dict(), again.model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name
    ids = torch.randint(0, 100, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, again.model(ids).logits)
    assert again.float_source == "tiny-float"
    assert sum(isinstance(m, QuantLinear) for m in again.model.modules()) == 14  # 2 blocks x 7 linears


def test_tied_weights_stay_one_parameter(tmp_path):
    loaded = quantized_tiny("int4/g32")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    save_compressed(loaded, tmp_path / "out")
    again = load_compressed(tmp_path / "out").model
    assert again.lm_head.weight is again.model.embed_tokens.weight
    names = {n for n, _ in again.named_parameters()}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_saved_file_holds_packed_bytes_not_float_weights(tmp_path):
    loaded = quantized_tiny("int4/g32")
    save_compressed(loaded, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "modelpress.json").read_text())
    assert "lm_head.weight" in meta["tied"]  # tied head stored once
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.qdata" in keys
    assert "model.layers.0.mlp.up_proj.weight" not in keys
    packed = sum(m.weight_nbytes for m in loaded.model.modules() if isinstance(m, QuantLinear))
    params = sum(m.in_features * m.out_features for m in loaded.model.modules() if isinstance(m, QuantLinear))
    assert packed * 8 / params == pytest.approx(4.5, rel=0.03)  # int4 + fp16 scale per 32


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    loaded = quantized_tiny("int4/g32")
    import modelpress.io.save as save_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "save_file", broken)
    with pytest.raises(OSError):
        save_compressed(loaded, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_then_replaced_whole(tmp_path):
    loaded = quantized_tiny("int4/g32")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ModelpressError, match="already exists"):
        save_compressed(loaded, tmp_path / "out")
    with pytest.raises(ModelpressError, match="not written by modelpress"):  # not ours: never replaced
        save_compressed(loaded, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    save_compressed(loaded, tmp_path / "out", overwrite=True)       # empty: filled
    (tmp_path / "out" / "keep.txt").write_text("stale")
    save_compressed(loaded, tmp_path / "out", overwrite=True)       # ours: replaced whole
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    save_compressed(quantized_tiny("int4/g32"), tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelpressError, match="model.safetensors is damaged"):
        load_model(str(tmp_path / "out"))


def test_quantized_tied_head_round_trips_bit_for_bit_with_one_stored_table(tmp_path):
    from modelpress.api import quantize_model
    from modelpress.nn.quant_embedding import QuantEmbedding

    loaded = LoadedModel(build_tiny_llama(), char_tokenizer(), source="tiny", float_source="tiny-float")
    quantize_model(loaded, RTNConfig("int4/g32"), head="int8/g32")
    save_compressed(loaded, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "modelpress.json").read_text())
    assert meta["layers"]["model.embed_tokens"]["kind"] == "quant_embedding"
    assert meta["layers"]["lm_head"]["kind"] == "quant_linear"
    assert meta["tied"] == {"lm_head.qdata": "model.embed_tokens.qdata", "lm_head.scale": "model.embed_tokens.scale"}
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.qdata" in keys and not any(k.startswith("lm_head") for k in keys)
    assert not any(k.endswith("embed_tokens.weight") for k in keys)
    again = load_compressed(tmp_path / "out").model
    embedding = again.model.embed_tokens
    assert isinstance(embedding, QuantEmbedding) and embedding.tied_head is again.lm_head
    assert embedding.qdata is again.lm_head.qdata and embedding.scale is again.lm_head.scale
    before, after = loaded.model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, again(ids).logits)


def test_quantize_head_flag_end_to_end_shrinks_the_saved_model(tiny_llama_dir, tiny_text, tmp_path, capsys):
    from modelpress.cli import main

    plain, head = tmp_path / "plain", tmp_path / "head"
    common = ["quantize", str(tiny_llama_dir), "--format", "int4", "--group-size", "32"]
    assert main(common + ["--out", str(plain)]) == 0
    assert main(common + ["--head", "int8/g32", "--out", str(head), "--json", str(tmp_path / "q.json")]) == 0
    assert "output head int8/g32, tied embedding" in capsys.readouterr().out
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["head"]["tied_embedding"] == "model.embed_tokens"
    size = {p: (p / "model.safetensors").stat().st_size for p in (plain, head)}
    table = report["head"]["float_bytes"] - report["head"]["packed_bytes"]
    assert size[plain] - size[head] == pytest.approx(table, abs=4096)    # the float table, now packed, once
    out = tmp_path / "eval.json"
    assert main(["eval", str(head), "--text", str(tiny_text), "--windows", "2", "--seq-len", "64", "--no-speed",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kl_divergence"] > 0 and data["reference"] == str(tiny_llama_dir)
    assert main(common + ["--head", "int4/g32/dq", "--out", str(tmp_path / "bad")]) == 2
    assert "double-quantized" in capsys.readouterr().err and not (tmp_path / "bad").exists()
