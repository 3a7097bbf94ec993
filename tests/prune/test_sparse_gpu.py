"""The 2:4 GPU path of SparseLinear (semi-structured sparse tensors). Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from modelpress.algorithms.prune.masks import NMPattern, nm_mask
from modelpress.nn.sparse_linear import SparseLinear

pytestmark = pytest.mark.gpu


def test_every_sparse_kernel_matches_the_dense_product(cuda):
    from modelpress.nn.sparse_linear import _SPARSE_KERNELS

    torch.manual_seed(1)
    weight = torch.randn(128, 256, dtype=torch.float16) / 16
    dense = (weight * nm_mask(weight.abs().float(), NMPattern(2, 4))).to(cuda)
    x = torch.randn(37, 256, device=cuda, dtype=torch.float16)  # rows not a multiple of 8: padded
    ran = []
    for name, build in _SPARSE_KERNELS.items():
        try:
            y = build(dense)(x)
        except (RuntimeError, NotImplementedError):
            continue
        torch.testing.assert_close(y, F.linear(x, dense), rtol=2e-2, atol=2e-2)
        ran.append(name)
    if not ran:
        pytest.skip("no semi-structured sparse kernel on this GPU/PyTorch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2_4_layer_on_cuda_matches_the_dense_masked_product(cuda, dtype):
    torch.manual_seed(0)
    weight = torch.randn(256, 512, dtype=dtype) / 512**0.5
    mask = nm_mask(weight.abs().float(), NMPattern(2, 4))
    layer = SparseLinear.from_dense(weight, mask, torch.randn(256, dtype=dtype), (2, 4)).to(cuda)
    layer.use_semi_structured = True  # opt-in (off by default: slower than dense where measured)
    dense = (weight * mask).to(cuda)
    for rows in (1, 64):
        x = torch.randn(2, rows, 512, device=cuda, dtype=dtype)
        expected = F.linear(x, dense, layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
    if not layer.use_semi_structured:
        pytest.skip("this GPU/PyTorch has no semi-structured sparse kernel; the dense fallback was checked")
    assert "_semi" in layer.__dict__ and layer.semi_structured_backend in ("cusparselt", "semi_structured")
    layer.cpu()  # moving drops the cached sparse copy
    assert "_semi" not in layer.__dict__
