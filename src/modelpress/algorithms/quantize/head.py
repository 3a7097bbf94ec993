"""The output head (and the token embedding tied to it), quantized round-to-nearest after the method that
quantized the decoder's linear layers.

Every method skips the head (nn/layers.py DEFAULT_SKIP): it is not part of the blocks a calibrated method
solves. Kept float it is often a fifth of a small model's weights; llama.cpp stores it as Q8_0 (int8/g32).
`HeadConfig(scheme)` quantizes it alone, as one more registered quantizer (a recipe stage `head`, or
`modelpress quantize --head SCHEME` after the method):
- an untied head becomes a QuantLinear;
- a head tied to the embedding (lm_head.weight is the embedding's weight) becomes a QuantLinear AND the
  embedding a QuantEmbedding holding the very same packed tensors, so the model stays tied and a saved
  model holds the packed table once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme, as_scheme
from modelpress.nn.layers import is_linear, linear_weight, output_head_names, replace_module
from modelpress.nn.quant_embedding import QuantEmbedding, check_gatherable
from modelpress.nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class HeadConfig:
    scheme: WeightScheme | str                 # a WeightScheme or its spec, e.g. "int8/g32" (llama.cpp's Q8_0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", as_scheme(self.scheme))


@dataclass(frozen=True)
class HeadReport:
    head: str                      # the head's module name
    embedding: str | None          # the tied embedding's module name; None when the head is untied
    scheme: str
    float_bytes: int               # the float table as it was (once, when tied)
    packed_bytes: int              # the packed table (once, when tied)

    def to_json(self) -> dict:
        return {"head": self.head, "tied_embedding": self.embedding, "scheme": self.scheme,
                "float_bytes": self.float_bytes, "packed_bytes": self.packed_bytes}


def check_head(model: nn.Module, config: HeadConfig) -> None:
    """Everything quantize_head would refuse, checked without changing the model: callers run it before a
    long method (GPTQ, a recipe) so that a head it cannot take fails first, not after hours."""
    _head_and_embedding(model, config)


def _head_and_embedding(model: nn.Module, config: HeadConfig):
    """(head name, head, tied embedding name, tied embedding), the embedding None when untied; refusals here."""
    name, head = _output_head(model)
    embedding_name, embedding = _tied_embedding(model, head)
    if embedding is not None:
        check_gatherable(config.scheme)  # type: ignore[arg-type]
    return name, head, embedding_name, embedding


def quantize_head(model: nn.Module, config: HeadConfig) -> HeadReport:
    """Quantize `model`'s output head in place (and its tied embedding with it, sharing one packed table)."""
    name, head, embedding_name, embedding = _head_and_embedding(model, config)
    scheme: WeightScheme = config.scheme  # type: ignore[assignment]
    weight = linear_weight(head)
    packed = quantize_weight(weight, scheme, name=f"output head {name}")
    new = QuantLinear(packed, getattr(head, "bias", None))
    replace_module(model, name, new)
    if embedding is not None:
        assert embedding_name is not None
        replace_module(model, embedding_name,
                       QuantEmbedding.tied_to(new, dtype=embedding.weight.dtype, padding_idx=embedding.padding_idx))
    return HeadReport(name, embedding_name, scheme.spec, weight.numel() * weight.element_size(), packed.nbytes)


def _output_head(model: nn.Module) -> tuple[str, nn.Module]:
    names = sorted(output_head_names(model))
    if not names:
        raise ModelpressError(f"{type(model).__name__} has no output head (get_output_embeddings() is None): "
                              f"nothing for --head to quantize")
    head = model.get_submodule(names[0])
    if isinstance(head, QuantLinear):
        raise ModelpressError(f"the output head {names[0]} is already quantized ({head.scheme.spec})")
    if not is_linear(head):
        raise ModelpressError(f"the output head {names[0]} is a {type(head).__name__}, not a linear layer; "
                              f"--head quantizes linear heads only")
    if head.weight.is_meta:
        raise ModelpressError(f"the output head {names[0]} has no weights in memory (a streamed model?); "
                              f"quantize the head of a loaded model")
    return names[0], head


def _tied_embedding(model: nn.Module, head: nn.Module) -> tuple[str | None, nn.Embedding | None]:
    """The input embedding whose weight IS the head's weight, or (None, None) for an untied head."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None or getattr(embedding, "weight", None) is not head.weight:
        return None, None
    if type(embedding) is not nn.Embedding:
        # a subclass may scale or offset what it returns (Gemma's scaled embedding); a plain gather would not
        raise ModelpressError(f"the output head is tied to a {type(embedding).__name__}, whose forward is not a "
                              f"plain row lookup; --head handles heads tied to torch.nn.Embedding only")
    name = next(n for n, m in model.named_modules() if m is embedding)
    return name, embedding
