"""Each layer algorithm's describe() (the resume check's line) holds every field of its config, `skip` among
them: derived from dataclasses.asdict (engine/resume.py config_description), so no field can be forgotten."""

from __future__ import annotations

import dataclasses

import pytest

from modelpress.algorithms.prune.calibrated import SparseGPTPruner, WandaPruner
from modelpress.algorithms.prune.sparsegpt import SparseGPTConfig
from modelpress.algorithms.prune.wanda import WandaConfig
from modelpress.algorithms.quantize.awq import AWQ
from modelpress.algorithms.quantize.gptq import GPTQ
from modelpress.algorithms.quantize.smoothquant import SmoothQuant
from modelpress.algorithms.quantize import AWQConfig, GPTQConfig, SmoothQuantConfig


def algorithms(config):
    if isinstance(config, GPTQConfig):
        return GPTQ(config)
    if isinstance(config, AWQConfig):
        return AWQ(config)
    if isinstance(config, SmoothQuantConfig):
        return SmoothQuant(config)
    pruner = SparseGPTPruner if isinstance(config, SparseGPTConfig) else WandaPruner
    return pruner(None, config.sparsity, config.pattern, config.compress, config=config)   # type: ignore[arg-type]


@pytest.mark.parametrize("config", [GPTQConfig("int4/g32"), AWQConfig("int4/g32"), SmoothQuantConfig(),
                                    WandaConfig(0.5), SparseGPTConfig(0.5)], ids=lambda c: type(c).__name__)
def test_every_field_changes_the_description(config):
    base = algorithms(config).describe()
    assert base == algorithms(dataclasses.replace(config)).describe()      # the same config: the same line
    flags = tuple(f.name for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), bool))
    for name in ("skip", *flags):
        value = getattr(config, name)
        changed = ("lm_head", "*down_proj") if name == "skip" else (not value)
        try:
            other = dataclasses.replace(config, **{name: changed})
        except Exception:   # a combination the config refuses (e.g. static_groups off without act_order)
            continue
        assert algorithms(other).describe() != base, name
    assert "skip=" in base
