"""Calibration windows sampled from the model itself (io/generated.py, `--calib-text generated`)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama, char_tokenizer
from modelpress.api import CalibrationSettings, calibration_windows
from modelpress.errors import ModelpressError
from modelpress.io.generated import generated_windows, start_token


def test_cold_sampling_is_greedy_decoding_of_the_full_forward():
    """At a near-zero temperature every sampled token is the argmax of the model at its prefix, computed here
    without a cache in one forward: the cached sampling loop feeds each token at the right position."""
    model, tokenizer = build_tiny_llama(seed=3), char_tokenizer()
    ids = generated_windows(model, tokenizer, samples=5, seq_len=40, temperature=1e-6, batch_size=2)
    assert ids.shape == (5, 40) and ids.dtype == torch.long
    assert (ids[:, 0] == start_token(tokenizer)).all()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.equal(logits[:, :-1].argmax(-1), ids[:, 1:])


def test_seeded_sampling_repeats_and_leaves_the_model_as_it_was():
    model, tokenizer = build_tiny_llama(seed=1).train(), char_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = generated_windows(model, tokenizer, samples=3, seq_len=16, seed=7)
    again = generated_windows(model, tokenizer, samples=3, seq_len=16, seed=7)
    other = generated_windows(model, tokenizer, samples=3, seq_len=16, seed=8)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a warm temperature samples more than the argmax path: the windows are not all the greedy ones
    greedy = generated_windows(model, tokenizer, samples=3, seq_len=16, temperature=1e-6)
    assert not torch.equal(first, greedy)


def test_start_token_prefers_the_added_bos_then_bos_then_eos():
    tokenizer = char_tokenizer()
    assert start_token(tokenizer) == tokenizer.bos_token_id      # the char tokenizer adds none, but has one
    tokenizer.bos_token = None
    assert start_token(tokenizer) == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ModelpressError, match="neither"):
        start_token(tokenizer)


def test_calibration_settings_name_generated_and_need_the_model():
    model, tokenizer = build_tiny_llama(), char_tokenizer()
    settings = CalibrationSettings(text="generated", samples=3, seq_len=12)
    with pytest.raises(ModelpressError, match="pass the model"):
        calibration_windows(tokenizer, settings)
    ids = calibration_windows(tokenizer, settings, model)
    assert ids.shape == (3, 12)
    assert torch.equal(ids, generated_windows(model, tokenizer, 3, 12))


def test_quantize_calibrates_on_generated_windows_before_changing_the_model():
    from modelpress.algorithms.quantize.gptq import GPTQConfig
    from modelpress.python_api import quantize

    model, tokenizer = build_tiny_llama(seed=2), char_tokenizer()
    expected = generated_windows(build_tiny_llama(seed=2), tokenizer, 4, 32)    # sampled from the float model
    report = quantize(model, GPTQConfig("int4/g32"), CalibrationSettings(text="generated", samples=4, seq_len=32),
                      tokenizer=tokenizer)
    assert report.calibration == {"text": "generated", "samples": 4, "seq_len": 32}
    reference = build_tiny_llama(seed=2)
    from modelpress.algorithms.quantize.gptq import quantize_gptq

    quantize_gptq(reference, GPTQConfig("int4/g32"), expected)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_generated_is_not_an_evaluation_text_nor_for_streamed_models():
    from modelpress.io.text import load_text

    with pytest.raises(ModelpressError, match="calibration source"):
        load_text("generated")
    model = build_tiny_llama()
    model.model.layers[0].to("meta")
    with pytest.raises(ModelpressError, match="streamed"):
        generated_windows(model, char_tokenizer(), 2, 8)


def test_a_mix_takes_turns_between_a_corpus_and_generated_windows():
    model, tokenizer = build_tiny_llama(), char_tokenizer()
    mixed = calibration_windows(tokenizer, CalibrationSettings(text="mix:docs,generated", samples=5, seq_len=16),
                                model)
    docs = calibration_windows(tokenizer, CalibrationSettings(text="docs", samples=5, seq_len=16))
    generated = generated_windows(model, tokenizer, 3, 16)         # a part samples only its turns: ceil(5 / 2)
    assert mixed.shape == (5, 16)
    assert torch.equal(mixed[0::2], docs[:3]) and torch.equal(mixed[1::2], generated[:2])


def test_a_users_text_file_joins_a_mix_with_generated_windows(tmp_path):
    from modelpress.io.corpora import mix_parts

    model, tokenizer = build_tiny_llama(), char_tokenizer()
    text = tmp_path / "mine.txt"
    text.write_text("Our support tickets, one per paragraph.\n\n" * 1000, encoding="utf-8")
    spec = f"mix:{text},generated"
    assert mix_parts(spec) == (str(text), "generated")
    mixed = calibration_windows(tokenizer, CalibrationSettings(text=spec, samples=4, seq_len=16), model)
    own = calibration_windows(tokenizer, CalibrationSettings(text=str(text), samples=4, seq_len=16))
    assert torch.equal(mixed[0::2], own[:2]) and torch.equal(mixed[1::2], generated_windows(model, tokenizer, 2, 16))
    with pytest.raises(ModelpressError, match="not found: .*missing.txt"):
        mix_parts(f"mix:{tmp_path / 'missing.txt'},generated")


def test_a_recipe_samples_generated_windows_once_from_the_float_model(tmp_path, monkeypatch):
    """Every calibrated stage of a pipeline reads the windows sampled from the original float model before the
    first stage, not new samples of the model as the earlier stages left it."""
    import modelpress
    import modelpress.api as api
    import modelpress.algorithms.prune.calibrated as calibrated
    import modelpress.engine.runner as runner
    from modelpress.algorithms.prune.wanda import WandaConfig
    from modelpress.algorithms.quantize import GPTQConfig
    from modelpress.api import EvalSettings
    from modelpress.io.model import LoadedModel
    from modelpress.io.text import default_corpus
    from modelpress.recipe import Recipe

    text = tmp_path / "text.txt"
    text.write_text(default_corpus()[:60_000], encoding="utf-8")
    model, tokenizer = build_tiny_llama(seed=4), char_tokenizer()
    float_weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    seen, windows = [], []

    def sampler(sampled, *args, **kwargs):
        seen.append(sampled.model.layers[0].mlp.up_proj.weight.detach().clone())
        windows.append(generated_windows(sampled, *args, **kwargs))
        return windows[-1]

    monkeypatch.setattr(api, "generated_windows", sampler)
    stage_ids = []
    real_run = runner.run_sequential

    def run_sequential(model, algorithm, ids, *args, **kwargs):
        stage_ids.append(ids.clone())
        return real_run(model, algorithm, ids, *args, **kwargs)

    monkeypatch.setattr(runner, "run_sequential", run_sequential)
    monkeypatch.setattr(calibrated, "run_sequential", run_sequential)     # the pruners import it by name
    recipe = Recipe([WandaConfig(sparsity=0.5, compress=False), GPTQConfig("int4/g32")],
                    calibration=CalibrationSettings(text="generated", samples=4, seq_len=24),
                    evaluation=EvalSettings(text=str(text), windows=2, seq_len=32, speed=False), reference_top_k=None)
    modelpress.compress(LoadedModel(model, tokenizer, "tiny", "tiny"), recipe, out=tmp_path / "out")
    assert len(seen) == 1 and torch.equal(seen[0], float_weight)     # sampled once, from the float model
    assert len(stage_ids) == 2 and all(torch.equal(ids, windows[0]) for ids in stage_ids)   # Wanda, then GPTQ
    with pytest.raises(ModelpressError, match="set by the pipeline"):
        Recipe([GPTQConfig("int4/g32")], calibration=CalibrationSettings(windows=torch.zeros(1, 4, dtype=torch.long)))
