"""Recipes: ordered stages (prune, quantize, recover, evaluate, export) run as one pipeline, from Python
(`modelpress.compress(model, Recipe([...]), data)`) or YAML (`modelpress compress MODEL --recipe FILE`).
stages.py names the stages, yaml_recipe.py reads a file, run.py runs it, gate.py judges the result."""

from modelpress.recipe.stages import Export, Gate, Recipe, stage_names
from modelpress.recipe.yaml_recipe import RecipeError, load_recipe, parse_recipe

__all__ = ["Export", "Gate", "Recipe", "RecipeError", "load_recipe", "parse_recipe", "stage_names"]
