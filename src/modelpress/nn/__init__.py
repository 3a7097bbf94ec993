from modelpress.nn import triton_backend  # noqa: F401  (registers the CUDA backend; imports Triton only on use)
from modelpress.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
