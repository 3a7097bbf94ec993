"""Dynamic int8 quantization of plain PyTorch models: int8 matmul parity with a reference written here,
LSTM outputs close to float, state dicts that hold only int8 codes and scales, and save/load round trips."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.nn import dynamic
from modelpress.nn.dynamic import DynamicInt8Config, DynamicInt8Linear, DynamicInt8LSTM, quantize_dynamic
from modelpress.nn.registry import module_for_kind


class TextLSTM(nn.Module):
    def __init__(self, vocab=500, embed=64, hidden=128, layers=2, **lstm_args):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True, **lstm_args)
        width = hidden * (2 if lstm_args.get("bidirectional") else 1)
        self.head = nn.Linear(lstm_args.get("proj_size") or width, vocab)

    def forward(self, ids):
        return self.head(self.lstm(self.embed(ids))[0])


def mlp(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 72, bias=False), nn.GELU(), nn.Linear(72, 10)]
    return nn.Sequential(*layers).eval()


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---- Linear: parity with a plain int8 reference ---------------------------------------------------------

def reference_int8_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Written from the definition: per-row int8 weights (fp16 scales), per-token int8 activations,
    integer products summed exactly (float64), rescaled."""
    w = linear.weight.detach().float()
    w_scale = (w.abs().amax(dim=1) / 127).to(torch.float16).float()
    w_int = torch.clamp(torch.round(w / w_scale[:, None]), -128, 127)
    flat = x.reshape(-1, x.shape[-1]).float()
    x_scale = flat.abs().amax(dim=1) / 127
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    x_int = torch.clamp(torch.round(flat / x_scale[:, None]), -127, 127)
    acc = x_int.double() @ w_int.double().t()
    y = acc * x_scale.double()[:, None] * w_scale.double()[None, :]
    if linear.bias is not None:
        y = y + linear.bias.double()
    return y.float().reshape(*x.shape[:-1], -1)


def test_linear_layers_match_a_reference_int8_computation():
    float_model = mlp()
    model = quantize_dynamic(copy.deepcopy(float_model))
    assert [type(m) for m in model] == [DynamicInt8Linear, nn.GELU, DynamicInt8Linear, nn.GELU, DynamicInt8Linear]
    x = torch.randn(4, 7, 96)
    x[0, 0] = 0  # an all-zero token
    h = x
    for float_layer, layer in zip(float_model, model):
        if isinstance(layer, DynamicInt8Linear):
            expected = reference_int8_linear(h, float_layer)
            got = layer(h)
            torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)
            h = expected
        else:
            h = layer(h)
    assert relative_error(model(x), float_model(x)) < 0.02


def test_linear_really_uses_an_integer_matmul(monkeypatch):
    calls = []
    real = torch._int_mm

    def spy(a, b):
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", spy)
    model = quantize_dynamic(mlp())
    model(torch.randn(5, 96))
    assert calls == [(torch.int8, torch.int8, (5, 96), (96, 160)), (torch.int8, torch.int8, (5, 160), (160, 72)),
                     (torch.int8, torch.int8, (5, 72), (72, 10))]


def test_int8_matmul_is_exact_and_falls_back_where_int_mm_cannot_run(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (3, 1200), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 1200), generator=gen, dtype=torch.int8)
    exact = a.long() @ b.long().t()
    assert torch.equal(dynamic.int8_matmul(a, b).long(), exact)
    monkeypatch.setattr(dynamic, "int_mm_supported", lambda *args: False)
    assert torch.equal(dynamic.int8_matmul(a, b).long(), exact)  # float64 holds the sums exactly


def test_cuda_int_mm_constraints_are_respected():
    cuda = torch.device("cuda")
    assert not dynamic.int_mm_supported(16, 64, 64, cuda)
    assert not dynamic.int_mm_supported(32, 60, 64, cuda)
    assert not dynamic.int_mm_supported(32, 64, 60, cuda)
    assert dynamic.int_mm_supported(32, 64, 64, cuda)
    assert dynamic.int_mm_supported(1, 3, 5, torch.device("cpu"))


def test_linear_state_dict_holds_only_int8_codes_and_scales():
    model = quantize_dynamic(mlp())
    state = model.state_dict()
    assert {name.rsplit(".", 1)[-1] for name in state} == {"qdata", "scale", "bias"}
    assert all(t.dtype == torch.uint8 for n, t in state.items() if n.endswith("qdata"))
    assert all(t.dtype == torch.float16 and t.shape[1] == 1 for n, t in state.items() if n.endswith("scale"))
    assert state_bytes(model) < state_bytes(mlp()) / 3.3  # biases stay float32


# ---- LSTM ------------------------------------------------------------------------------------------------

def test_lstm_language_model_is_four_times_smaller_and_close_to_float(capsys):
    torch.manual_seed(0)
    float_model = TextLSTM().eval()
    model = quantize_dynamic(copy.deepcopy(float_model))
    assert isinstance(model.lstm, DynamicInt8LSTM) and isinstance(model.head, DynamicInt8Linear)
    assert isinstance(model.embed, nn.Embedding)
    quantized_parts = ("lstm", "head")
    before = sum(state_bytes(getattr(float_model, p)) for p in quantized_parts)
    after = sum(state_bytes(getattr(model, p)) for p in quantized_parts)
    assert before / after >= 3.5
    for name, tensor in model.lstm.state_dict().items():
        assert (tensor.dtype, name.startswith("bias_")) in {(torch.uint8, False), (torch.float16, False),
                                                           (torch.float32, True)}, name
    with capsys.disabled():
        print(f"\nLSTM LM state dict: quantized parts {before} -> {after} bytes ({before / after:.2f}x), "
              f"whole model {state_bytes(float_model)} -> {state_bytes(model)} bytes "
              f"({state_bytes(float_model) / state_bytes(model):.2f}x; embedding left in float)")
    ids = torch.randint(0, 500, (4, 33))
    with torch.no_grad():
        assert relative_error(model(ids), float_model(ids)) < 0.02
        assert relative_error(model.lstm(model.embed(ids))[0], float_model.lstm(float_model.embed(ids))[0]) < 0.02


@pytest.mark.parametrize("args", [dict(batch_first=True, num_layers=2, bidirectional=True),
                                  dict(batch_first=False, num_layers=3),
                                  dict(batch_first=True, num_layers=1, bias=False),
                                  dict(batch_first=False, num_layers=2, proj_size=24, bidirectional=True)])
def test_lstm_variants_follow_the_float_lstm(args):
    torch.manual_seed(1)
    lstm = nn.LSTM(40, 48, **args).eval()
    q = quantize_dynamic(copy.deepcopy(lstm))
    assert isinstance(q, DynamicInt8LSTM)
    x = torch.randn(6, 9, 40)
    with torch.no_grad():
        out, (h, c) = lstm(x)
        q_out, (q_h, q_c) = q(x)
        assert q_out.shape == out.shape and q_h.shape == h.shape and q_c.shape == c.shape
        assert relative_error(q_out, out) < 0.02 and relative_error(q_c, c) < 0.02
        # exactly torch's LSTM on the dequantized weights, initial state included
        deq = copy.deepcopy(lstm)
        for name in q.weight_names:
            getattr(deq, name).data.copy_(q.packed(name).dequantize())
        state = (torch.randn_like(h), torch.randn_like(c))
        torch.testing.assert_close(q(x, state)[0], deq(x, state)[0], rtol=0, atol=0)


def test_lstm_takes_packed_sequences_and_unbatched_input():
    torch.manual_seed(2)
    lstm = nn.LSTM(16, 32, batch_first=True).eval()
    q = quantize_dynamic(copy.deepcopy(lstm))
    x = torch.randn(3, 7, 16)
    packed = nn.utils.rnn.pack_padded_sequence(x, [7, 4, 2], batch_first=True)
    with torch.no_grad():
        assert relative_error(q(packed)[0].data, lstm(packed)[0].data) < 0.02
        assert q(x[0])[0].shape == (7, 32)


def test_lstm_weights_are_int8_per_row():
    torch.manual_seed(3)
    lstm = nn.LSTM(20, 12, num_layers=2, bidirectional=True)
    q = DynamicInt8LSTM.from_lstm(lstm, DynamicInt8Config().scheme)
    assert len(q.weight_names) == 8  # ih, hh for 2 layers x 2 directions
    for name in q.weight_names:
        w = getattr(lstm, name).detach()
        scale = getattr(q, f"{name}_scale")
        assert scale.shape == (w.shape[0], 1)
        error = (q.packed(name).dequantize() - w).abs()
        assert bool((error <= scale.float() / 2 + 1e-7).all())


# ---- saving ----------------------------------------------------------------------------------------------

def test_state_dict_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(4)
    model = quantize_dynamic(TextLSTM(bidirectional=True).eval())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh = quantize_dynamic(TextLSTM(bidirectional=True).eval())  # other random weights, same structure
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    ids = torch.randint(0, 500, (2, 11))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_records_rebuild_empty_modules_that_load_the_same_tensors():
    torch.manual_seed(5)
    lstm = quantize_dynamic(nn.LSTM(10, 14, num_layers=2, proj_size=6))
    linear = quantize_dynamic(nn.Linear(10, 6))
    for module in (lstm, linear):
        cls = module_for_kind(module.module_kind)
        empty = cls.from_record(module.record(), device="meta")
        empty.load_state_dict(module.state_dict(), strict=True, assign=True)
        x = torch.randn(3, 10)
        first = module(x)[0] if module is lstm else module(x)
        again = empty(x)[0] if module is lstm else empty(x)
        assert torch.equal(first, again)


def test_skip_and_nothing_to_quantize():
    model = quantize_dynamic(mlp(), DynamicInt8Config(skip=("2",)))
    assert isinstance(model[0], DynamicInt8Linear) and type(model[2]) is nn.Linear
    with pytest.raises(ModelpressError, match="no Linear or LSTM layers"):
        quantize_dynamic(nn.Sequential(nn.ReLU()))
    with pytest.raises(ModelpressError, match="int8/channel"):
        from modelpress.formats import WeightScheme, quantize_weight

        DynamicInt8Linear(quantize_weight(torch.randn(4, 8), WeightScheme.parse("int4/g8")))


def test_a_transformers_model_saves_and_loads_through_modelpress(tmp_path):
    from conftest import build_tiny_llama, char_tokenizer

    from modelpress.io.model import LoadedModel
    from modelpress.io.save import load_compressed, save_compressed

    model = quantize_dynamic(build_tiny_llama())
    assert sum(isinstance(m, DynamicInt8Linear) for m in model.modules()) == 14  # 7 per block, head skipped
    save_compressed(LoadedModel(model, char_tokenizer(), source="tiny", float_source="tiny"), tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert type(loaded.model.model.layers[0].mlp.up_proj) is DynamicInt8Linear


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ffn = nn.Linear(32, 32)

    def forward(self, x):
        return self.ffn(self.attn(x, x, x, need_weights=False)[0])


def test_attention_projections_are_left_alone():
    # nn.MultiheadAttention reads out_proj.weight itself, so its projection must stay an nn.Linear
    torch.manual_seed(6)
    block = AttentionBlock().eval()
    q = quantize_dynamic(copy.deepcopy(block))
    assert isinstance(q.ffn, DynamicInt8Linear)
    assert type(q.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert relative_error(q(x), block(x)) < 0.02


# ---- 2:4 int8 weights through cuSPARSELt -----------------------------------------------------------------

def two_four_linear(n=256, k=512, seed=0, bias=True):
    from modelpress.algorithms.prune.masks import NMPattern, nm_mask

    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(nm_mask(linear.weight.abs(), NMPattern(2, 4)))
    return linear


def test_semi_structured_check_accepts_2_4_and_rejects_denser_rows():
    from modelpress.nn.sparse_linear import is_semi_structured

    weight = two_four_linear().weight.detach()
    assert is_semi_structured(weight)
    assert is_semi_structured(dynamic.int8_weight(DynamicInt8Linear.from_linear(two_four_linear(),
                                                                                 DynamicInt8Config().scheme).packed))
    denser = weight.clone()
    denser[3, 8:12] = 1.0  # one run of four with four non-zeros
    assert not is_semi_structured(denser)
    assert not is_semi_structured(torch.zeros(4, 6))  # K not a multiple of 4


def test_sparse_int8_path_is_off_the_cpu_and_off_by_default():
    layer = DynamicInt8Linear.from_linear(two_four_linear(), DynamicInt8Config().scheme)
    x = torch.randn(5, 512)
    assert layer._sparse_matmul(x) is None  # not asked for
    layer.use_semi_structured = True
    assert layer._sparse_matmul(x) is None  # asked for, but on the CPU
    assert "_semi" not in layer.__dict__


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 37, 256])
def test_2_4_int8_layer_on_cuda_gives_the_same_integers_through_cusparselt(cuda, rows):
    layer = DynamicInt8Linear.from_linear(two_four_linear(), DynamicInt8Config().scheme).to(cuda)
    x = torch.randn(rows, 512, device=cuda, dtype=torch.float16)
    dense = layer(x)
    layer.use_semi_structured = True
    sparse = layer(x)
    if layer.__dict__["_semi"][1] is None:
        pytest.skip("no cuSPARSELt int8 kernel on this GPU/PyTorch")
    assert torch.equal(sparse, dense)  # int32 accumulators identical, same rescaling
    torch.testing.assert_close(sparse.float(), reference_int8_linear(x.float(), two_four_linear().to(cuda)),
                               rtol=2e-2, atol=2e-2)
    layer.cpu()
    assert "_semi" not in layer.__dict__


@pytest.mark.gpu
def test_dense_int8_weight_keeps_the_dense_integer_matmul_on_cuda(cuda):
    layer = DynamicInt8Linear.from_linear(mlp()[0], DynamicInt8Config().scheme).to(cuda)
    layer.use_semi_structured = True
    x = torch.randn(40, 96, device=cuda)
    assert layer._sparse_matmul(x) is None
    torch.testing.assert_close(layer(x), reference_int8_linear(x, mlp()[0].to(cuda)), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 96), (37, 576), (300, 4096), (5, 11008)])
def test_fused_cuda_quantization_gives_the_same_codes_and_scales(cuda, dtype, shape):
    pytest.importorskip("triton")
    from modelpress.nn import triton_int8

    torch.manual_seed(2)
    x = torch.randn(*shape, device=cuda, dtype=dtype) * torch.rand(shape[0], 1, device=cuda, dtype=dtype) * 4
    if shape[0] > 1:  # amax 127 makes the scale exactly 1: the halves must round to even
        x[1] = 0
        x[1, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5], dtype=dtype)
    if shape[0] > 2:
        x[2] = 0  # an all-zero row gets scale 1 and zero codes
    codes, scales = triton_int8.quantize_rows(x)
    _, ref_scales = dynamic.quantize_rows(x)
    # PyTorch on CUDA divides by a Python scalar as a multiply by its reciprocal (within 1 ulp of amax / 127);
    # the kernel divides exactly
    amax = x.float().abs().amax(dim=1, keepdim=True)
    assert torch.equal(scales, torch.where(amax > 0, amax / torch.full_like(amax, 127.0), torch.ones_like(amax)))
    torch.testing.assert_close(scales, ref_scales, rtol=2.5e-7, atol=0)
    expected = torch.clamp(torch.round(x.float() / scales), -127, 127).to(torch.int8)
    assert torch.equal(codes, expected)
    if shape[0] > 2:
        assert scales[2].item() == 1.0 and not codes[2].any()
    if shape[0] > 1:
        assert scales[1].item() == 1.0 and codes[1, :6].tolist() == [127, 0, 2, 2, 0, -2]


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
def test_fused_cuda_rescale_matches_the_pytorch_expression(cuda, bias):
    pytest.importorskip("triton")
    from modelpress.nn import triton_int8

    torch.manual_seed(3)
    acc = torch.randint(-2**20, 2**20, (70, 300), device=cuda, dtype=torch.int32)
    sx = torch.rand(70, 1, device=cuda) / 100
    sw = (torch.rand(300, 1, device=cuda) / 100).half()
    b = torch.randn(300, device=cuda) if bias else None
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        expected = acc.float() * sx * sw.float().reshape(1, -1)
        if b is not None:
            expected = expected + b
        got = triton_int8.rescale(acc[:, :], sx, sw, b, dtype)
        torch.testing.assert_close(got, expected.to(dtype), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.gpu
def test_dynamic_linear_on_cuda_agrees_with_and_without_the_fused_kernels(cuda, monkeypatch):
    layer = DynamicInt8Linear.from_linear(mlp()[0], DynamicInt8Config().scheme).to(cuda)
    x = torch.randn(3, 50, 96, device=cuda, dtype=torch.float16)
    fused = layer(x)
    monkeypatch.setattr(dynamic, "FUSED_CUDA", False)
    torch.testing.assert_close(fused, layer(x), rtol=1e-3, atol=1e-3)
