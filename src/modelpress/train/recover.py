"""Recovery stages as configs: full distillation, LoRA/QLoRA adapters, QAT; each a frozen dataclass registered
by its type in `RECOVERERS`, as the quantizers and pruners are, so a recipe stage `lora: {rank: 16}` and
`modelpress.compress` find them by name.

Every stage trains the compressed model to match a teacher (the float model the pipeline started from) on
calibration windows, through distill.py's loop; only what is trained differs:
- Distill: every float parameter the model still has (minus `freeze`), e.g. after structured pruning;
- LoRA:    low-rank adapters over the frozen (packed) layers, then folded in and re-quantized (`merge`);
           on a float model, `quantize` (a scheme spec) first quantizes it with RTN: QLoRA;
- QAT:     fake-quantized float weights at `scheme`, then converted to packed layers; on a model that is
           already packed (after a gptq/awq stage) the weights train on its own grid (scales, offsets, column
           order kept) and `scheme` must be left out: the recovery that pays most after GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import DEFAULT_SKIP
from modelpress.train.data import TaskData
from modelpress.train.distill import DistillConfig, distill
from modelpress.train.lora import MERGE_METHODS, LoRAConfig, add_lora, merge_lora
from modelpress.train.qat import convert_qat, prepare_qat, prepare_qat_from_packed
from modelpress.train.trainer import TrainConfig

EMBEDDINGS = ("embed_tokens", "word_embeddings")   # kept fixed by default: large, and tied to the head


@dataclass(frozen=True)
class Training:
    """What every recovery stage shares: the loop (steps, lr, batch, precision, seed) and the teacher's
    top-k rows cached once per training window (None: the teacher runs live on every batch)."""

    steps: int = 100
    lr: float = 1e-4
    windows: int = 32                  # calibration windows trained on (the first ones of the recipe's data)
    batch_size: int = 1
    top_k: int | None = 64
    temperature: float = 1.0
    precision: str = "fp32"            # fp32 | bf16 | fp16 | auto (trainer.py)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.windows, int) or self.windows <= 0:
            raise ModelpressError(f"windows must be a positive integer, got {self.windows!r}")
        self.train_config()            # validates steps, lr, batch size, precision
        self.distill_config()          # validates top_k, temperature

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                           precision=self.precision,  # type: ignore[arg-type]
                           seed=self.seed, log_every=max(1, self.steps // 10))

    def distill_config(self, freeze: tuple[str, ...] = EMBEDDINGS) -> DistillConfig:
        return DistillConfig(temperature=self.temperature, top_k=self.top_k, freeze=freeze)


@dataclass(frozen=True)
class Distill(Training):
    freeze: tuple[str, ...] = EMBEDDINGS   # parameter name patterns kept fixed


@dataclass(frozen=True)
class LoRA(Training):
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    merge: str = "rtn"                 # rtn | gptq: fold the adapters in and re-quantize the packed base
    quantize: str | None = None        # a float model is first quantized with RTN at this scheme (QLoRA)
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        super().__post_init__()
        LoRAConfig(self.rank, self.alpha, self.dropout, self.skip)
        if self.merge not in MERGE_METHODS:
            raise ModelpressError(f"merge must be one of {', '.join(MERGE_METHODS)}, got {self.merge!r}")
        if self.quantize is not None:
            WeightScheme.parse(self.quantize)


@dataclass(frozen=True)
class QAT(Training):
    scheme: str | None = None          # None: train on the packed model's own grid (the model must be packed)
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scheme is not None:
            WeightScheme.parse(self.scheme)


@dataclass(frozen=True)
class Recoverer:
    name: str                          # the stage's name in recipes and reports
    prepare: Callable[[nn.Module, object], None]                       # before training (adapters, fake quant)
    finish: Callable[[nn.Module, object, torch.Tensor], dict]          # after it (merge, convert); notes


RECOVERERS: dict[type, Recoverer] = {}


def register_recoverer(config_type: type, recoverer: Recoverer) -> None:
    """Add a recovery method; a config type or a name registered twice is an error."""
    if config_type in RECOVERERS or recoverer.name in {r.name for r in RECOVERERS.values()}:
        raise ModelpressError(f"recovery method {recoverer.name!r} ({config_type.__name__}) is already registered")
    RECOVERERS[config_type] = recoverer


def recoverer_for(config: object) -> Recoverer:
    try:
        return RECOVERERS[type(config)]
    except KeyError:
        known = ", ".join(t.__name__ for t in RECOVERERS)
        raise ModelpressError(f"no recovery method takes a {type(config).__name__}; known configs: {known}") from None


def recover(model: nn.Module, config: Training, teacher: nn.Module, ids: torch.Tensor) -> dict:
    """Train `model` in place toward `teacher` on the token windows `ids` (n, T), as `config` says; the report."""
    recoverer = recoverer_for(config)
    data = TaskData(ids[: config.windows])
    freeze = getattr(config, "freeze", EMBEDDINGS)
    # adapters' initial values and dropout draw from torch's global generator: seeded here (and restored
    # after), so the result depends on `seed` alone, not on what the process ran before (a resumed pipeline)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        recoverer.prepare(model, config)
        result = distill(model, teacher, data, config.distill_config(freeze), config.train_config())
        notes = recoverer.finish(model, config, data.input_ids)
    return {"method": recoverer.name, "windows": len(data), "seq_len": int(ids.shape[1]), **result.to_dict(),
            **notes}


def _prepare_lora(model: nn.Module, config: LoRA) -> None:
    from modelpress.nn.quant_linear import QuantLinear

    if config.quantize is not None:
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            raise ModelpressError(f"lora quantize={config.quantize!r}: the model is already quantized; drop quantize")
        from modelpress.algorithms.quantize import RTNConfig, quantize_rtn

        quantize_rtn(model, RTNConfig(config.quantize, skip=config.skip))
    add_lora(model, LoRAConfig(config.rank, config.alpha, config.dropout, config.skip))


def _finish_lora(model: nn.Module, config: LoRA, ids: torch.Tensor) -> dict:
    merge_lora(model, config.merge, calibration_ids=ids if config.merge == "gptq" else None)
    return {"merged_with": config.merge}


def _prepare_qat(model: nn.Module, config: QAT) -> None:
    from modelpress.nn.quant_linear import QuantLinear

    packed = any(isinstance(m, QuantLinear) for m in model.modules())
    if packed and config.scheme is not None:
        raise ModelpressError(f"qat scheme={config.scheme!r}: the model is already quantized, so QAT trains on its "
                              "own grid; drop scheme")
    if packed:
        prepare_qat_from_packed(model)
    elif config.scheme is None:
        raise ModelpressError("qat on a float model needs a scheme (e.g. scheme: int4/g128)")
    else:
        prepare_qat(model, WeightScheme.parse(config.scheme), config.skip)


def _finish_qat(model: nn.Module, config: QAT, ids: torch.Tensor) -> dict:
    return {"converted_layers": len(convert_qat(model))}


register_recoverer(Distill, Recoverer("distill", lambda model, config: None, lambda model, config, ids: {}))
register_recoverer(LoRA, Recoverer("lora", _prepare_lora, _finish_lora))   # type: ignore[arg-type]
register_recoverer(QAT, Recoverer("qat", _prepare_qat, _finish_qat))       # type: ignore[arg-type]
