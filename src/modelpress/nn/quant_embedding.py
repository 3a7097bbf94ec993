"""QuantEmbedding: a token embedding whose table exists only as a PackedWeight.

The table (num_embeddings V, embedding_dim D) is packed row by row like a linear layer's weight (out = V,
in = D), so a model whose output head is tied to its embedding keeps ONE packed tensor set: the head is a
QuantLinear and the embedding a QuantEmbedding whose buffers are the same tensors (`tied_to`). `forward`
gathers the packed rows of the requested tokens and dequantizes only those: (..., ) ids -> (..., D), equal
bit for bit to `packed.dequantize(dtype)[ids]`.

Gathering reads whole packed rows with their (V, G) scales and offsets, so the scheme must keep its scales
per row as stored: double-quantized scales (blocks of B scales across rows) and a column permutation are
refused.

Tied buffers stay one set in memory across `.to()`: the embedding's `_apply` hands its moved tensors to the
head it is tied to (or takes the head's, when the head moved first), so the head's own `_apply` finds them
already where they go.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, empty_packed, expand_groups
from modelpress.formats.packing import unpack_codes
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.registry import register_module_kind


def check_gatherable(scheme: WeightScheme, has_perm: bool = False) -> None:
    """Refuse packings the row gather cannot read, naming the scheme."""
    if scheme.double_quant:
        raise ModelpressError(f"an embedding cannot be stored as {scheme.spec}: double-quantized scales are coded "
                              f"in blocks across rows, which a row gather cannot read; drop /dq")
    if has_perm:
        raise ModelpressError(f"an embedding cannot be stored with a column permutation (GPTQ activation order "
                              f"without static groups); quantize it round-to-nearest")


@register_module_kind("quant_embedding")
class QuantEmbedding(nn.Module):
    def __init__(self, packed: PackedWeight, dtype: torch.dtype = torch.float32, padding_idx: int | None = None):
        super().__init__()
        check_gatherable(packed.scheme, packed.input_perm is not None)
        self.scheme: WeightScheme = packed.scheme
        self.num_embeddings, self.embedding_dim = packed.shape
        self.dtype = dtype
        self.padding_idx = padding_idx
        for name in PackedWeight.TENSOR_NAMES:
            self.register_buffer(name, getattr(packed, name))
        self.__dict__["_tied_head"] = None   # not a submodule: the head is saved under its own name

    @classmethod
    def tied_to(cls, head: nn.Module, dtype: torch.dtype = torch.float32,
                padding_idx: int | None = None) -> QuantEmbedding:
        """An embedding holding the very tensors of `head` (a QuantLinear over the same (V, D) table)."""
        embedding = cls(head.packed, dtype, padding_idx)
        embedding.tie(head)
        return embedding

    def tie(self, head: nn.Module) -> None:
        for name in PackedWeight.TENSOR_NAMES:
            if self._buffers[name] is not head._buffers[name]:
                raise ModelpressError(f"cannot tie the embedding to {type(head).__name__}: their {name} tensors "
                                      f"are not the same tensor")
        self.__dict__["_tied_head"] = head

    @property
    def tied_head(self) -> nn.Module | None:
        return self.__dict__.get("_tied_head")

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(scheme=self.scheme, shape=(self.num_embeddings, self.embedding_dim),
                            **{name: getattr(self, name) for name in PackedWeight.TENSOR_NAMES})

    # size accounting (eval/size.py) reads a compressed layer's weight shape as out/in features
    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def weight_nbytes(self) -> int:
        return self.packed.nbytes

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        k = self.embedding_dim
        values = self.scheme.qformat.decode(unpack_codes(self.qdata[flat], self.scheme.bits, k))   # (M, D)
        g = self.scheme.group_length(k)
        rows = flat.numel()
        per_tensor = self.scale.shape == (1, 1)
        scale = self.scale if per_tensor else self.scale[flat]                                     # (M, G)
        weight = values * expand_groups(scale.float(), rows, k, g)
        if self.offset is not None:
            offset = self.offset if per_tensor else self.offset[flat]
            weight = weight + expand_groups(offset.float(), rows, k, g)
        return weight.to(self.dtype).reshape(*ids.shape, k)

    def _apply(self, fn, recurse: bool = True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype   # model.to(torch.bfloat16) changes the output
        head = self.tied_head
        if head is None:
            return self
        for name, old in before.items():
            if old is None:
                continue
            if head._buffers[name] is old:     # the head has not moved yet: give it our moved tensor
                head._buffers[name] = self._buffers[name]
            else:                              # it moved first: take its tensor, drop our second copy
                self._buffers[name] = head._buffers[name]
        return self

    def extra_repr(self) -> str:
        tied = ", tied to the output head" if self.tied_head is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.spec}, "
                f"bits_per_weight={self.packed.bits_per_weight:.3f}{tied}")

    def record(self) -> dict:
        return {"scheme": asdict(self.scheme), "shape": [self.num_embeddings, self.embedding_dim],
                "dtype": str(self.dtype).removeprefix("torch."), "padding_idx": self.padding_idx}

    @classmethod
    def from_record(cls, record: dict, device: torch.device | str = "cpu") -> QuantEmbedding:
        """An instance with correctly shaped, uninitialised tensors, to be filled by load_state_dict."""
        scheme = WeightScheme(**record["scheme"])
        shape = (int(record["shape"][0]), int(record["shape"][1]))
        dtype = getattr(torch, record.get("dtype", "float32"))
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {record.get('dtype')!r} is not a torch dtype")
        padding = record.get("padding_idx")
        return cls(empty_packed(scheme, shape, device=device), dtype, None if padding is None else int(padding))

    @staticmethod
    def prepare_model(model: nn.Module) -> None:
        """After loading: tie each QuantEmbedding to the layer that holds the same tensors (the output head)."""
        embeddings = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
        for embedding in embeddings:
            for module in model.modules():
                if module is not embedding and getattr(module, "_buffers", {}).get("qdata") is embedding.qdata:
                    embedding.tie(module)
                    break
