"""A recipe from YAML, checked whole before any work: every key must be a field of its config, every value
of the field's type and accepted by the config's own validation; errors name the key and its line.

    calibration: {samples: 64}            # CalibrationSettings fields
    evaluation: {windows: 8}              # EvalSettings fields
    gate: {max_kl: 0.15}                  # Gate fields
    stages:
      - structured: {target: neurons, sparsity: 0.2}
      - gptq: {scheme: int4/g32}
      - lora: {rank: 16, steps: 100}
      - evaluate: {windows: 40}
      - export: {targets: [gguf, compressed-tensors]}

Line numbers come from yaml's node tree (`yaml.compose`): the document is composed, then each node is
turned into Python values with yaml's own safe constructor while its position is still known.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor

from modelpress.errors import ModelpressError
from modelpress.recipe.stages import Gate, Recipe, stage_names

SECTIONS = {"calibration", "evaluation", "gate"}   # Recipe fields given as a mapping of a config's fields


class RecipeError(ModelpressError):
    """A recipe file that cannot run: the message names the file, the line and the key."""


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    return parse_recipe(text, str(path))


def parse_recipe(text: str, name: str = "<recipe>") -> Recipe:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{name}: not valid YAML: {err}") from None
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{name}: a recipe is a mapping with a `stages` list (and optionally "
                          f"{', '.join(sorted(SECTIONS))}, reference_top_k)")
    where = _Where(name)
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    values: dict[str, object] = {}
    for key, node in where.items(root):
        if key not in fields:
            raise RecipeError(f"{where.at(node)}: unknown key {key!r}; a recipe has {', '.join(fields)}")
        if key == "stages":
            values[key] = _stages(node, where)
        elif key == "gate":
            values[key] = build(Gate, node, where, key)
        elif key in SECTIONS:                  # starts from the recipe's own defaults (evaluation: no speed)
            default = fields[key].default_factory()  # type: ignore[misc]
            values[key] = build(type(default), node, where, key, defaults=dataclasses.asdict(default))
        else:
            values[key] = _field_value(Recipe, key, node, where)
    if "stages" not in values:
        raise RecipeError(f"{name}: no `stages` list")
    try:
        return Recipe(**values)   # type: ignore[arg-type]
    except ModelpressError as err:
        raise RecipeError(f"{where.at(root)}: {err}") from None


class _Where:
    """Positions of nodes in one file, and the keys of a mapping node with duplicate keys refused."""

    def __init__(self, name: str) -> None:
        self.name = name

    def at(self, node: yaml.Node) -> str:
        return f"{self.name} line {node.start_mark.line + 1}"

    def items(self, node: yaml.Node, what: str = "recipe") -> list[tuple[str, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise RecipeError(f"{self.at(node)}: {what} should be a mapping of keys to values")
        seen: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise RecipeError(f"{self.at(key_node)}: keys must be plain names")
            if key in seen:
                raise RecipeError(f"{self.at(key_node)}: key {key!r} given twice (first at {self.at(seen[key])})")
            seen[key] = key_node
        return [(k.value, v) for k, v in node.value]


def _value(node: yaml.Node) -> object:
    return SafeConstructor().construct_object(node, deep=True)


def _stages(node: yaml.Node, where: _Where) -> list[object]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise RecipeError(f"{where.at(node)}: `stages` should be a non-empty list, e.g. "
                          f"`- gptq: {{scheme: int4/g128}}`")
    names = stage_names()
    stages = []
    for item in node.value:
        if isinstance(item, yaml.ScalarNode):            # `- evaluate`: a stage with every default
            name, body = item.value, None
        else:
            entries = where.items(item, "a stage")
            if len(entries) != 1:
                raise RecipeError(f"{where.at(item)}: a stage is one name with its settings, e.g. "
                                  f"`- gptq: {{scheme: int4/g128}}`; found {[k for k, _ in entries]}")
            name, body = entries[0]
        if name not in names:
            raise RecipeError(f"{where.at(item)}: unknown stage {name!r}; stages: {', '.join(names)}")
        kind = names[name]
        if body is not None and isinstance(body, yaml.ScalarNode) and _value(body) is None:
            body = None
        stages.append(build(kind.config_type, body, where, name, dict(kind.fixed)))
    return stages


def build(config_type: type, node: yaml.Node | None, where: _Where, what: str, fixed: dict | None = None,
          defaults: dict | None = None) -> object:
    """`config_type` from a mapping node: unknown keys, values of the wrong type and values the config refuses
    are errors naming the key and its line (`fixed`: fields the stage's name sets; `defaults`: values used
    for keys not given, instead of the config's own defaults)."""
    fixed = dict(fixed or {})
    values: dict[str, object] = {}
    lines: dict[str, yaml.Node] = {}
    fields = {f.name for f in dataclasses.fields(config_type)}
    for key, value_node in ([] if node is None else where.items(node, what)):
        if key not in fields:
            raise RecipeError(f"{where.at(value_node)}: unknown key {key!r} for {what}; it takes "
                              f"{', '.join(sorted(fields - set(fixed)))}")
        if key in fixed and _value(value_node) != fixed[key]:
            raise RecipeError(f"{where.at(value_node)}: {what} fixes {key}={fixed[key]!r}")
        values[key] = _field_value(config_type, key, value_node, where)
        lines[key] = value_node
    values = {**(defaults or {}), **fixed, **values}
    try:
        return config_type(**values)
    except (ModelpressError, TypeError, ValueError) as err:
        key = _culprit(config_type, values, lines)
        place = where.at(lines[key]) if key else where.at(node) if node is not None else where.name
        named = f"{what}.{key}" if key else what
        raise RecipeError(f"{place}: bad value for {named}: {_first_line(err)}") from None


def _culprit(config_type: type, values: dict, lines: dict) -> str | None:
    """The one key whose value alone the config refuses (the others left at their defaults), if there is one."""
    required = {f.name for f in dataclasses.fields(config_type)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    for key in lines:
        trial = {k: v for k, v in values.items() if k == key or k in required or k not in lines}
        try:
            config_type(**trial)
        except (ModelpressError, TypeError, ValueError):
            return key
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _field_value(config_type: type, key: str, node: yaml.Node, where: _Where) -> object:
    value = _value(node)
    hint = _hints(config_type).get(key)
    if hint is not None and not _accepts(hint, value):
        raise RecipeError(f"{where.at(node)}: {key} should be {_describe(hint)}, got {value!r}")
    return tuple(value) if isinstance(value, list) else value   # YAML lists: the tuples frozen configs hold


def _hints(config_type: type) -> dict[str, object]:
    try:
        return typing.get_type_hints(config_type)
    except Exception:   # an annotation that names something only type checkers import: check values by use
        return {}


def _args(hint: object) -> tuple:
    return typing.get_args(hint)


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _accepts(hint: object, value: object) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is object:
        return True
    if _is_union(hint):
        return any(_accepts(arg, value) for arg in _args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in _args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        item = _args(hint)[0] if _args(hint) else typing.Any
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, dict)
    return False            # a Python object (a function, a scheme object): not something YAML can write


def _describe(hint: object) -> str:
    if _is_union(hint):
        return " or ".join(_describe(a) for a in _args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in _args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list"
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, f"a {getattr(hint, '__name__', hint)} (not settable from YAML)")  # type: ignore[call-overload]
