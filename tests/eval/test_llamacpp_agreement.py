"""Our perplexity agrees with llama.cpp's own `llama-perplexity` on the same GGUF and text, with and without a
BOS token at the start of every window (issue 16: scored the way llama.cpp scores, second half of each
window; our windows by the default BOS rule, llama.cpp's "overwrite"). Runs when llama.cpp's tools are installed (bash scripts/install_llamacpp.sh)."""

from __future__ import annotations

import copy

import pytest

import modelpress
from modelpress.api import EvalSettings
from modelpress.export import export_model, llamacpp
from modelpress.export.gguf import GGUF_FILE
from modelpress.io.model import load_model
from modelpress.io.text import load_text, tokenizer_bos

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not llamacpp.available(),
                                 reason="llama.cpp tools not installed (bash scripts/install_llamacpp.sh)")]
WINDOWS, SEQ_LEN = 6, 256


@pytest.mark.parametrize("bos", [False, True], ids=["as-shipped", "bos-added"])
def test_perplexity_agrees_with_llama_perplexity_within_1_percent(default_model, tmp_path, bos):
    loaded = copy.deepcopy(default_model)
    if bos:   # the default model's tokenizer adds no BOS; this one does, and the GGUF says so
        loaded.tokenizer.add_bos_token = True
    assert (tokenizer_bos(loaded.tokenizer) is not None) == bos
    modelpress.quantize(loaded, modelpress.RTN("int8/g32"))            # Q8_0 blocks, exported bit for bit
    result = export_model(loaded, ["gguf"], tmp_path / "out")[0]
    assert result.lossless
    gguf = tmp_path / "out" / "gguf" / GGUF_FILE
    text = tmp_path / "text.txt"
    text.write_text(load_text(None).text[:60_000])

    theirs = llamacpp.perplexity(gguf, text, SEQ_LEN, WINDOWS, threads=2)
    exported = load_model(str(gguf))
    assert (tokenizer_bos(exported.tokenizer) is not None) == bos   # the GGUF carries the BOS rule back
    ours = modelpress.evaluate(exported, text=str(text),
                               settings=EvalSettings(windows=WINDOWS, seq_len=SEQ_LEN, speed=False,
                                                     score="second-half"))
    assert ours.bos == bos
    assert abs(ours.perplexity / theirs - 1) < 0.01, (ours.perplexity, theirs)
