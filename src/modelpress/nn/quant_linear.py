"""QuantLinear: a linear layer whose weight exists only as a PackedWeight.

The packed tensors are registered buffers, so `.to(device)`, `state_dict()` and safetensors see exactly
the bytes that are stored. `forward` hands the packed weight to a backend (backends.py): a fused kernel
where one fits the device and format, otherwise dequantize-then-matmul in the activation dtype.

Eager calls without autograd skip the operator (nn/ops.py) and call what it would run: on CUDA a prepared
launcher, on the CPU the backend chain itself (`linear_forward`). At batch-1 decode on the CPU the operator's
dispatch into its Python implementation cost 20-50 us per call, as much as the int4 kernel on these layers.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, empty_packed
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.backends import linear_forward
from modelpress.nn.ops import quant_linear, quant_linear_differentiable, scheme_key
from modelpress.nn.registry import register_module_kind


@register_module_kind("quant_linear")
class QuantLinear(nn.Module):
    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme: WeightScheme = packed.scheme
        self.out_features, self.in_features = packed.shape
        for name in PackedWeight.TENSOR_NAMES:
            self.register_buffer(name, getattr(packed, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.scheme_key = scheme_key(self.scheme)  # static operator arguments, computed once
        # eager CUDA calls: one prepared launcher per (activation shape, dtype), built on first use (see
        # _eager_cuda); dropped whenever the buffers move (their addresses are part of each launcher)
        self._launchers: dict = {}
        self._launchers_for = (0, 0)
        self._view: PackedWeight | None = None  # `packed`, kept while the buffers are the same tensors

    def _packed_view(self) -> PackedWeight:
        view = self.__dict__.get("_view")  # absent in modules pickled before it existed
        if view is None or any(getattr(view, name) is not self._buffers[name] for name in PackedWeight.TENSOR_NAMES):
            view = self._view = self.packed
        return view

    @property
    def packed(self) -> PackedWeight:
        """A view of the current buffers (after any .to()) as a PackedWeight."""
        return PackedWeight(
            scheme=self.scheme,
            shape=(self.out_features, self.in_features),
            **{name: getattr(self, name) for name in PackedWeight.TENSOR_NAMES},
        )

    @property
    def weight_nbytes(self) -> int:
        return self.packed.nbytes

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        words = self.__dict__.get("mma_words")
        if words is not None:  # re-laid for a generation (inference/fusion.py): only the eager CUDA path reads them
            if grad or torch.compiler.is_compiling() or not x.is_cuda:
                raise ModelpressError("this layer's codes are laid out for the tensor-core GEMV while a generation "
                                      "runs: call it without autograd or torch.compile, on CUDA, or after it")
            return self._eager_mma(x, words)
        if not grad and not torch.compiler.is_compiling():
            if x.is_cuda:
                return self._eager_cuda(x)
            if x.device.type == "cpu":
                return linear_forward(x, self._packed_view(), self.bias)
        # one operator call (nn/ops.py): torch.compile sees one node, CUDA graphs capture its kernels
        args = (x, self.qdata, self.scale, self.offset, self.scale_scale, self.scale_mean, self.input_perm,
                self.bias, self.scheme_key, self.out_features, self.in_features)
        if grad:
            return quant_linear_differentiable(*args)
        return quant_linear(*args)

    def _eager_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """The operator's result through a launcher prepared for x's shape and dtype (triton_backend.
        prepared_linear): no operator dispatch, backend chain or kernel argument binding per call, which at
        decode size cost several times the kernel's own run time. Falls back to the operator for anything
        the launcher was not prepared for (non-contiguous or misaligned x, formats the kernels don't read)."""
        where = (self._buffers["qdata"].data_ptr(), self._buffers["scale"].data_ptr())
        if where != self._launchers_for:
            self._launchers = {}
            self._launchers_for = where
        key = (x.shape, x.dtype)
        fn = self._launchers.get(key)
        if fn is None:
            fn = self._launchers[key] = self._prepare(x)
        if x.is_contiguous() and not x.data_ptr() % 16:
            return fn(x)
        return self._operator(x)

    def _eager_mma(self, x: torch.Tensor, words: torch.Tensor, act: bool = False) -> torch.Tensor:
        """The layer's result from codes in the tensor-core GEMV's layout (triton_backend.prepared_mma_linear); act:
        silu(gate) * up of a gated MLP's [gate | up] layer re-laid with its rows interleaved (gated_mma)."""
        from modelpress.nn.triton_backend import prepared_mma_linear

        interleave = self.__dict__.get("mma_interleaved", False)
        # x in fragment order, written beside x by the norm that made it (nn/triton_norm.py; not for one row)
        laid = None if interleave else getattr(x, "mma_laid", None)
        key = (x.shape, x.dtype, "mma", act, laid is not None)
        fn = self._launchers.get(key)
        if fn is None:
            fn = self._launchers[key] = prepared_mma_linear(x, words, self.packed, self.bias, interleave, act,
                                                            laid is not None)
        if laid is not None:
            return fn(x)  # reads x.mma_laid
        if x.is_contiguous() and not x.data_ptr() % 16:
            return fn(x)
        x = x.contiguous()  # prepared for this x: a misaligned one decodes the weight for cuBLAS
        return prepared_mma_linear(x, words, self.packed, self.bias, interleave, act)(x)

    def gated_mma(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up for this layer as a gated MLP's [gate | up] (its first and second halves of rows), in the
        tensor-core GEMV's epilogue: for a layer re-laid with its rows interleaved for it (inference/fusion.py),
        called eagerly on CUDA without autograd; None otherwise (the caller runs the matmul and the activation)."""
        words = self.__dict__.get("mma_words")
        if (words is None or not self.__dict__.get("mma_interleaved", False) or not x.is_cuda
                or torch.is_grad_enabled() and x.requires_grad or torch.compiler.is_compiling()):
            return None
        return self._eager_mma(x, words, act=True)

    def train(self, mode: bool = True) -> QuantLinear:
        self._launchers = {}  # a launcher holds the bias converted to the activation dtype: rebuild after training
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        # launchers hold device addresses; the view holds the buffers a second time
        return {**state, "_launchers": {}, "_launchers_for": (0, 0), "_view": None}

    def _prepare(self, x: torch.Tensor):
        from modelpress.nn.triton_backend import prepared_linear

        if x.is_contiguous() and not x.data_ptr() % 16:
            fn = prepared_linear(x, self.packed, self.bias)
            if fn is not None:
                return fn
        return self._operator

    def _operator(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qdata, self.scale, self.offset, self.scale_scale, self.scale_mean,
                            self.input_perm, self.bias, self.scheme_key, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.spec}, "
                f"bits_per_weight={self.packed.bits_per_weight:.3f}, bias={self.bias is not None}")

    def record(self) -> dict:
        return {
            "scheme": asdict(self.scheme),
            "shape": [self.out_features, self.in_features],
            "bias": self.bias is not None,
            "input_perm": self.input_perm is not None,
        }

    @classmethod
    def from_record(cls, record: dict, device: torch.device | str = "cpu") -> QuantLinear:
        """An instance with correctly shaped, uninitialised tensors, to be filled by load_state_dict."""
        scheme = WeightScheme(**record["scheme"])
        shape = (int(record["shape"][0]), int(record["shape"][1]))
        packed = empty_packed(scheme, shape, has_perm=record["input_perm"], device=device)
        bias = torch.empty(shape[0], device=device) if record["bias"] else None
        return cls(packed, bias)
