"""QuantExperts: the packed stand-in for a fused mixture-of-experts parameter.

transformers 5 keeps all experts of an MoE layer in 3-D parameters (experts, out, in), and its eager
expert loop reads one expert at a time as `param[e]`. QuantExperts takes the parameter's place and answers
`experts[e]` with expert e's weight dequantized from its own PackedWeight, so the model's own forward runs
unchanged. The batched/grouped expert kernels of transformers want one dense 3-D tensor; a model holding
QuantExperts is therefore switched to the eager expert loop (`prepare_model`).

Buffers stack the experts' packed tensors: qdata (E, N, row_bytes), scale (E, N, G) or (E, 1, 1), offset
likewise for affine formats, input_perm (E, K) when any expert uses activation order (identity rows for
those that do not), scale_scale / scale_mean (E, ...) with double quantization.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, empty_packed
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.registry import register_module_kind


@register_module_kind("quant_experts")
class QuantExperts(nn.Module):
    def __init__(self, packed: list[PackedWeight], dtype: torch.dtype = torch.float32, transposed: bool = False):
        super().__init__()
        if not packed:
            raise ModelpressError("QuantExperts needs at least one expert")
        schemes = {p.scheme for p in packed}
        shapes = {p.shape for p in packed}
        if len(schemes) != 1 or len(shapes) != 1:
            raise ModelpressError(f"experts of one parameter must share scheme and shape, got {schemes} / {shapes}")
        self.scheme: WeightScheme = packed[0].scheme
        self.num_experts = len(packed)
        self.out_features, self.in_features = packed[0].shape
        self.dtype = dtype
        self.transposed = transposed
        has_perm = any(p.input_perm is not None for p in packed)
        for name in PackedWeight.TENSOR_NAMES:
            if name == "input_perm":
                parts = [p.input_perm if p.input_perm is not None else
                         torch.arange(self.in_features, dtype=torch.int32, device=p.qdata.device) for p in packed]
                self.register_buffer(name, torch.stack(parts) if has_perm else None)
                continue
            parts = [getattr(p, name) for p in packed]
            self.register_buffer(name, None if parts[0] is None else torch.stack(parts))

    def expert(self, index: int) -> PackedWeight:
        return PackedWeight(scheme=self.scheme, shape=(self.out_features, self.in_features),
                            **{name: None if getattr(self, name) is None else getattr(self, name)[index]
                               for name in PackedWeight.TENSOR_NAMES})

    def __getitem__(self, index) -> torch.Tensor:
        """Expert `index`'s dense weight, (out, in) or (in, out) like the parameter it replaces; a 1-D index
        tensor gives a stack."""
        if isinstance(index, torch.Tensor) and index.dim() > 0:
            return torch.stack([self[int(i)] for i in index.reshape(-1)]).reshape(*index.shape, *self._slice_shape)
        weight = self.expert(int(index)).dequantize(self.dtype)
        return weight.t() if self.transposed else weight

    def __len__(self) -> int:
        return self.num_experts

    @property
    def _slice_shape(self) -> tuple[int, int]:
        n, k = self.out_features, self.in_features
        return (k, n) if self.transposed else (n, k)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, *self._slice_shape))

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.spec}, transposed={self.transposed}")

    def record(self) -> dict:
        return {"scheme": asdict(self.scheme), "shape": [self.num_experts, self.out_features, self.in_features],
                "input_perm": self.input_perm is not None, "dtype": str(self.dtype).removeprefix("torch."),
                "transposed": self.transposed}

    @classmethod
    def from_record(cls, record: dict, device: torch.device | str = "cpu") -> QuantExperts:
        scheme = WeightScheme(**record["scheme"])
        experts, n, k = (int(v) for v in record["shape"])
        one = empty_packed(scheme, (n, k), has_perm=record["input_perm"], device=device)
        dtype = getattr(torch, record.get("dtype", "float32"))
        return cls([one] * experts, dtype=dtype, transposed=bool(record.get("transposed", False)))

    @staticmethod
    def prepare_model(model: nn.Module) -> None:
        """Run the model's experts through transformers' eager loop, which reads experts one at a time."""
        setter = getattr(model, "set_experts_implementation", None)
        if callable(setter):
            setter("eager")
