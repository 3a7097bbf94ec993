"""modelpress as a transformers quantization method: `AutoModelForCausalLM.from_pretrained` loads our packed
layers, or quantizes with round-to-nearest at load time, the way bitsandbytes users are used to.

    import modelpress.hf              # registers "modelpress" with transformers (or: modelpress.hf.register())
    model = AutoModelForCausalLM.from_pretrained("smollm2-gptq4")                # a `modelpress.save` directory
    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M",
                                                 quantization_config=ModelpressConfig("nf4/g64"))

Registration is explicit (importing this module, or `modelpress.ModelpressConfig`, does it) rather than done by
`import modelpress`, which must stay cheap: transformers' quantizer registry lives in `transformers.quantizers`,
and importing that costs about as much as importing transformers itself.

How the two directions work:
- A directory written by `modelpress.save` carries `quantization_config: {"quant_method": "modelpress",
  "layers": {name: record}}` in its config.json: the same per-layer records as modelpress.json. Before the
  weights are read, each named layer is swapped for an empty compressed module of its kind (QuantLinear, ...,
  nn/registry.py), so transformers assigns the stored packed tensors (`qdata`, `scale`, ...) to it as they are.
- With `ModelpressConfig(scheme)` on a float checkpoint, transformers loads the float weights as usual and the
  quantizer then runs modelpress' RTN over the model (algorithms/quantize/rtn.py), in place. Peak memory is the
  float model's (bitsandbytes quantizes tensor by tensor while loading; RTN here quantizes after), the result
  is the same layers `modelpress.quantize(model, RTN(scheme))` makes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from modelpress.errors import ModelpressError
from modelpress.io.save import HF_QUANT_METHOD
from modelpress.nn.layers import DEFAULT_SKIP

QUANT_METHOD = HF_QUANT_METHOD      # config.json's entry is written by io/save.py (hf_quantization_config)


class ModelpressConfig(QuantizationConfigMixin):
    """transformers' `quantization_config` for modelpress. `scheme` (a spec such as "nf4/g64", or a WeightScheme)
    quantizes a float checkpoint at load time with RTN, leaving layers matching `skip` in float; `layers`
    (written by `modelpress.save`, not by hand) describes a checkpoint that is already packed."""

    def __init__(self, scheme: Any = None, skip: tuple[str, ...] | list[str] = DEFAULT_SKIP,
                 layers: dict | None = None, **kwargs) -> None:
        from modelpress.formats.scheme import as_scheme

        self.quant_method = QUANT_METHOD
        if (scheme is None) == (layers is None):
            raise ModelpressError("ModelpressConfig takes a scheme to quantize a float checkpoint at load time "
                                  "(e.g. ModelpressConfig('nf4/g64')), or the layers of a modelpress-saved one")
        self.scheme = None if scheme is None else as_scheme(scheme).spec
        self.skip = list(skip)
        self.layers = layers

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "scheme": self.scheme, "skip": list(self.skip),
                "layers": self.layers}


class ModelpressHfQuantizer(HfQuantizer):
    """The transformers side: empty compressed modules before a packed checkpoint's weights are assigned, or
    RTN over the loaded float model."""

    requires_calibration = False

    def __init__(self, quantization_config: ModelpressConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.pre_quantized = quantization_config.layers is not None

    def _process_model_before_weight_loading(self, model, **kwargs):
        from modelpress.io.save import install_layer

        for name, record in (self.quantization_config.layers or {}).items():
            install_layer(model, name, record, "config.json quantization_config")
        return model

    def get_new_dtype(self, converter, param, dtype):
        """Stored tensors keep their dtype: fp16 scales stay fp16 (they are part of what was measured)."""
        return None if self.pre_quantized else super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from modelpress.nn.registry import module_for_kind

        if self.pre_quantized:
            for kind in sorted({record["kind"] for record in self.quantization_config.layers.values()}):
                prepare = getattr(module_for_kind(kind), "prepare_model", None)   # e.g. QuantExperts
                if prepare is not None:
                    prepare(model)
            return model
        from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn

        quantize_rtn(model, RTNConfig(self.quantization_config.scheme, skip=tuple(self.quantization_config.skip)))
        # what a later save_pretrained / reload needs: the records of the layers now packed
        self.quantization_config.layers = compressed_records(model)
        return model

    def is_serializable(self) -> bool:
        return False     # modelpress.save writes the packed format (and the config.json entry above)

    @property
    def is_trainable(self) -> bool:
        return False


def compressed_records(model: torch.nn.Module) -> dict[str, dict]:
    """name -> {"kind", **record} for every compressed module, as modelpress.json lists them."""
    from modelpress.nn.registry import compressed_module_kind

    return {name: {"kind": kind, **module.record()} for name, module in model.named_modules()
            if (kind := compressed_module_kind(module)) is not None}


def register() -> None:
    """Register the "modelpress" quantization method with transformers; a second call does nothing."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not ModelpressConfig:
        register_quantization_config(QUANT_METHOD)(ModelpressConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not ModelpressHfQuantizer:
        register_quantizer(QUANT_METHOD)(ModelpressHfQuantizer)


register()
