"""The config a float export needs so that the architecture's own modules take the exported tensors.

Structured pruning with uniform widths already rewrites the config (algorithms/prune/structured.py). A model
pruned per layer (ResizedLinear layers) loads in transformers only when every layer happens to have the same
width: then the widths can be written into the config's fields. The fields are found by comparing the
shapes the config implies with the shapes the model holds: a dimension the config gives as
intermediate_size (or heads · head_dim, key/value heads · head_dim) that the model holds at another size
proposes a new value for that field; one field with two proposals means widths differ per layer, which a
config with one number per field cannot say.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from modelpress.algorithms.prune.structured import WIDTH_FIELDS, head_dim_of
from modelpress.errors import ModelpressError


def expected_shapes(cls: type[nn.Module], config) -> dict[str, tuple[int, ...]]:
    """Shapes of every state-dict tensor of `cls(config)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = cls(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def _field(config, kind: str) -> str | None:
    return next((name for name in WIDTH_FIELDS[kind] if getattr(config, name, None) is not None), None)


def _width_quantities(config) -> dict[str, tuple[int, int]]:
    """config field -> (the tensor dimension it implies, the unit it counts in)."""
    quantities = {}
    intermediate = _field(config, "intermediate")
    if intermediate is not None:
        quantities[intermediate] = (int(getattr(config, intermediate)), 1)
    heads = _field(config, "heads")
    if heads is not None:
        head_dim = head_dim_of(config)
        quantities[heads] = (int(getattr(config, heads)) * head_dim, head_dim)
        kv_heads = _field(config, "kv_heads")
        if kv_heads is not None:
            quantities[kv_heads] = (int(getattr(config, kv_heads)) * head_dim, head_dim)
    return quantities


def _owner(key: str) -> str:
    return key.rpartition(".")[0] or key


def _proposals(config, mismatched: dict[str, tuple[tuple, tuple]]) -> dict[str, dict[int, list[str]]]:
    quantities = _width_quantities(config)
    proposals: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key, (expected, actual) in mismatched.items():
        if len(expected) != len(actual):
            raise ModelpressError(f"{key} has shape {actual}, the architecture {expected}: not a width change")
        for want, have in zip(expected, actual):
            if want == have:
                continue
            fields = [name for name, (size, _unit) in quantities.items() if size == want]
            if not fields:
                raise ModelpressError(f"{key} has shape {actual} where {type(config).__name__} implies {expected}, "
                                      f"and no config field ({', '.join(quantities) or 'none known'}) sets that size")
            for name in fields:
                unit = quantities[name][1]
                if have % unit:
                    raise ModelpressError(f"{key}: {have} is not a whole number of heads of {unit}")
                proposals[name][have // unit].append(_owner(key))
    return proposals


def _check_one_width(config, proposals: dict[str, dict[int, list[str]]]) -> None:
    for name, values in proposals.items():
        if len(values) > 1:
            parts = "; ".join(f"{value} in {', '.join(sorted(set(owners))[:4])}"
                              f"{' ...' if len(set(owners)) > 4 else ''}" for value, owners in sorted(values.items()))
            raise ModelpressError(f"widths differ per layer ({name}: {parts}); {type(config).__name__} holds one "
                                  f"{name} for every layer, so transformers cannot load this model as it is: prune "
                                  f"with uniform widths (drop --non-uniform), or keep the modelpress save")


def fit_config(cls: type[nn.Module], config, shapes: dict[str, tuple[int, ...]]) -> tuple[object, dict[str, list]]:
    """A copy of `config` whose architecture holds exactly `shapes` (state-dict key -> shape), and the fields
    changed ({field: [before, after]}); ModelpressError when no such config exists."""
    config = copy.deepcopy(config)
    expected = expected_shapes(cls, config)
    _check_keys(expected, shapes)
    mismatched = {k: (expected[k], shapes[k]) for k in expected if expected[k] != shapes[k]}
    if not mismatched:
        return config, {}
    proposals = _proposals(config, mismatched)
    _check_one_width(config, proposals)
    changes: dict[str, list] = {}
    heads = _field(config, "heads")
    if heads in proposals or _field(config, "kv_heads") in proposals:
        changes["head_dim"] = [getattr(config, "head_dim", None), head_dim_of(config)]
    for name, values in proposals.items():
        changes[name] = [getattr(config, name), next(iter(values))]
    for name, (_before, after) in changes.items():
        setattr(config, name, after)
    still = {k: (v, shapes[k]) for k, v in expected_shapes(cls, config).items() if v != shapes[k]}
    if still:
        key, (want, have) = next(iter(still.items()))
        raise ModelpressError(f"no {type(config).__name__} fits this model's shapes: after setting {changes}, {key} "
                              f"is {have} where the config implies {want} ({len(still)} tensors differ)")
    return config, changes


def _check_keys(expected: dict[str, tuple], shapes: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ModelpressError(f"the model's tensors do not match its architecture: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
