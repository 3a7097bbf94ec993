"""Quantization methods, registered by the type of their config: round to nearest, GPTQ, AWQ (with an RTN
or a GPTQ solver), SmoothQuant W8A8, FP8 dynamic (W8A8 fp8) and mixed precision. `quantize_model` (api.py), the CLI's `--method`
choices and help, and mixed precision's choice of methods all read `QUANTIZERS`; no method name is written
anywhere else. Adding a method is one file (its frozen config and entry point), its test, and one
`register_quantizer` line at the bottom of this file (docs/extending.md).

    QUANTIZERS[type(config)] -> Quantizer(name, run, calibrated, help, ...)
    config_for_method("awq-gptq", scheme)  -> AWQConfig(scheme, solver="gptq")     (the CLI's way in)
    method_of(AWQConfig(scheme, solver="gptq")) -> "awq-gptq"                        (the report's name)
"""

from __future__ import annotations

from modelpress.algorithms.quantize.awq import AWQConfig, quantize_awq
from modelpress.algorithms.quantize.fp8_dynamic import Fp8DynamicConfig, quantize_fp8_dynamic
from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.algorithms.quantize.head import HeadConfig, quantize_head
from modelpress.algorithms.quantize.mixed_run import MixedConfig, quantize_mixed
from modelpress.algorithms.quantize.registry import (
    QUANTIZERS,
    Quantizer,
    QuantizeRun,
    config_for_method,
    join_names,
    method_help,
    method_names,
    method_of,
    methods_accepting,
    per_layer_methods,
    quantizer_for,
    register_quantizer,
)
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.algorithms.quantize.smoothquant import SmoothQuantConfig, quantize_smoothquant


def _rtn(model, config, ids, device, resume_dir, batch_size) -> QuantizeRun:
    layers = quantize_rtn(model, config)
    return QuantizeRun(len(layers), config.scheme.spec, {})


def _gptq(model, config, ids, device, resume_dir, batch_size) -> QuantizeRun:
    report = quantize_gptq(model, config, ids, device=device, resume_dir=resume_dir, batch_size=batch_size)
    return QuantizeRun(report.layers, config.scheme.spec, {"static_groups": config.static_groups, **report.summary()})


def _awq(model, config, ids, device, resume_dir, batch_size) -> QuantizeRun:
    report = quantize_awq(model, config, ids, device=device, resume_dir=resume_dir, batch_size=batch_size)
    layout = {"static_groups": config.static_groups} if config.solver == "gptq" else {}
    return QuantizeRun(report.layers, config.scheme.spec, {**layout, **report.summary()})


def _smoothquant(model, config, ids, device, resume_dir, batch_size) -> QuantizeRun:
    report = quantize_smoothquant(model, config, ids, device=device, batch_size=batch_size)
    return QuantizeRun(report.layers, config.scheme.spec, report.summary())


def _fp8_dynamic(model, config, ids, device, resume_dir, batch_size) -> QuantizeRun:
    layers = quantize_fp8_dynamic(model, config)
    return QuantizeRun(len(layers), config.scheme.spec, {"activations": "fp8-e4m3 per token (dynamic)"})


def _head(model, config, ids, device, resume_dir, batch_size) -> QuantizeRun:
    report = quantize_head(model, config)
    return QuantizeRun(1, config.scheme.spec, {"head": report.to_json()})


register_quantizer(RTNConfig, Quantizer("rtn", _rtn, calibrated=False, help="round to nearest"))
register_quantizer(GPTQConfig, Quantizer("gptq", _gptq, calibrated=True, help="calibrated, error-compensating"))
register_quantizer(AWQConfig, Quantizer("awq", _awq, calibrated=True, variants={"awq-gptq": {"solver": "gptq"}},
                                        help="activation-aware scales + clipping"))
register_quantizer(SmoothQuantConfig, Quantizer(
    "smoothquant", _smoothquant, calibrated=True, resumable=False, per_layer=False,
    help="W8A8: int8 weights and per-token int8 activations; use --format int8"))
register_quantizer(Fp8DynamicConfig, Quantizer(
    "fp8-dynamic", _fp8_dynamic, calibrated=False, resumable=False, per_layer=False,
    help="W8A8 fp8: fp8-e4m3 weights per channel and per-token fp8 activations (vLLM's FP8_DYNAMIC); use --format fp8-e4m3"))
register_quantizer(MixedConfig, Quantizer("mixed", quantize_mixed, calibrated=True, per_layer=False,
                                          help="a scheme per layer for a bit budget"))
register_quantizer(HeadConfig, Quantizer("head", _head, calibrated=False, per_layer=False, linear_layers=False,
                                         help="the output head (and the embedding tied to it), round to nearest"))

__all__ = [
    "QUANTIZERS",
    "AWQConfig",
    "Fp8DynamicConfig",
    "GPTQConfig",
    "HeadConfig",
    "MixedConfig",
    "QuantizeRun",
    "Quantizer",
    "RTNConfig",
    "SmoothQuantConfig",
    "config_for_method",
    "join_names",
    "method_help",
    "method_names",
    "method_of",
    "methods_accepting",
    "per_layer_methods",
    "quantizer_for",
    "register_quantizer",
]
