"""Dynamic int8 quantization of ordinary PyTorch models: Linear and LSTM layers.

Weights are quantized once, to int8 with one scale per output row (scheme int8/channel), and stored only
as packed codes and scales. Activations are quantized at run time:
- DynamicInt8Linear: every token (row of the flattened input) gets its own absmax scale, and the product
  is a real int8 x int8 -> int32 matmul (`torch._int_mm`; on CUDA a Triton GEMM, triton_int8.py), rescaled by
  the row scale times the channel scale:  y[m, n] = sx[m] · sw[n] · Σ_k qx[m, k] · qw[n, k] + bias[n].
- DynamicInt8LSTM: the int8 weights of every layer and direction are dequantized at forward and handed to
  torch's own LSTM, so every LSTM feature (batch_first, stacking, bidirectional, projections, packed
  sequences) behaves as in nn.LSTM while the stored weights are a quarter of float32.
Both register as compressed module kinds, so save/load rebuild them from their records.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, empty_packed, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import find_linear_layers, linear_weight, replace_module
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.registry import register_module_kind

INT8_MAX = 127
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DynamicInt8Config:
    linear: bool = True             # replace nn.Linear (and transformers Conv1D)
    lstm: bool = True               # replace nn.LSTM
    skip: tuple[str, ...] = ()      # module name patterns left in float (fnmatch, full name or last part)
    scale_dtype: str = "float16"    # storage dtype of the per-row weight scales

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(format="int8", granularity="channel", group_size=None, scale_dtype=self.scale_dtype)


# ---- the math: pure functions on tensors -------------------------------------------------------------

def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, K) and float32 scales (M, 1), absmax per row; zero rows get scale 1."""
    amax = x.detach().abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = torch.clamp(torch.round(x.float() / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def int8_weight(packed: PackedWeight) -> torch.Tensor:
    """(N, K) int8 values of a symmetric int8 PackedWeight (stored codes are value + 128)."""
    n, k = packed.shape
    return (packed.qdata[:, :k] ^ 0x80).view(torch.int8)


CUDA_MIN_ROWS = 17   # torch._int_mm on CUDA takes more than 16 rows


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """torch._int_mm takes any shape on CPU; CUDA wants m > 16 and k, n multiples of 8."""
    if not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (N, K)^T int8 -> (M, N) int32-exact result (int32, or float64 where _int_mm cannot run)."""
    m, k = a.shape
    n = b.shape[0]
    if int_mm_supported(m, k, n, a.device):
        return torch._int_mm(a, b.t())
    if int_mm_supported(CUDA_MIN_ROWS, k, n, a.device):
        # CUDA wants m > 16: pad the rows with zeros (decode-sized inputs) and drop them from the result
        padded = torch.zeros(CUDA_MIN_ROWS, k, dtype=a.dtype, device=a.device)
        padded[:m] = a
        return torch._int_mm(padded, b.t())[:m]
    # float64 holds every partial sum of int8 products exactly; slow, used only for odd shapes on GPUs
    return a.double() @ b.double().t()


def dynamic_int8_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                        matmul=None) -> torch.Tensor:
    """y = x @ W^T + b with W the int8/channel `packed` (codes times one scale per row) and x quantized per row.
    `matmul(codes) -> int32 (M, N)` replaces int8_matmul(codes, weight) (a sparse kernel with the same result).
    On CUDA with Triton, x is quantized by one kernel and the product runs as one GEMM with the rescale in its
    epilogue, reading the stored codes (triton_int8.py: the same codes, scales and integer sums); a `matmul`
    keeps its own product, followed by the one-kernel rescale."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    fused = fused_kernels(flat)
    codes, row_scale = fused.quantize_rows(flat) if fused else quantize_rows(flat)
    n = packed.shape[0]
    if fused and matmul is None:
        y = fused.scaled_matmul(codes, row_scale, packed.qdata, packed.scale, bias, x.dtype, flip=True)
        return y.reshape(*shape[:-1], n)
    acc = matmul(codes) if matmul is not None else int8_matmul(codes, int8_weight(packed))  # (M, N)
    if fused and acc.dtype == torch.int32:
        y = fused.rescale(acc, row_scale, packed.scale, bias, x.dtype)
    else:
        y = acc.float() * row_scale * packed.scale.float().reshape(1, -1)  # (M, 1) · (1, N)
        if bias is not None:
            y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)


FUSED_CUDA = True  # set False to run the plain PyTorch ops on CUDA too (benchmarks compare both)


INT8_CAPABILITY = (8, 0)  # Triton's int8 tensor-core products: Ampere and later (triton_backend.FP8_CAPABILITY: fp8)


def fused_kernels(x: torch.Tensor, capability: tuple[int, int] = INT8_CAPABILITY):
    """The Triton module for x's device, or None (CPU, no Triton, the Triton interpreter, switched off, or a GPU
    below the compute capability the caller's products need)."""
    if not (FUSED_CUDA and x.is_cuda):
        return None
    from modelpress.nn.triton_backend import _interpreting, device_capability

    return None if _interpreting() or device_capability(x.device) < capability else _triton_int8()


def eager_prepared(layer: QuantLinear, x: torch.Tensor, prepare, capability: tuple[int, int] = INT8_CAPABILITY):
    """The layer's launcher for x, prepare(x, kernels) -> fn(x) or None, built once per activation shape and
    dtype (and again whenever the layer's tensors move or change in place), for eager CUDA calls; None where x is
    not such a call (autograd, torch.compile, a non-contiguous or misaligned x) or there are no Triton kernels
    (fused_kernels(x, capability))."""
    if not x.is_cuda or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if not x.is_contiguous() or x.data_ptr() % 16:
        return None
    kernels = fused_kernels(x, capability)
    if kernels is None:
        return None
    qdata, scale = layer._buffers["qdata"], layer._buffers["scale"]
    where = (qdata.data_ptr(), scale.data_ptr(), qdata._version, scale._version,
             None if layer.bias is None else layer.bias._version)
    if where != layer._launchers_for:
        layer._launchers = {}
        layer._launchers_for = where
    key = (x.shape, x.dtype)
    if key not in layer._launchers:
        if torch.cuda.is_current_stream_capturing():
            return None   # what prepare keeps (converted scales, bias) must not live in a graph's memory
        layer._launchers[key] = prepare(x, kernels)
    return layer._launchers[key]


@functools.cache
def _triton_int8():
    from modelpress.nn.triton_backend import triton_available

    if not triton_available():
        return None
    from modelpress.nn import triton_int8

    return triton_int8


def check_channel_weight(packed: PackedWeight, format_name: str, layer: str) -> None:
    """What a dynamic layer multiplies in its weight's own format: one scale per row, no double quantization, the
    layer's own column order."""
    scheme = packed.scheme
    if scheme.format != format_name or scheme.granularity != "channel" or scheme.double_quant:
        raise ModelpressError(f"{layer} needs an {format_name}/channel weight, got {scheme.spec}")
    if packed.input_perm is not None:
        raise ModelpressError(f"{layer} does not take a permuted weight (input_perm)")


# ---- the modules ------------------------------------------------------------------------------------

@register_module_kind("dynamic_int8_linear")
class DynamicInt8Linear(QuantLinear):
    """A QuantLinear restricted to int8/channel whose forward multiplies in int8 (see module docstring)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        check_channel_weight(packed, "int8", "DynamicInt8Linear")
        super().__init__(packed, bias)

    @classmethod
    def from_linear(cls, module: nn.Module, scheme: WeightScheme, name: str = "weight") -> DynamicInt8Linear:
        packed = quantize_weight(linear_weight(module), scheme, name=name)
        new = cls(packed, getattr(module, "bias", None))
        return new.to(module.weight.device)

    # Opt-in: where the int8 weight is 2:4 sparse and the input is on CUDA, multiply through cuSPARSELt
    # (bit-identical int32 result; on an H200 1.5-1.9x faster than torch._int_mm from M = 2048 rows up, slower
    # at decode sizes, and ~0.6 ms of host work per eager call in torch 2.11; see docs/benchmarks.md).
    use_semi_structured = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = None if self.use_semi_structured else eager_prepared(self, x, self._prepare_fused)
        if fn is not None:
            return fn(x)
        return dynamic_int8_linear(x, self._packed_view(), self.bias, self._sparse_matmul(x))

    def _prepare_fused(self, x: torch.Tensor, kernels):
        return kernels.prepared_linear(x, self.qdata, self.scale, self.bias, flip=True)

    def _sparse_matmul(self, x: torch.Tensor):
        """The cuSPARSELt int8 kernel for this layer's 2:4 weight, or None (not asked for, not CUDA, not 2:4,
        or no kernel on this GPU: then logged once and the dense integer matmul is used)."""
        if not self.use_semi_structured or x.device.type != "cuda":
            return None
        cached = self.__dict__.get("_semi")
        if cached is None or cached[0] != x.device:
            from modelpress.nn.sparse_linear import cusparselt_int8_kernel, is_semi_structured

            weight = int8_weight(self.packed)
            kernel = None
            if is_semi_structured(weight):
                try:
                    kernel = cusparselt_int8_kernel(weight)
                except (RuntimeError, NotImplementedError) as err:
                    log.warning("int8 2:4 layer %s: no cuSPARSELt kernel (%s); dense int8 matmul",
                                tuple(weight.shape), str(err).splitlines()[0] if str(err) else type(err).__name__)
            cached = self.__dict__["_semi"] = (x.device, kernel)
        return cached[1]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_semi", None)  # the compressed copy belongs to the old device
        return super()._apply(fn, recurse)


LSTM_FIELDS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
               "proj_size")


@register_module_kind("dynamic_int8_lstm")
class DynamicInt8LSTM(nn.Module):
    """nn.LSTM with every weight matrix stored as int8 codes plus one scale per row; biases stay float.

    Buffers per weight W of nn.LSTM (weight_ih_l0, weight_hh_l0_reverse, ...): `W_qdata` (rows, row_bytes)
    uint8 and `W_scale` (rows, 1). Forward runs a parameter-free nn.LSTM template (meta tensors, kept out
    of the module tree so it never reaches state_dict) on the dequantized weights via functional_call.
    """

    def __init__(self, settings: dict, packed: dict[str, PackedWeight], biases: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.settings = {key: settings[key] for key in LSTM_FIELDS}
        with torch.device("meta"):
            template = nn.LSTM(**self.settings)
        self.__dict__["_template"] = template  # plain attribute: not a submodule
        self.weight_names = [n for n, _ in template.named_parameters() if n.startswith("weight_")]
        self.bias_names = [n for n, _ in template.named_parameters() if n.startswith("bias_")]
        if sorted(packed) != sorted(self.weight_names) or sorted(biases) != sorted(self.bias_names):
            raise ModelpressError(f"LSTM weights {sorted(packed)} / biases {sorted(biases)} do not match an "
                                  f"nn.LSTM with {self.settings}")
        schemes = {p.scheme for p in packed.values()}
        if len(schemes) != 1:
            raise ModelpressError(f"LSTM weights must share one scheme, got {sorted(s.spec for s in schemes)}")
        self.scheme: WeightScheme = schemes.pop()
        self.shapes = {name: p.shape for name, p in packed.items()}
        for name, p in packed.items():
            self.register_buffer(f"{name}_qdata", p.qdata)
            self.register_buffer(f"{name}_scale", p.scale)
        for name, b in biases.items():
            self.register_parameter(name, nn.Parameter(b.detach().clone(), requires_grad=False))

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, scheme: WeightScheme, name: str = "lstm") -> DynamicInt8LSTM:
        settings = {key: getattr(lstm, key) for key in LSTM_FIELDS}
        params = dict(lstm.named_parameters())
        packed = {n: quantize_weight(p, scheme, name=f"{name}.{n}")
                  for n, p in params.items() if n.startswith("weight_")}
        biases = {n: p for n, p in params.items() if n.startswith("bias_")}
        device = next(iter(params.values())).device
        return cls(settings, packed, biases).to(device)

    def packed(self, name: str) -> PackedWeight:
        return PackedWeight(scheme=self.scheme, shape=self.shapes[name],
                            qdata=getattr(self, f"{name}_qdata"), scale=getattr(self, f"{name}_scale"))

    @property
    def weight_nbytes(self) -> int:
        return sum(self.packed(name).nbytes for name in self.weight_names)

    def forward(self, input, hx=None):
        dtype = input.data.dtype if isinstance(input, nn.utils.rnn.PackedSequence) else input.dtype
        params = {name: self.packed(name).dequantize(dtype) for name in self.weight_names}
        params.update({name: getattr(self, name).to(dtype) for name in self.bias_names})
        template = self._template
        template.train(self.training)
        return functional_call(template, params, (input,) if hx is None else (input, hx))

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{fields}, int8 weights {self.weight_nbytes} bytes"

    def record(self) -> dict:
        return {"settings": dict(self.settings), "scheme": asdict(self.scheme)}

    @classmethod
    def from_record(cls, record: dict, device: torch.device | str = "cpu") -> DynamicInt8LSTM:
        """An instance with correctly shaped, uninitialised tensors, to be filled by load_state_dict."""
        scheme = WeightScheme(**record["scheme"])
        with torch.device("meta"):
            template = nn.LSTM(**record["settings"])
        shapes = {n: tuple(p.shape) for n, p in template.named_parameters()}
        packed = {n: empty_packed(scheme, s, device=device) for n, s in shapes.items() if n.startswith("weight_")}
        biases = {n: torch.empty(s, device=device) for n, s in shapes.items() if n.startswith("bias_")}
        return cls(record["settings"], packed, biases)


# ---- the entry point ---------------------------------------------------------------------------------

def quantize_dynamic(model: nn.Module, config: DynamicInt8Config | None = None) -> nn.Module:
    """Replace the model's Linear and LSTM layers by dynamic int8 ones, in place; returns the model."""
    config = config or DynamicInt8Config()
    scheme = config.scheme
    targets: dict[str, nn.Module] = {}
    if config.linear:
        # nn.MultiheadAttention reads its out_proj.weight directly instead of calling the module: leave it
        attention = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
        targets.update({name: m for name, m in find_linear_layers(model, config.skip).items()
                        if not name.startswith(attention)})
    if config.lstm:
        targets.update({name: m for name, m in model.named_modules()
                        if type(m) is nn.LSTM and not _skipped(name, config.skip)})
    if not targets:
        raise ModelpressError(f"no Linear or LSTM layers to quantize in {type(model).__name__} "
                              f"(skip patterns: {list(config.skip)})")
    for name, module in targets.items():
        if isinstance(module, nn.LSTM):
            new: nn.Module = DynamicInt8LSTM.from_lstm(module, scheme, name=name)
        else:
            new = DynamicInt8Linear.from_linear(module, scheme, name=f"layer {name}")
        if name:
            replace_module(model, name, new)
        else:
            return new  # the model itself was a single Linear or LSTM
    return model


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)

