"""True bytes of a model's weights, and bits per weight of its quantized (or pruned, SparseLinear) layers.

Bytes are counted from the tensors the model really holds (parameters and persistent buffers), each
shared tensor once, so tied embeddings are not double counted and packed layers count their codes,
scales and offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modelpress.nn.quant_embedding import QuantEmbedding
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.sparse_linear import SparseLinear

# compressed layers whose stored tensors stand for an (out, in) weight; SparseLinear: bitmask + kept values;
# QuantEmbedding: a (vocabulary, dim) table, counted once when it shares its tensors with a tied head
_COMPRESSED = (QuantLinear, SparseLinear, QuantEmbedding)
_STORED_NAMES = ("qdata", "scale", "offset", "scale_scale", "scale_mean", "input_perm", "mask", "values")


@dataclass(frozen=True)
class SizeResult:
    weight_bytes: int                 # every stored weight tensor of the model
    parameters: int                   # weights counted as the float model would count them
    quantized_weight_bytes: int       # packed bytes of quantized layers (codes + scales + offsets)
    quantized_parameters: int         # weights those layers stand for
    bits_per_weight: float | None     # 8 · quantized bytes / quantized weights; None if nothing is quantized


def _persistent_tensors(model: nn.Module):
    for name, tensor in model.state_dict(keep_vars=True).items():
        yield name, tensor


def measure_size(model: nn.Module) -> SizeResult:
    seen: set = set()
    total_bytes = 0
    parameters = 0
    compressed = {name: m for name, m in model.named_modules() if isinstance(m, _COMPRESSED)}
    packed_names = {f"{name}.{t}" for name in compressed for t in _STORED_NAMES}
    quant_modules, tables = {}, set()
    for name, module in compressed.items():   # a tied embedding and head: one table
        first = next(iter(module.buffers()), None)
        key = None if first is None else (first.untyped_storage().data_ptr(), first.storage_offset())
        if key is None or key not in tables:
            quant_modules[name] = module
            tables.add(key)
    for name, tensor in _persistent_tensors(model):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        total_bytes += tensor.numel() * tensor.element_size()
        if name not in packed_names:
            parameters += tensor.numel()
    quant_bytes = sum(m.weight_nbytes for m in quant_modules.values())
    quant_params = sum(m.in_features * m.out_features for m in quant_modules.values())
    return SizeResult(
        weight_bytes=total_bytes,
        parameters=parameters + quant_params,
        quantized_weight_bytes=quant_bytes,
        quantized_parameters=quant_params,
        bits_per_weight=8 * quant_bytes / quant_params if quant_params else None,
    )
