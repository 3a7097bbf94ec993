import pytest
import torch
from conftest import char_tokenizer

from modelpress.api import CalibrationSettings, calibration_windows, interleave
from modelpress.errors import ModelpressError
from modelpress.io import corpora
from modelpress.io.text import default_corpus, load_text, make_windows


def test_docs_is_the_default_corpus():
    assert load_text("docs").text == default_corpus() == load_text(None).text


def test_bible_is_verse_text_without_references():
    text = load_text("bible").text
    assert text.startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created the heaven")
    assert len(text) > 3_000_000
    assert not any(corpora._is_reference(word) for word in text[:200_000].split())
    assert text.rstrip().endswith("Amen.")


def test_dialogue_alternates_turns():
    text = load_text("dialogue").text
    conversations = text.split("\n\n")
    assert len(conversations) > 500 and len(text) > 150_000
    assert all(len(c.splitlines()) >= 2 for c in conversations[:50])


def test_mix_is_not_a_text_and_bad_mixes_are_refused():
    with pytest.raises(ModelpressError, match="calibration mix"):
        load_text("mix")
    assert corpora.mix_parts("mix") == corpora.MIX_PARTS
    assert corpora.mix_parts("mix:bible,docs") == ("bible", "docs")
    assert corpora.mix_parts("docs") is None
    for bad in ("mix:", "mix:docs,docs", "mix:docs,novels"):
        with pytest.raises(ModelpressError, match="named corpora"):
            corpora.mix_parts(bad)


def test_interleave_takes_turns_and_fills_from_longer_parts():
    a, b = torch.arange(6).view(3, 2), torch.arange(100, 102).view(1, 2)
    assert interleave([a, b], 4).tolist() == [[0, 1], [100, 101], [2, 3], [4, 5]]
    assert interleave([a, b], 10).shape == (4, 2)


def test_mix_windows_alternate_and_avoid_every_parts_evaluation_windows(monkeypatch):
    rng = torch.Generator().manual_seed(0)
    texts = {name: "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (3200,), generator=rng))
             for name in corpora.MIX_PARTS}
    monkeypatch.setattr(corpora, "CORPORA", {k: (k, lambda t=t: t) for k, t in texts.items()})
    monkeypatch.setattr("modelpress.io.text.CORPORA", corpora.CORPORA)
    tok = char_tokenizer()
    settings = CalibrationSettings(text="mix", samples=9, seq_len=32, eval_tokens=4 * 32, bos=False)
    mixed = calibration_windows(tok, settings)
    assert mixed.shape == (9, 32)
    for i, name in enumerate(corpora.MIX_PARTS):
        own = make_windows(tok, load_text(name), 32, 4, 3)
        assert torch.equal(mixed[i::3], own.calibration)                  # its windows, in turn
        evaluated = "".join(tok.convert_ids_to_tokens(own.eval.reshape(-1).tolist()))
        assert texts[name].startswith(evaluated)                           # evaluation: the first 128 chars
        for row in mixed[i::3]:
            assert texts[name].index("".join(tok.convert_ids_to_tokens(row.tolist()))) >= len(evaluated)
