"""Recovering quality after compression: distillation, quantization-aware training, LoRA, one training loop."""

from modelpress.train.distill import DistillConfig, DistillResult, distill
from modelpress.train.lora import LoRAConfig, add_lora, merge_lora
from modelpress.train.qat import convert_qat, prepare_qat
from modelpress.train.trainer import TrainConfig, TrainResult, train

__all__ = ["DistillConfig", "DistillResult", "LoRAConfig", "TrainConfig", "TrainResult", "add_lora", "convert_qat",
           "distill", "merge_lora", "prepare_qat", "train"]
