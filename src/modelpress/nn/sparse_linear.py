"""Layers that pruning leaves behind, stored so that the bytes really shrink.

SparseLinear: a pruned (out_features N, in_features K) weight kept as a bitmask plus the kept values.
- mask     uint8 (N, row_bytes)   1 bit per weight, 1 = kept, packed like 1-bit codes (formats/packing.py:
                                  bit k % 8 of byte k // 8 of the row; rows padded to 4 bytes)
- values   (nnz,) float           the kept weights, row by row in column order, in the layer's own dtype
  or, with the kept values quantized (SparseGPT jointly with quantization),
- qdata, scale, offset, ...       a PackedWeight of shape (N, kept_per_row): every row keeps the same count
                                  (N:M patterns, per-row or per-group sparsity), so the kept values form a
                                  matrix and groups of its scheme run over kept values only.
Dense weight: zero except W[mask] = values, filled in row-major order.

Why a bitmask for N:M too: 2:4 position indices (2 bits per kept value) cost the same 4 bits per 4 weights
as the bitmask, and 4:8 indices cost 12 bits per 8 weights against the bitmask's 8. At 50% sparsity in
fp16 a layer stores 0.5·16 + 1 = 9 bits per weight instead of 16 (44% fewer bytes); with int4/g128 values,
0.5·(4 + 32/64) + 1 ≈ 3.3 bits per weight.

forward reconstructs the dense weight in the input's dtype (the reference path, every device). On CUDA,
a 2:4 layer with float16/bfloat16 inputs multiplies on sparse tensor cores: cuSPARSELt called directly,
else PyTorch's semi-structured sparse tensor (cuSPARSELt or CUTLASS), else the dense path; the sparse
copy is made once and cached (outside the state dict) until the layer moves. On an H100 (torch 2.11)
the public tensor-subclass path took ~0.7 ms per call whatever the shape (host-side dispatch, not the
kernel), which is why the direct call is tried first.

ResizedLinear: a plain nn.Linear whose shape differs from what the model's config implies (structured
pruning with different widths per layer); registered so a saved model rebuilds it with the right shape.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, empty_packed
from modelpress.formats.packing import pack_codes, packed_row_bytes, unpack_codes
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.registry import register_module_kind

log = logging.getLogger(__name__)

SEMI_STRUCTURED = (2, 4)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, row_bytes) uint8, 1 bit per weight."""
    return pack_codes(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return unpack_codes(packed, 1, in_features).bool()


def scatter_dense(mask: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense (N, K) weight in `dtype`: zeros, and `values` (row-major order) where `mask` is True."""
    return torch.zeros(mask.shape, dtype=dtype, device=values.device).masked_scatter_(mask, values.to(dtype))


def _cusparselt_kernel(weight: torch.Tensor, out_dtype: torch.dtype | None = None, row_tile: int = 8):
    """y = x Wᵀ through cuSPARSELt directly: W compressed once; x padded to whole tiles of `row_tile` rows."""
    if not torch.backends.cusparselt.is_available():
        raise RuntimeError("cuSPARSELt is not available in this PyTorch build")
    packed = torch._cslt_compress(weight)

    def matmul(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        pad = (-rows) % row_tile
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return torch._cslt_sparse_mm(packed, x.t(), out_dtype=out_dtype, transpose_result=True)[:rows]  # (M, N)

    return matmul


def is_semi_structured(weight: torch.Tensor) -> bool:
    """True where every run of 4 weights along a row (K) holds at most 2 non-zeros (the 2:4 pattern)."""
    n, k = weight.shape
    return k % 4 == 0 and bool(((weight.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all())


def cusparselt_int8_kernel(weight: torch.Tensor):
    """acc = a Wᵀ for int8 a (M, K) and a 2:4 int8 W (N, K), through cuSPARSELt with int32 output: the same
    integers torch._int_mm gives. W is compressed once; a is padded to whole tiles of 16 rows."""
    return _cusparselt_kernel(weight, out_dtype=torch.int32, row_tile=16)


def _subclass_kernel(weight: torch.Tensor):
    """y = x Wᵀ through PyTorch's public semi-structured sparse tensor."""
    from torch.sparse import to_sparse_semi_structured

    sparse = to_sparse_semi_structured(weight)
    return lambda x: F.linear(x, sparse)


_SPARSE_KERNELS = {"cusparselt": _cusparselt_kernel, "semi_structured": _subclass_kernel}
SEMI_STRUCTURED_BY_DEFAULT = False


@register_module_kind("sparse_linear")
class SparseLinear(nn.Module):
    def __init__(self, mask: torch.Tensor, values: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None,
                 pattern: tuple[int, int] | None = None, packed_mask: bool = False,
                 in_features: int | None = None) -> None:
        """`mask` (N, K) bool (or already packed with `packed_mask=True`, then give `in_features`); `values`
        the kept weights (nnz,) or a PackedWeight (N, kept_per_row); `pattern` (n, m) when the mask is N:M."""
        super().__init__()
        if packed_mask:
            self.out_features, self.in_features = mask.shape[0], int(in_features)  # type: ignore[arg-type]
            self.register_buffer("mask", mask)
        else:
            self.out_features, self.in_features = mask.shape
            self.register_buffer("mask", pack_mask(mask))
        self.pattern = None if pattern is None else (int(pattern[0]), int(pattern[1]))
        self.scheme: WeightScheme | None = None
        if isinstance(values, PackedWeight):
            if values.shape[0] != self.out_features:
                raise ModelpressError(f"packed kept values have {values.shape[0]} rows, the mask {self.out_features}")
            self.scheme = values.scheme
            self.kept_per_row = values.shape[1]
            for name in PackedWeight.TENSOR_NAMES:
                self.register_buffer(name, getattr(values, name))
        else:
            self.kept_per_row = None
            self.register_buffer("values", values.detach().reshape(-1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Off by default: on an H100 with torch 2.11 the sparse kernels lost to dense fp16 on every shape we timed
        # (bench/sparse_gpu.py, docs/benchmarks.md): 0.2-1.0x under CUDA graphs, and ~0.2 s of host work per
        # eager call. Set True to use them (2:4 layers on CUDA in fp16/bf16).
        self.use_semi_structured = SEMI_STRUCTURED_BY_DEFAULT
        self.semi_structured_backend: str | None = next(iter(_SPARSE_KERNELS))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                   pattern: tuple[int, int] | None = None) -> SparseLinear:
        """Keep `weight[mask]` (in the weight's own dtype)."""
        return cls(mask, weight.detach()[mask], bias, pattern)

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    @property
    def packed_values(self) -> PackedWeight | None:
        if self.scheme is None:
            return None
        return PackedWeight(scheme=self.scheme, shape=(self.out_features, self.kept_per_row),  # type: ignore[arg-type]
                            **{name: getattr(self, name) for name in PackedWeight.TENSOR_NAMES})

    def keep_mask(self) -> torch.Tensor:
        """(N, K) bool, True where the weight is kept."""
        return unpack_mask(self.mask, self.in_features)

    @property
    def nnz(self) -> int:
        return self.out_features * self.kept_per_row if self.kept_per_row is not None else self.values.numel()

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: mask plus kept values (and their scales)."""
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers())

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        packed = self.packed_values
        if packed is not None:
            dtype = dtype or torch.float32
            kept = packed.dequantize(dtype).reshape(-1)
        else:
            dtype = dtype or self.values.dtype
            kept = self.values
        return scatter_dense(self.keep_mask(), kept, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._sparse_kernel(x)
        if kernel is not None:
            flat = x.reshape(-1, x.shape[-1])
            try:
                out = kernel(flat)
            except (RuntimeError, NotImplementedError) as err:  # e.g. no sparse kernel for this GPU
                self._next_kernel(err)
                return self.forward(x)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dense_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _sparse_kernel(self, x: torch.Tensor):
        """A function (M, K) -> (M, N) running this 2:4 layer on sparse tensor cores, or None. Tried in
        order: cuSPARSELt called directly (`torch._cslt_sparse_mm`, no tensor-subclass dispatch per call),
        then PyTorch's public semi-structured tensor (cuSPARSELt or CUTLASS), then the dense path."""
        if (not self.use_semi_structured or self.pattern != SEMI_STRUCTURED or x.device.type != "cuda"
                or x.dtype not in _HALF_DTYPES):
            return None
        key = (x.device, x.dtype, self.semi_structured_backend)
        cached = self.__dict__.get("_semi")
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            kernel = _SPARSE_KERNELS[self.semi_structured_backend](self.dense_weight(x.dtype))
        except (RuntimeError, ValueError, NotImplementedError, AttributeError) as err:
            self._next_kernel(err)
            return self._sparse_kernel(x)
        self.__dict__["_semi"] = (key, kernel)
        return kernel

    def _next_kernel(self, err: Exception) -> None:
        order = list(_SPARSE_KERNELS)
        failed = self.semi_structured_backend
        position = order.index(failed) + 1 if failed in order else len(order)
        self.semi_structured_backend = order[position] if position < len(order) else None
        self.use_semi_structured = self.semi_structured_backend is not None
        self.__dict__.pop("_semi", None)
        log.warning("2:4 layer %dx%d: %s failed (%s); now %s", self.out_features, self.in_features, failed,
                    str(err).splitlines()[0] if str(err) else type(err).__name__,
                    self.semi_structured_backend or "the dense path")

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_semi", None)  # the cached sparse copy belongs to the old device/dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kept = f"{self.nnz}/{self.out_features * self.in_features} kept"
        pattern = f", pattern={self.pattern[0]}:{self.pattern[1]}" if self.pattern else ""
        values = f", values={self.scheme.spec}" if self.scheme else f", values={self.values.dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kept}{pattern}{values}, "
                f"bias={self.bias is not None}")

    def record(self) -> dict:
        rec = {"shape": [self.out_features, self.in_features], "bias": self.bias is not None,
               "pattern": None if self.pattern is None else list(self.pattern), "nnz": self.nnz}
        if self.scheme is not None:
            rec.update(scheme=asdict(self.scheme), kept_per_row=self.kept_per_row,
                       input_perm=self.input_perm is not None)
        else:
            rec["dtype"] = str(self.values.dtype).removeprefix("torch.")
        return rec

    @classmethod
    def from_record(cls, record: dict, device: torch.device | str = "cpu") -> SparseLinear:
        """An instance with correctly shaped, uninitialised tensors, to be filled by load_state_dict."""
        n, k = (int(v) for v in record["shape"])
        mask = torch.empty(n, packed_row_bytes(k, 1), dtype=torch.uint8, device=device)
        if record.get("scheme") is not None:
            values: torch.Tensor | PackedWeight = empty_packed(
                WeightScheme(**record["scheme"]), (n, int(record["kept_per_row"])),
                has_perm=bool(record.get("input_perm")), device=device)
        else:
            values = torch.empty(int(record["nnz"]), dtype=getattr(torch, record["dtype"]), device=device)
        bias = torch.empty(n, device=device) if record["bias"] else None
        pattern = record.get("pattern")
        return cls(mask, values, bias, None if pattern is None else tuple(pattern), packed_mask=True, in_features=k)


@register_module_kind("resized_linear")
class ResizedLinear(nn.Linear):
    """nn.Linear with a per-layer shape (structured pruning with non-uniform widths)."""

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> ResizedLinear:
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return new

    def record(self) -> dict:
        return {"shape": [self.out_features, self.in_features], "bias": self.bias is not None,
                "dtype": str(self.weight.dtype).removeprefix("torch.")}

    @classmethod
    def from_record(cls, record: dict, device: torch.device | str = "cpu") -> ResizedLinear:
        n, k = (int(v) for v in record["shape"])
        return cls(k, n, bias=bool(record["bias"]), device=device, dtype=getattr(torch, record.get("dtype", "float32")))
