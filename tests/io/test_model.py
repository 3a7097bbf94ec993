import shutil

import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.io.model import load_model


def test_load_hf_directory(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.tokenizer is not None
    assert loaded.float_source == str(tiny_llama_dir)
    with torch.no_grad():
        assert loaded.model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 320)


def test_load_hub_id_resolves_from_local_hub_cache(tiny_llama_dir, tmp_path, monkeypatch):
    # the hub-id code path, fed by a hub cache laid out as huggingface_hub writes it (no network)
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama_dir, snapshot)
    refs = tmp_path / "hub" / "models--acme--tiny-llama" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_model("acme/tiny-llama")
    assert loaded.source == "acme/tiny-llama"
    assert sum(p.numel() for p in loaded.model.parameters()) > 0


def test_missing_paths_and_bad_files(tmp_path):
    with pytest.raises(ModelpressError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelpressError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelpressError, match="not a GGUF file"):
        load_model(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ModelpressError, match="cannot read GGUF"):
        load_model(str(truncated))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ModelpressError, match="without config.json"):
        load_model(str(tmp_path / "emptydir"))
