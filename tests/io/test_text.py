import pytest
import torch
from conftest import char_tokenizer

from modelpress.errors import ModelpressError
from modelpress.io.text import TextSource, default_corpus, load_text, make_windows


def test_default_corpus_is_deterministic_and_large():
    text = default_corpus()
    assert text == default_corpus()
    assert len(text) > 200_000


def test_eval_and_calibration_windows_are_disjoint_and_deterministic():
    source = TextSource("t", default_corpus()[:50_000])
    tok = char_tokenizer()
    first = make_windows(tok, source, seq_len=64, eval_windows=10, calib_samples=20)
    again = make_windows(tok, source, seq_len=64, eval_windows=10, calib_samples=20)
    assert torch.equal(first.eval, again.eval) and torch.equal(first.calibration, again.calibration)
    assert first.eval.shape == (10, 64) and first.calibration.shape == (20, 64)
    # windows are consecutive blocks of one token stream: calibration starts where evaluation ends
    stream = torch.tensor(tok(source.text)["input_ids"])
    assert torch.equal(torch.cat([first.eval.flatten(), first.calibration.flatten()]), stream[: 30 * 64])


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ModelpressError, match="fewer than one window"):
        make_windows(char_tokenizer(), TextSource("short", "abc"), seq_len=64, eval_windows=1)
    with pytest.raises(ModelpressError, match="asked for"):
        make_windows(char_tokenizer(), TextSource("t", "x" * 640), seq_len=64, eval_windows=8, calib_samples=8)


def test_text_file_errors(tmp_path):
    with pytest.raises(ModelpressError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ModelpressError, match="empty"):
        load_text(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ModelpressError, match="UTF-8"):
        load_text(str(binary))
    good = tmp_path / "good.txt"
    good.write_text("hello world", encoding="utf-8")
    assert load_text(str(good)).text == "hello world"
