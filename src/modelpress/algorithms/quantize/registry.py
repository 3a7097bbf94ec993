"""The quantizer registry: config type -> Quantizer (method name, runner, what it needs). Filled by the
registrations at the bottom of algorithms/quantize/__init__.py; everything that needs a method name or the
list of methods (api.quantize_model, the CLI, mixed precision) reads it through these functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme


@dataclass(frozen=True)
class QuantizeRun:
    """What a runner reports: linear layers quantized, the scheme ("mixed" for a per-layer map) and the
    method's own summary (JSON-ready)."""

    layers: int
    scheme: str
    details: dict
    method: str | None = None       # the method that quantized, when the runner handed over (mixed precision)


Runner = Callable[[nn.Module, object, "torch.Tensor | None", "str | torch.device", "str | None", int], QuantizeRun]
"""(model, config, calibration ids (samples, seq_len) or None, device, resume_dir, batch_size) -> QuantizeRun"""


@dataclass(frozen=True)
class Quantizer:
    name: str                       # the method's name (`--method`) for its config with the variant fields unset
    run: Runner
    calibrated: bool                # needs calibration token ids
    help: str                       # one phrase for `--method`'s help
    # more names for the same config type, each with the fields it fixes, e.g. {"awq-gptq": {"solver": "gptq"}}
    variants: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    resumable: bool = True          # can save progress per block and continue (CalibrationSettings.resume_dir)
    per_layer: bool = True          # honours `schemes` (layer name -> scheme), so mixed precision can use it
    linear_layers: bool = True      # quantizes the decoder's linear layers (a `--method`); False: the output head

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.variants)


QUANTIZERS: dict[type, Quantizer] = {}


def register_quantizer(config_type: type, quantizer: Quantizer) -> None:
    """Add a method; a config type or a method name registered twice is an error."""
    if config_type in QUANTIZERS:
        raise ModelpressError(f"{config_type.__name__} is already registered, as method "
                              f"{QUANTIZERS[config_type].name!r}")
    taken = {name: q for q in QUANTIZERS.values() for name in q.names}
    for name in quantizer.names:
        if name in taken:
            raise ModelpressError(f"quantization method name {name!r} is already registered "
                                  f"(for {type_of(taken[name]).__name__})")
    QUANTIZERS[config_type] = quantizer


def type_of(quantizer: Quantizer) -> type:
    return next(t for t, q in QUANTIZERS.items() if q is quantizer)


def quantizer_for(config: object) -> Quantizer:
    try:
        return QUANTIZERS[type(config)]
    except KeyError:
        known = ", ".join(t.__name__ for t in QUANTIZERS)
        raise ModelpressError(f"no quantization method takes a {type(config).__name__}; known configs: {known}"
                              ) from None


def method_of(config: object) -> str:
    """The method name a config stands for: the variant whose fields it has, else the quantizer's name."""
    quantizer = quantizer_for(config)
    for name, fixed in quantizer.variants.items():
        if all(getattr(config, key) == value for key, value in fixed.items()):
            return name
    return quantizer.name


def takes_scheme(config_type: type) -> bool:
    """Methods of the linear layers configured by one weight scheme (a `scheme` field): the `--method` choices.
    Mixed precision takes candidates instead; the output head's quantizer is a step after a method, no method."""
    quantizer = QUANTIZERS.get(config_type)
    return (quantizer is None or quantizer.linear_layers) and "scheme" in {f.name for f in dataclasses.fields(config_type)}


def method_names() -> tuple[str, ...]:
    """Every name `config_for_method` accepts, in registration order: the CLI's `--method` choices."""
    return tuple(name for t, q in QUANTIZERS.items() if takes_scheme(t) for name in q.names)


def method_help() -> str:
    """`--method`'s help: each name with its phrase; a variant as its base method with the fields it fixes."""
    def describe(quantizer: Quantizer, name: str) -> str:
        if name == quantizer.name:
            return quantizer.help
        fixed = ", ".join(f"{key}={value!r}" for key, value in quantizer.variants[name].items())
        return f"{quantizer.name} with {fixed}"

    return ", ".join(f"{name} ({describe(q, name)})" for t, q in QUANTIZERS.items() if takes_scheme(t)
                     for name in q.names)


def per_layer_methods() -> tuple[str, ...]:
    """Methods that honour a per-layer scheme map: the ones mixed precision can apply its choice with."""
    return tuple(name for t, q in QUANTIZERS.items() if takes_scheme(t) and q.per_layer for name in q.names)


def _config(name: str, scheme: WeightScheme | str, options: Mapping[str, object]) -> object:
    for config_type, quantizer in QUANTIZERS.items():
        if name in quantizer.names and takes_scheme(config_type):
            fixed = quantizer.variants.get(name, {})
            known = {f.name for f in dataclasses.fields(config_type)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise TypeError(f"{config_type.__name__} has no field {unknown[0]!r}")
            return config_type(scheme=scheme, **fixed, **options)
    raise ModelpressError(f"unknown quantization method {name!r}; available: {', '.join(method_names())}")


def methods_accepting(**options: object) -> tuple[str, ...]:
    """Method names whose config takes these field values (tried on each config's default or an int4 scheme)."""
    names = []
    for config_type, quantizer in QUANTIZERS.items():
        if not takes_scheme(config_type):
            continue
        default = next(f.default for f in dataclasses.fields(config_type) if f.name == "scheme")
        scheme = "int4/g128" if default is dataclasses.MISSING else default
        for name in quantizer.names:
            try:
                _config(name, scheme, options)
            except (TypeError, ModelpressError):
                continue
            names.append(name)
    return tuple(names)


def config_for_method(name: str, scheme: WeightScheme | str, **options: object) -> object:
    """The config that method `name` stands for, with `options` as fields (e.g. skip, alpha, static_groups).
    An option the method does not take is an error naming the methods that do."""
    if not any(name in q.names and takes_scheme(t) for t, q in QUANTIZERS.items()):
        raise ModelpressError(f"unknown quantization method {name!r}; available: {', '.join(method_names())}")
    for key, value in options.items():
        if name not in methods_accepting(**{key: value}):
            raise ModelpressError(f"{key}={value!r} does not apply to method {name!r}; it applies to methods "
                                  f"{join_names(methods_accepting(**{key: value}))}")
    return _config(name, scheme, options)


def join_names(names: tuple[str, ...]) -> str:
    """("a",) -> a; ("a", "b", "c") -> a, b and c."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
