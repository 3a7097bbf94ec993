"""torch.ops.modelpress.quant_linear: the same numbers as the backend chain (bit for bit), the same numbers as
dequantize-then-matmul (to float rounding), a well-formed operator (opcheck), and a quantized model that
torch.compile traces in one graph."""

from __future__ import annotations

import pytest
import torch

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.formats import WeightScheme, quantize_weight
from modelpress.nn import QuantLinear
from modelpress.nn.backends import linear_forward
from modelpress.nn.ops import quant_linear, scheme_key, scheme_of_key
from conftest import build_tiny_llama

SPECS = ["int4/g32", "int4-asym/g64", "int4/channel", "int8/channel", "int8-asym/g32", "nf4/g64", "int3/g32",
         "int3-asym/channel", "int4/g32/dq", "int4/tensor"]
N, K = 40, 96


def make_layer(spec: str, perm: bool, bias: bool, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=gen)
    order = torch.randperm(K, generator=gen) if perm else None
    packed = quantize_weight(weight, WeightScheme.parse(spec), input_perm=order)
    return QuantLinear(packed, torch.randn(N, generator=gen) if bias else None)


def op_args(layer: QuantLinear, x: torch.Tensor) -> tuple:
    return (x, layer.qdata, layer.scale, layer.offset, layer.scale_scale, layer.scale_mean, layer.input_perm,
            layer.bias, layer.scheme_key, layer.out_features, layer.in_features)


@pytest.mark.parametrize("spec", SPECS)
def test_scheme_key_round_trip(spec):
    scheme = WeightScheme.parse(spec)
    assert scheme_of_key(scheme_key(scheme)) == scheme


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("spec", SPECS)
@torch.no_grad()
def test_op_equals_backend_chain_and_reference(spec, perm, dtype):
    layer = make_layer(spec, perm, bias=True)
    x = torch.randn(2, 3, K).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    assert torch.equal(y, linear_forward(x, layer.packed, layer.bias))  # the same code path: bit for bit
    ref = x.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
    # float32: the reference path's own rounding; bfloat16: the activations' and the CPU kernels' rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("spec", ["int4/g32", "nf4/g64", "int8-asym/channel"])
def test_opcheck(spec):
    layer = make_layer(spec, perm=True, bias=True)
    for x in (torch.randn(3, K), torch.randn(2, 3, K, dtype=torch.bfloat16)):
        torch.library.opcheck(quant_linear, op_args(layer, x))  # schema, fake tensors, AOT dispatch


@torch.no_grad()
def test_eager_cpu_calls_skip_the_operator_and_follow_the_buffers(monkeypatch):
    """Eager CPU calls without autograd run the operator's implementation directly (no dispatch per call), on
    whatever tensors the buffers are now: replacing a buffer, or moving the layer, is seen at the next call."""
    import copy
    import pickle

    from modelpress.nn import quant_linear as module

    layer = make_layer("int4/g32", perm=True, bias=True)
    x = torch.randn(1, K)
    expected = quant_linear(*op_args(layer, x))

    def no_operator(*args):
        raise AssertionError("the operator was called")

    monkeypatch.setattr(module, "quant_linear", no_operator)
    assert torch.equal(layer(x), expected)
    layer.scale = layer.scale * 2  # a new tensor in the buffer slot, not an in-place edit
    assert torch.allclose(layer(x) - layer.bias, 2 * (expected - layer.bias), rtol=1e-5, atol=1e-5)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), layer.to(torch.device("cpu"))):
        assert torch.equal(other(x), layer(x))
    assert copy.deepcopy(layer).__dict__["_view"] is None  # the cached view is never copied or pickled


def test_backward_matches_dequantized_weight():
    layer = make_layer("int4-asym/g32", perm=True, bias=True)
    layer.bias.requires_grad_(True)
    x = torch.randn(5, K, requires_grad=True)
    grad = torch.randn(5, N)
    y = layer(x)
    assert torch.equal(y, linear_forward(x.detach(), layer.packed, layer.bias.detach()))
    y.backward(grad)
    assert torch.allclose(x.grad, grad @ layer.dequantized_weight(), atol=1e-5)
    assert torch.allclose(layer.bias.grad, grad.sum(0), atol=1e-5)


def test_compiled_backward_through_quantized_layer():
    torch._dynamo.reset()
    layer = make_layer("nf4/g32", perm=False, bias=True)
    x = torch.randn(4, K, requires_grad=True)
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    expected = torch.autograd.grad(layer(x).square().sum(), x)[0]
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_fake_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = make_layer("int4/g32", perm=False, bias=False)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(7, K, dtype=torch.bfloat16))
        y = quant_linear(*op_args(layer, x))
    assert y.shape == (7, N) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["int4/g32", "nf4/g16"])
@torch.no_grad()
def test_compiled_quantized_llama_matches_eager(spec):
    torch._dynamo.reset()
    model = build_tiny_llama(num_hidden_layers=1)
    quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    eager = model(input_ids=ids, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    logits = compiled(input_ids=ids, use_cache=False).logits
    # the operator runs the same kernels; inductor may reorder the float32 arithmetic around it
    assert torch.allclose(logits, eager, atol=1e-4, rtol=1e-4)


# ---- CUDA (skipped without it): the Triton kernels behind the operator, compiled and captured ----

@pytest.mark.gpu
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("spec", SPECS)
@torch.no_grad()
def test_op_on_cuda_equals_backend_chain_and_reference(cuda, spec, perm):
    layer = make_layer(spec, perm, bias=True).to(cuda)
    for rows in (1, 5, 80):  # GEMV, fused tensor-core kernel, dequantize + cuBLAS
        x = torch.randn(rows, K, device=cuda).to(torch.bfloat16)
        y = layer(x)
        assert torch.equal(y, linear_forward(x, layer.packed, layer.bias))
        ref = x.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@torch.no_grad()
def test_compiled_quantized_llama_on_cuda(cuda, mode):
    torch._dynamo.reset()
    model = build_tiny_llama().to(cuda, torch.bfloat16)
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    ids = torch.randint(0, 320, (1, 12), device=cuda)
    eager = model(input_ids=ids, use_cache=False).logits.float()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead: warm-up, record, replay
        logits = compiled(input_ids=ids, use_cache=False).logits.float()
    assert ((logits - eager).norm() / eager.norm()).item() < 2e-2


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_captures_a_quantized_layer(cuda):
    layer = make_layer("int4/g32", perm=True, bias=True).to(cuda)
    x = torch.randn(1, K, device=cuda, dtype=torch.bfloat16)
    expected = layer(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, layer(x)) and not torch.equal(y, expected)
