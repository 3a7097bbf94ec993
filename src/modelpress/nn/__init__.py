from modelpress.nn import (
    cpu_backend,  # noqa: F401  (registers the CPU backend: packed int4/int8 kernels)
    dynamic_fp8,  # noqa: F401  (registers the dynamic fp8 kind for loading)
    triton_backend,  # noqa: F401  (registers the CUDA backend; imports Triton only on use)
    w8a8_linear,  # noqa: F401  (registers w8a8_linear and the dynamic int8 kinds for loading)
)
from modelpress.nn.quant_embedding import QuantEmbedding
from modelpress.nn.quant_experts import QuantExperts
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.sparse_linear import ResizedLinear, SparseLinear

__all__ = ["QuantEmbedding", "QuantExperts", "QuantLinear", "ResizedLinear", "SparseLinear"]
