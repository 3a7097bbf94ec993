import logging

import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer

from modelpress.api import CalibrationSettings, EvalSettings, calibration_windows, evaluate_models, prepare_windows
from modelpress.errors import ModelpressError
from modelpress.io.model import LoadedModel
from modelpress.io.text import TextSource, default_corpus, load_text, make_windows, tokenizer_bos

BOS = 1     # "<s>" in char_tokenizer's vocabulary


def bos_tokenizer():
    """char_tokenizer with a post-processor that starts every text with <s>, as Llama-style tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


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
        make_windows(char_tokenizer(), TextSource("t", "x" * 640), seq_len=64, eval_windows=11)
    with pytest.raises(ModelpressError, match="asked for"):   # no calibration window left after evaluation
        make_windows(char_tokenizer(), TextSource("t", "x" * 640), seq_len=64, eval_windows=10, calib_samples=1)


def test_short_calibration_text_gives_fewer_windows_with_a_warning(caplog):
    source = TextSource("t", default_corpus()[:64 * 10])
    with caplog.at_level(logging.WARNING, logger="modelpress.io.text"):
        windows = make_windows(char_tokenizer(), source, seq_len=64, eval_windows=8, calib_samples=8)
    assert windows.calibration.shape == (2, 64)
    assert "holds only 2 windows" in caplog.text and "asked for 8" in caplog.text


def test_repeated_calibration_text_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="modelpress.io.text"):
        make_windows(char_tokenizer(), TextSource("t", "abcd" * 64), seq_len=16, eval_windows=1, calib_samples=4)
    assert "1 of its 4 calibration windows are distinct" in caplog.text


def test_bos_is_detected_from_the_tokenizer():
    assert tokenizer_bos(bos_tokenizer()) == BOS
    assert tokenizer_bos(char_tokenizer()) is None        # has a bos_token but does not add it


def test_bos_windows_prepend_tile_the_text_with_no_gap():
    source = TextSource("t", default_corpus()[:50_000])
    tok = bos_tokenizer()
    windows = make_windows(tok, source, seq_len=64, eval_windows=10, calib_samples=20, bos=tokenizer_bos(tok),
                           bos_mode="prepend")
    both = torch.cat([windows.eval, windows.calibration])
    assert both.shape == (30, 64) and windows.bos == BOS and windows.bos_mode == "prepend"
    assert (both[:, 0] == BOS).all() and not (both[:, 1:] == BOS).any()
    stream = torch.tensor(tok(source.text, add_special_tokens=False)["input_ids"])
    assert torch.equal(both[:, 1:].flatten(), stream[: 30 * 63])    # 63 text tokens per window, no gap


def test_bos_windows_overwrite_are_llama_cpp_chunks():
    """llama-perplexity: tokenize with the BOS, cut blocks of n_ctx, set each block's first token to BOS."""
    source = TextSource("t", default_corpus()[:50_000])
    tok = bos_tokenizer()
    windows = make_windows(tok, source, seq_len=64, eval_windows=10, calib_samples=20, bos=tokenizer_bos(tok))
    assert windows.bos_mode == "overwrite"                 # the default
    both = torch.cat([windows.eval, windows.calibration])
    assert (both[:, 0] == BOS).all() and not (both[:, 1:] == BOS).any()
    chunks = torch.tensor(tok(source.text)["input_ids"])[: 30 * 64].view(30, 64).clone()
    assert chunks[0, 0] == BOS                             # the tokenizer's own BOS starts the text
    chunks[:, 0] = BOS
    assert torch.equal(both, chunks)


def test_settings_apply_the_bos_rule_to_evaluation_and_calibration(tiny_text):
    tok = bos_tokenizer()
    _, on = prepare_windows(tok, EvalSettings(text=str(tiny_text), windows=4, seq_len=32))
    _, off = prepare_windows(tok, EvalSettings(text=str(tiny_text), windows=4, seq_len=32, bos=False))
    assert (on.eval[:, 0] == BOS).all() and not (off.eval == BOS).any()
    stream = torch.tensor(tok(tiny_text.read_text(), add_special_tokens=False)["input_ids"])
    for mode, stride in (("overwrite", 32), ("prepend", 31)):
        calib = calibration_windows(tok, CalibrationSettings(text=str(tiny_text), samples=3, seq_len=32,
                                                             eval_tokens=4 * 32, bos_mode=mode))
        assert (calib[:, 0] == BOS).all() and not (calib[:, 1:] == BOS).any()
        # calibration text starts after whole windows covering the 4 x 32 evaluation tokens: 4 of 32 text
        # tokens under overwrite (32 from one start to the next, 31 read), 5 of 31 under prepend
        first = -(-4 * 32 // stride)
        expected = torch.stack([stream[(first + i) * stride: (first + i) * stride + 31] for i in range(3)])
        assert torch.equal(calib[:, 1:], expected), mode
    plain = calibration_windows(tok, CalibrationSettings(text=str(tiny_text), samples=3, seq_len=32,
                                                         eval_tokens=4 * 32, bos=False))
    assert not (plain == BOS).any()
    with pytest.raises(ModelpressError, match="BOS window rule 'skip'"):
        EvalSettings(bos_mode="skip")


def test_a_tokenizer_without_bos_gives_the_same_windows_either_way(tiny_text):
    tok = char_tokenizer()
    _, on = prepare_windows(tok, EvalSettings(text=str(tiny_text), windows=4, seq_len=32))
    _, off = prepare_windows(tok, EvalSettings(text=str(tiny_text), windows=4, seq_len=32, bos=False))
    assert torch.equal(on.eval, off.eval) and on.bos is None
    plain = make_windows(tok, load_text(str(tiny_text)), seq_len=32, eval_windows=4)
    assert torch.equal(on.eval, plain.eval)


def test_the_report_says_which_windows_and_scoring_were_used(tiny_text):
    loaded = LoadedModel(build_tiny_llama(), bos_tokenizer(), source="tiny", float_source="tiny")
    for bos, score in ((True, "second-half"), (False, "all")):
        settings = EvalSettings(text=str(tiny_text), windows=2, seq_len=32, speed=False, bos=bos, score=score)
        report = evaluate_models({"m": loaded}, None, settings)["m"]
        assert report.to_dict()["bos"] is bos and report.to_dict()["score"] == score
        assert report.to_dict()["bos_mode"] == "overwrite"


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


def test_the_cli_passes_the_bos_rule_to_evaluation_and_calibration():
    from modelpress.cli import build_parser
    from modelpress.commands.common import calibration_settings, eval_settings

    def parse(argv):
        return build_parser(argv).parse_args(argv)

    assert calibration_settings(parse(["quantize", "m", "--method", "gptq", "--out", "o",
                                       "--calib-bos-mode", "prepend"])).bos_mode == "prepend"
    assert eval_settings(parse(["eval", "m", "--bos-mode", "prepend"])).bos_mode == "prepend"
    assert eval_settings(parse(["eval", "m"])).bos_mode == "overwrite"


@pytest.mark.parametrize("mode", ["overwrite", "prepend"])
def test_a_text_shorter_than_a_window_is_one_bos_led_window_either_way(mode):
    from modelpress.python_api import eval_windows

    tok = bos_tokenizer()
    _, windows = eval_windows(tok, ["hello there"], EvalSettings(seq_len=64, bos_mode=mode))
    text = tok("hello there", add_special_tokens=False)["input_ids"]
    assert windows.eval.tolist() == [[BOS, *text]]
