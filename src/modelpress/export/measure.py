"""How much an export changed the model: KL(our model ‖ the exported model) on a few windows of text.

The exported model is our model with every re-rounded layer's weight replaced by the float weight the runtime
computes with (ExportResult.runtime_weights, decoded from the exported blocks). Layers are swapped in place
for the measurement and restored afterwards, so no second copy of the model is held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.eval.quality import next_token_logits
from modelpress.nn.layers import replace_module
from modelpress.nn.quant_embedding import QuantEmbedding


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, each named layer is a plain nn.Linear with the given (N, K) weight (bias kept), or an
    nn.Embedding with the given (V, D) table."""
    originals = {}
    for name, weight in weights.items():
        module = model.get_submodule(name)
        if isinstance(module, (nn.Embedding, QuantEmbedding)):
            originals[name] = module
            dtype = module.dtype if isinstance(module, QuantEmbedding) else module.weight.dtype
            replace_module(model, name, nn.Embedding.from_pretrained(weight.to(dtype), freeze=True,
                                                                     padding_idx=module.padding_idx))
            continue
        bias = getattr(module, "bias", None)
        dtype = bias.dtype if bias is not None else torch.float32
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        originals[name] = module
        replace_module(model, name, linear)
    try:
        yield
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)


@torch.no_grad()
def export_kl(model: nn.Module, weights: dict[str, torch.Tensor], windows: torch.Tensor) -> float:
    """Mean KL divergence per scored token of the model with `weights` swapped in, against the model itself.
    Window by window (the swap is a few attribute assignments), so only one window's logits are held."""
    if not weights:
        return 0.0
    total, tokens = 0.0, 0
    for window in windows:
        ours = F.log_softmax(next_token_logits(model, window[None]), dim=-1)
        with swapped_weights(model, weights):
            theirs = F.log_softmax(next_token_logits(model, window[None]), dim=-1)
        total += (ours.exp() * (ours - theirs)).sum().item()
        tokens += ours.shape[1]
    return total / tokens
