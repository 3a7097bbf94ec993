"""The Python API (modelpress.load/quantize/prune/evaluate/save/export) and the quantizer registry, on tiny models."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_llama, char_tokenizer

import modelpress
from modelpress import GPTQ, RTN, AWQ, Mixed, SmoothQuant, SparseGPT
from modelpress.algorithms.quantize import (
    QUANTIZERS,
    Quantizer,
    config_for_method,
    method_names,
    method_of,
    register_quantizer,
)
from modelpress.api import CalibrationSettings, calibration_windows
from modelpress.cli import build_parser, main
from modelpress.errors import ModelpressError
from modelpress.nn.quant_linear import QuantLinear

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 8, "Pack my box with five dozen liquor jugs. " * 8]


def packed(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor | None]]:
    return {name: {t: getattr(m, t) for t in ("qdata", "scale", "offset", "input_perm")}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def assert_same_packing(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = packed(a), packed(b)
    assert left.keys() == right.keys() and len(left) == 14
    for name, tensors in left.items():
        for key, value in tensors.items():
            other = right[name][key]
            assert (value is None and other is None) or torch.equal(value, other), (name, key)


def test_import_modelpress_stays_cheap():
    code = "import sys, modelpress; assert 'torch' not in sys.modules, 'torch imported'; modelpress.GPTQ"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_configs_take_scheme_specs_and_names_come_from_the_registry():
    assert GPTQ("int4/g128") == GPTQ(modelpress.WeightScheme.parse("int4/g128"))
    assert method_of(AWQ("int4", solver="gptq")) == "awq-gptq" and method_of(AWQ("int4")) == "awq"
    assert config_for_method("awq-gptq", "int4/g32") == AWQ("int4/g32", solver="gptq")
    assert SmoothQuant("int8/channel/bfloat16").scale_dtype == "bfloat16"
    assert Mixed(4.5, candidates=("int4/g32", "int8")).candidates[1].spec == "int8/channel"
    with pytest.raises(ModelpressError, match="smoothquant makes W8A8"):
        SmoothQuant("int4/g128")
    with pytest.raises(ModelpressError, match="unknown quantization method 'magic'; available: rtn, gptq"):
        config_for_method("magic", "int4")
    with pytest.raises(ModelpressError, match="applies to methods smoothquant"):
        config_for_method("gptq", "int4", alpha=0.3)
    with pytest.raises(ModelpressError, match="no quantization method takes a str"):
        modelpress.quantize(build_tiny_llama(), "gptq")


def test_registry_rejects_a_duplicate_registration():
    existing = QUANTIZERS[type(RTN("int4"))]
    with pytest.raises(ModelpressError, match="already registered"):
        register_quantizer(type(RTN("int4")), existing)

    class Other:
        pass

    with pytest.raises(ModelpressError, match="'gptq' is already registered"):
        register_quantizer(Other, Quantizer("gptq", existing.run, calibrated=False, help="a second gptq"))
    assert Other not in QUANTIZERS


def test_cli_method_choices_are_the_registry_names():
    parser = build_parser(["quantize"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    method = next(a for a in sub.choices["quantize"]._actions if a.dest == "method")
    assert tuple(method.choices) == method_names() == ("rtn", "gptq", "awq", "awq-gptq", "smoothquant", "fp8-dynamic")
    assert all(name in method.help for name in method_names())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_api_quantize_equals_the_cli_bit_for_bit(tiny_llama_dir, tiny_text, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "cli"
    assert main(["quantize", str(tiny_llama_dir), "--method", method, "--format", "int4", "--group-size", "32",
                 "--calib-text", str(tiny_text), "--calib-samples", "4", "--calib-seq-len", "64",
                 "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()      # a plain HF model
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    config = {"rtn": RTN, "gptq": GPTQ}[method]("int4/g32")
    ids = calibration_windows(tokenizer, CalibrationSettings(text=str(tiny_text), samples=4, seq_len=64))
    report = modelpress.quantize(model, config, calibration=ids if method == "gptq" else None)
    assert report.method == method and report.scheme == "int4/g32" and report.layers == 14
    assert (report.calibration is None) == (method == "rtn")
    saved = json.loads((out / "modelpress.json").read_text())["report"]
    assert (saved["method"], saved["scheme"], saved["layers"]) == (report.method, report.scheme, report.layers)
    assert_same_packing(modelpress.load(str(out)).model, model)


def test_each_entry_point_on_a_plain_model(tmp_path):
    model, tokenizer, reference = build_tiny_llama(), char_tokenizer(), build_tiny_llama()
    with pytest.raises(ModelpressError, match="tokenizer"):
        modelpress.quantize(model, GPTQ("int4/g32"), calibration=TEXTS)
    report = modelpress.quantize(model, GPTQ("int4/g32"), calibration=TEXTS, tokenizer=tokenizer)
    assert report.calibration == {"text": "texts", "samples": 1, "seq_len": 512}
    assert json.loads(json.dumps(report.to_json()))["method"] == "gptq"

    ids = torch.randint(3, 99, (2, 48), generator=torch.Generator().manual_seed(0))
    result = modelpress.evaluate(model, reference=reference, text=ids,
                                 settings=modelpress.EvalSettings(speed=False))
    assert result.windows == 2 and result.seq_len == 48 and 0 < result.kl_divergence < 1
    assert result.bits_per_weight == pytest.approx(4.5) and result.to_json()["top1_agreement"] > 0.5
    by_text = modelpress.evaluate(model, text=TEXTS, tokenizer=tokenizer,
                                  settings=modelpress.EvalSettings(windows=3, seq_len=64, speed=False))
    assert by_text.windows == 3 and by_text.kl_divergence is None

    path = modelpress.save(model, tmp_path / "q", tokenizer=tokenizer, report=report)
    back = modelpress.load(str(path))
    assert_same_packing(back.model, model)
    assert json.loads((path / "modelpress.json").read_text())["report"]["method"] == "gptq"

    results = modelpress.export(back, ["hf"], tmp_path / "exported")
    assert [r.target for r in results] == ["hf"] and (tmp_path / "exported" / "hf" / "config.json").exists()
    with pytest.raises(ModelpressError, match="list of export targets"):
        modelpress.export(back, "gguf", tmp_path / "x")


def test_prune_and_mixed_through_the_api():
    model, tokenizer = build_tiny_llama(), char_tokenizer()
    pruned = modelpress.prune(model, SparseGPT(0.5), calibration=TEXTS, tokenizer=tokenizer)
    summary = pruned.to_json()
    assert summary["method"] == "sparsegpt" and summary["calibration"]["text"] == "texts"
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01)

    mixed = build_tiny_llama()
    ids = torch.randint(3, 99, (2, 32), generator=torch.Generator().manual_seed(1))
    report = modelpress.quantize(mixed, Mixed(4.6, candidates=("int3/g32", "int4/g32", "int8"),
                                               sensitivity_samples=2), calibration=ids)
    assert report.method == "rtn" and report.scheme == "mixed" and report.layers == 14
    assert report.details["mixed"]["achieved_bits_per_weight"] <= 4.6


def test_docs_api_examples_run(tmp_path, monkeypatch):
    """docs/api.md's runnable examples, as doctests (outputs checked), in a scratch directory."""
    import doctest
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    docs = Path(__file__).resolve().parents[1] / "docs" / "api.md"
    result = doctest.testfile(str(docs), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 10 and result.failed == 0


def test_head_through_the_api_equals_the_cli_and_is_a_recipe_stage(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from modelpress.recipe.yaml_recipe import parse_recipe

    out = tmp_path / "cli"
    assert main(["quantize", str(tiny_llama_dir), "--format", "int4", "--group-size", "32", "--head", "int8/g32",
                 "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    report = modelpress.quantize(model, RTN("int4/g32"), head="int8/g32")
    assert report.details["head"]["tied_embedding"] == "model.embed_tokens"
    saved = modelpress.load(str(out)).model
    left, right = packed(saved), packed(model)
    assert left.keys() == right.keys() and len(left) == 15      # 14 linear layers and the head
    for name, tensors in left.items():
        for key, value in tensors.items():
            assert (value is None and right[name][key] is None) or torch.equal(value, right[name][key]), (name, key)
    assert saved.model.embed_tokens.qdata is saved.lm_head.qdata
    recipe = parse_recipe("stages:\n  - rtn: {scheme: int4/g32}\n  - head: {scheme: int8/g32}\n")
    assert recipe.stages[1] == modelpress.Head("int8/g32")


def test_generate_takes_texts_with_a_tokenizer_and_a_draft_model(tiny_llama_dir):
    from modelpress import GenerationSettings, SamplingConfig

    loaded = modelpress.load(str(tiny_llama_dir))
    model = loaded.model.double()
    greedy = GenerationSettings(max_new_tokens=6, sampling=SamplingConfig(temperature=0))
    with pytest.raises(ModelpressError, match="a text prompt needs a tokenizer"):
        modelpress.generate(model, "the cat", greedy)
    ids = loaded.tokenizer("the cat", add_special_tokens=True)["input_ids"]
    by_text = modelpress.generate(loaded, "the cat", greedy)
    by_ids = modelpress.generate(model, ids, greedy)
    with_draft = modelpress.generate(model, torch.tensor(ids), greedy, draft=copy.deepcopy(model))
    assert by_text.tokens == by_ids.tokens == with_draft.tokens and len(by_ids.tokens) == 6
    assert with_draft.acceptance_rate == 1.0  # the draft is the model itself


def test_generate_takes_a_batch_of_prompts(tiny_llama_dir):
    """A list of texts, of id lists, or a (B, T) tensor decode as one batch, each row as it decodes alone; one
    prompt in a list is still a batch (a BatchGenerationResult)."""
    from modelpress import GenerationSettings, SamplingConfig

    loaded = modelpress.load(str(tiny_llama_dir))
    greedy = GenerationSettings(max_new_tokens=5, sampling=SamplingConfig(temperature=0))
    texts = ["the cat", "a dog ran", "hi"]
    alone = [modelpress.generate(loaded, text, greedy).tokens for text in texts]
    by_text = modelpress.generate(loaded, texts, greedy)
    ids = [loaded.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    by_ids = modelpress.generate(loaded, ids, greedy)
    by_tensor = modelpress.generate(loaded, torch.tensor([ids[0], ids[0]]), greedy)
    assert by_text.batched and by_text.tokens == by_ids.tokens == alone
    assert by_tensor.tokens == [alone[0], alone[0]]
    one = modelpress.generate(loaded, [texts[0]], greedy)
    assert type(one).__name__ == "BatchGenerationResult" and one.tokens == [alone[0]]
    with pytest.raises(ModelpressError, match="without a draft"):
        modelpress.generate(loaded, texts, greedy, draft="int4/g32")


def test_rotate_through_the_api_equals_the_cli(tmp_path):
    from conftest import build_tiny_llama, char_tokenizer, randomized
    from transformers import AutoModelForCausalLM

    tiny_llama_dir = tmp_path / "m"           # norms of gain other than one: the tied head is untied
    randomized(build_tiny_llama()).save_pretrained(tiny_llama_dir)
    char_tokenizer().save_pretrained(tiny_llama_dir)

    out = tmp_path / "cli"
    assert main(["quantize", str(tiny_llama_dir), "--format", "int4", "--group-size", "32", "--rotate",
                 "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    rotation = modelpress.rotate(model, modelpress.Rotate())
    assert rotation.untied_head and rotation.blocks == 2
    modelpress.quantize(model, RTN("int4/g32"))
    saved = modelpress.load(str(out)).model
    left, right = packed(saved), packed(model)
    assert left.keys() == right.keys() and len(left) == 14
    for name, tensors in left.items():
        for key, value in tensors.items():
            assert (value is None and right[name][key] is None) or torch.equal(value, right[name][key]), (name, key)
    assert torch.equal(saved.lm_head.weight, model.lm_head.weight)
