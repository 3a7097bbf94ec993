"""triton_skinny.skinny_linear (float matmuls of 2..16 rows, CUDA) against a float64 reference, where it declines,
and its use by the decode-time fusions: captured few-row calls of a verifying model's float layers only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama

from modelpress.nn import triton_skinny


def test_it_declines_calls_it_does_not_serve():
    """CPU tensors, one row or more than MAX_ROWS, K off the step, float32: None, for the caller's F.linear."""
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    assert triton_skinny.skinny_linear(torch.randn(4, 256, dtype=torch.bfloat16), w) is None  # CPU
    if not torch.cuda.is_available():
        return
    cw = w.cuda()
    for x in (torch.randn(1, 256), torch.randn(17, 256), torch.randn(4, 200)):
        x = x.to(torch.bfloat16).cuda()
        assert triton_skinny.skinny_linear(x, cw if x.shape[1] == 256 else cw[:, :200]) is None
    assert triton_skinny.skinny_linear(torch.randn(4, 256).cuda(), cw.float()) is None


def test_block_n_fills_the_gpu():
    assert triton_skinny.block_n(4096) == 16   # 256 programs
    assert triton_skinny.block_n(12288) == 32  # 384
    assert triton_skinny.block_n(22016) == 64  # 344
    assert triton_skinny.block_n(100) == 16


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k", [(2, 4096, 4096), (5, 1000, 384), (16, 96, 128), (7, 22016, 4096),
                                     (3, 4096, 11008)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_equals_the_float64_product(dtype, m, n, k, bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(1, m, k, generator=gen).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda() if bias else None
    out = triton_skinny.skinny_linear(x, w, b)
    assert out is not None and out.shape == (1, m, n) and out.dtype == dtype
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    # float32 sums of exact products, then one rounding to 16 bits: as close as cuBLAS's own result
    cublas = F.linear(x, w, b)
    err, cublas_err = ((out.double() - ref).abs().max().item(), (cublas.double() - ref).abs().max().item())
    assert err <= 1.5 * cublas_err + 1e-6, (err, cublas_err)


@pytest.mark.gpu
@cuda_only
def test_a_verifying_model_runs_its_captured_few_row_calls_on_the_skinny_kernel(monkeypatch):
    """fuse_for_decode(skinny=True) patches every float linear (sibling groups and the head included); calls of a
    few rows go to the kernel (counted), eager or captured, one-row calls to F.linear; the logits of a captured
    5-token forward match the unfused model's; undo restores the class's forward."""
    from modelpress.inference.fusion import fuse_for_decode

    model = build_tiny_llama(0, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=4, tie_word_embeddings=False).to(torch.bfloat16).cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 5), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    calls = []
    real = triton_skinny.skinny_linear
    monkeypatch.setattr("modelpress.inference.fusion.skinny_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    report, undo = fuse_for_decode(model, relayout=False, skinny=True)
    layers = model.config.num_hidden_layers
    assert report.skinny == 4 * layers + 1  # q/k/v group, o, gate/up group, down; the head
    with torch.no_grad():
        model(input_ids=ids[:, :1])  # one row: F.linear
        assert not calls
        eager = model(input_ids=ids).logits.float()
        assert len(calls) == report.skinny
        static = ids.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            model(input_ids=static)  # warm-up (Triton compiles outside the capture)
        torch.cuda.current_stream().wait_stream(stream)
        calls.clear()
        with torch.cuda.graph(graph):
            out = model(input_ids=static).logits
        graph.replay()
    assert len(calls) == report.skinny
    assert torch.equal(out.float(), eager)  # the same kernels, captured
    assert torch.allclose(eager, expected, atol=3e-2, rtol=3e-2)
    undo()
    assert all("forward" not in vars(m) for m in model.modules())
