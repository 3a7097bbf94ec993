"""Recipes from YAML: the configs they stand for, and every mistake refused before any work with its key and
line (recipe/yaml_recipe.py)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from modelpress.algorithms.prune import StructuredConfig
from modelpress.algorithms.quantize import AWQConfig, GPTQConfig
from modelpress.api import CalibrationSettings, EvalSettings
from modelpress.recipe import Export, Gate, Recipe, RecipeError, load_recipe, parse_recipe
from modelpress.train.recover import LoRA

RECIPES = Path(__file__).parents[2] / "recipes"

GOOD = """\
calibration: {samples: 16, seq_len: 128}
evaluation:
  windows: 4
gate: {max_kl: 0.2, min_top1: 0.8}
stages:
  - structured: {target: neurons, sparsity: 0.2}
  - awq-gptq: {scheme: int4/g32, skip: [lm_head, "*down_proj"]}
  - lora: {rank: 8, steps: 10, top_k: 32}
  - evaluate
  - export: {targets: [compressed-tensors]}
"""


def test_a_recipe_is_its_configs():
    recipe = parse_recipe(GOOD)
    assert recipe.calibration == CalibrationSettings(samples=16, seq_len=128)
    assert recipe.evaluation == EvalSettings(windows=4, speed=False)     # the recipe's default: no speed run
    assert recipe.gate == Gate(max_kl=0.2, min_top1=0.8)
    assert recipe.stages == (StructuredConfig("neurons", 0.2),
                             AWQConfig("int4/g32", solver="gptq", skip=("lm_head", "*down_proj")),
                             LoRA(rank=8, steps=10, top_k=32), EvalSettings(), Export(("compressed-tensors",)))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = load_recipe(path)
    assert recipe.stages


@pytest.mark.parametrize("text, line, words", [
    ("stages:\n  - gptq: {scheme: int4/g32}\nstagez: []\n", 3, ["unknown key 'stagez'"]),
    ("stages:\n  - gptq:\n      scheme: int4/g32\n      dampp: 0.1\n", 4, ["unknown key 'dampp'", "gptq", "damp"]),
    ("stages:\n  - gptq: {scheme: int4/g32, damp: lots}\n", 2, ["damp should be a number", "'lots'"]),
    ("stages:\n  - gptq: {scheme: int4/g32}\n  - rtn:\n      scheme: int4/g32\n      skip: lm_head\n", 5,
     ["skip should be a list"]),
    ("stages:\n  - gptq: {scheme: int4/g32, act_order: 1}\n", 2, ["act_order should be true or false"]),
    ("stages:\n  - gptq: {scheme: int4/g32, damp: 1.5}\n", 2, ["gptq.damp", "damp must be in [0, 1)"]),
    ("stages:\n  - gptq: {scheme: int44/g32}\n", 2, ["gptq.scheme"]),
    ("stages:\n  - quantise: {scheme: int4/g32}\n", 2, ["unknown stage 'quantise'", "gptq", "structured", "lora"]),
    ("gate: {max_kl: -1}\nstages: [evaluate]\n", 1, ["gate.max_kl", "max_kl must be >= 0"]),
    ("evaluation: {windows: 4, windows: 5}\nstages: [evaluate]\n", 1, ["'windows' given twice"]),
    ("stages:\n  - lora: {rank: 0}\n", 2, ["lora.rank", "rank must be a positive integer"]),
    ("stages:\n  - awq-gptq: {scheme: int4/g32, solver: rtn}\n", 2, ["awq-gptq fixes solver='gptq'"]),
    ("stages:\n  - export: {targets: [gguf, onnx]}\n", 2, ["export.targets", "onnx"]),
    ("calibration: {resume_dir: /tmp/x}\nstages: [evaluate]\n", 1, ["resume_dir is set by the pipeline"]),
    ("stages:\n  - structured: {sparsity: 0.2, multiple_of: 8}\n  - export: {targets: [gguf]}\n", 1,
     ["stage 1 (structured)", "multiple_of 8", "GGUF blocks of 32", "set multiple_of to 32"]),
    ("stages:\n  - gptq: {scheme: int4/g32}\n    rtn: {scheme: int4/g32}\n", 2, ["a stage is one name"]),
])
def test_mistakes_name_the_key_and_line(text, line, words):
    with pytest.raises(RecipeError) as raised:
        parse_recipe(text, "r.yaml")
    message = str(raised.value)
    assert f"r.yaml line {line}:" in message, message
    for word in words:
        assert word in message, message


def test_a_file_that_is_not_a_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("- gptq\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe("stages: [a\n")


def test_recipes_from_python_check_their_stages():
    assert Recipe([GPTQConfig("int4/g32")]).stages == (GPTQConfig("int4/g32"),)
    with pytest.raises(Exception, match="stage 2: dict is not a stage config"):
        Recipe([GPTQConfig("int4/g32"), {"gptq": {}}])
    with pytest.raises(Exception, match="at least one of max_kl"):
        Gate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe([GPTQConfig("int4/g32")]).gate = Gate(max_kl=1)   # type: ignore[misc]
