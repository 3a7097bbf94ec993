"""The split-cache attention over the int8 KV cache's codes and per-token scales (nn/triton_attention.py): the
attention of the dequantized states, from the codes. On CUDA, or on the CPU under Triton's interpreter where Triton
is installed (CI has no Triton: skipped there)."""

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is None:
    pytest.skip("needs triton (on CUDA, or its interpreter on the CPU)", allow_module_level=True)
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

from modelpress.inference.kv_cache import KVCacheConfig  # noqa: E402
from modelpress.nn.triton_attention import decode_attention  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if CUDA else "cpu")


def reference(q, k, v, mask, scale):
    """float64 softmax attention, (B, T, H, D); k, v (B, HKV, S, D) shared by H / HKV query heads each."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scale + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))  # numpy: no bf16
@pytest.mark.parametrize("t, heads, kv_heads, vector", [(1, 4, 2, False), (3, 2, 2, False), (1, 3, 3, False),
                                                        (1, 3, 3, True)])
def test_codes_give_the_attention_of_the_dequantized_states(monkeypatch, device, dtype, t, heads, kv_heads, vector):
    """vector: the one-row kernels (triton_attention.VECTOR_ROWS) at any batch, codes and states alike."""
    from modelpress.nn import triton_attention

    monkeypatch.setattr(triton_attention, "VECTOR_ROWS", vector)
    monkeypatch.setattr(triton_attention, "VECTOR_MIN_WAVES", 0.0)
    monkeypatch.setattr(triton_attention, "FOLD_CODE_SCALES", False)
    codec, _ = KVCacheConfig("int8").codecs()
    generator = torch.Generator().manual_seed(t * 10 + heads)
    length, d = 150, 64
    q = torch.randn(1, heads, t, d, generator=generator).to(device, dtype)
    states = [torch.randn(1, kv_heads, length, d, generator=generator) * 3 for _ in "kv"]
    stored = [codec.quantize(x) for x in states]                         # qdata uint8, scale float16 (1, H, S, 1)
    k, v = (codec.dequantize(x, dtype).to(device) for x in stored)
    (k_codes, k_scale), (v_codes, v_scale) = ((x.qdata.to(device), x.scale.to(device)) for x in stored)
    position = length - 2 * t - 40                                       # 40 slots past the last query: masked
    allowed = torch.arange(length)[None, :] <= torch.arange(position, position + t)[:, None]
    mask = torch.zeros(1, 1, t, length).masked_fill(~allowed, torch.finfo(dtype).min).to(device, dtype)
    plan = (32, 3, 4)                                                    # blocks of 32 over three splits
    got = decode_attention(q, k_codes, v_codes, mask, d ** -0.5, plan, key_scale=k_scale, value_scale=v_scale)
    from_states = decode_attention(q, k, v, mask, d ** -0.5, plan)
    assert got is not None and got.shape == (1, t, heads, d) and got.dtype == dtype
    # the same tiles as the dequantized states (kv_quant's arithmetic), so the same sums; float32 on CUDA within its
    # rounding (1.9e-6 apart on an H100 under 3xTF32; not analysed further, e.g. which multiply is fused where)
    torch.testing.assert_close(got, from_states, rtol=1e-5 if dtype == torch.float32 else 1e-6,
                               atol=1e-5 if dtype == torch.float32 else 1e-6)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, d ** -0.5), rtol=tolerance, atol=tolerance)
    # slots no query may see are never used: a NaN key scale there changes nothing
    k_scale[:, :, position + t:] = float("nan")
    poisoned = decode_attention(q, k_codes, v_codes, mask, d ** -0.5, plan, key_scale=k_scale, value_scale=v_scale)
    assert torch.equal(poisoned, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("heads, kv_heads, vector", [(3, 3, True), (4, 2, False)])
@pytest.mark.parametrize("magnitude", [3.0, 1e-3])
def test_the_scales_on_the_sums_attend_the_codes(monkeypatch, device, dtype, heads, kv_heads, vector, magnitude):
    """FOLD_CODE_SCALES: each token's scale applied to its score and its probability, the codes' values exact in
    the query's dtype, in the one-row kernels (vector) and the tiles. No rounding of the decoded states, so in 16-bit
    dtypes at least as close to float64 attention of the dequantized states as the states rounded to that dtype
    are (in float32 both sit at its rounding, where which is closer is noise: 2.2e-7 against 1.9e-7 on an H100).
    magnitude: of the values; at 1e-3 their scales times the probabilities fall below float16's normal range unless
    the tiles take them relative to each block's largest scale."""
    from modelpress.nn import triton_attention

    monkeypatch.setattr(triton_attention, "VECTOR_ROWS", vector)
    monkeypatch.setattr(triton_attention, "VECTOR_MIN_WAVES", 0.0)
    codec, _ = KVCacheConfig("int8").codecs()
    generator = torch.Generator().manual_seed(7)
    b, length, d = 2, 150, 64
    q = torch.randn(b, heads, 1, d, generator=generator).to(device, dtype)
    stored = [codec.quantize(torch.randn(b, kv_heads, length, d, generator=generator) * m) for m in (3.0, magnitude)]
    exact = [codec.dequantize(x, torch.float64).to(device) for x in stored]
    (k_codes, k_scale), (v_codes, v_scale) = ((x.qdata.to(device), x.scale.to(device)) for x in stored)
    allowed = torch.arange(length) <= length - 41
    mask = torch.zeros(1, 1, 1, length).masked_fill(~allowed, torch.finfo(dtype).min).to(device, dtype)
    plan = (32, 3, 4)
    want = reference(q, *exact, mask, d ** -0.5)
    monkeypatch.setattr(triton_attention, "FOLD_CODE_SCALES", True)
    got = decode_attention(q, k_codes, v_codes, mask, d ** -0.5, plan, key_scale=k_scale, value_scale=v_scale)
    monkeypatch.setattr(triton_attention, "FOLD_CODE_SCALES", False)
    rounded = decode_attention(q, k_codes, v_codes, mask, d ** -0.5, plan, key_scale=k_scale, value_scale=v_scale)
    assert got.shape == (b, 1, heads, d) and got.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * magnitude / 3)
    if dtype != torch.float32:
        assert (got.double() - want).abs().mean() <= (rounded.double() - want).abs().mean() * 1.1
    k_scale[:, :, length - 40:] = float("nan")  # slots no query may see are never used
    monkeypatch.setattr(triton_attention, "FOLD_CODE_SCALES", True)
    poisoned = decode_attention(q, k_codes, v_codes, mask, d ** -0.5, plan, key_scale=k_scale, value_scale=v_scale)
    assert torch.equal(poisoned, got)


def test_codes_the_kernels_cannot_read_are_left_to_the_caller(device):
    q = torch.randn(1, 2, 1, 64, device=device)
    codes = torch.zeros(1, 2, 10, 64, dtype=torch.uint8, device=device)
    scale = torch.ones(1, 2, 10, 1, dtype=torch.float16, device=device)
    assert decode_attention(q, codes, codes, None, 0.125, key_scale=scale, value_scale=scale) is not None
    assert decode_attention(q, codes, codes, None, 0.125, key_scale=scale) is None                  # no value scale
    assert decode_attention(q, codes, codes, None, 0.125, key_scale=scale.float(), value_scale=scale) is None
    assert decode_attention(q, codes, codes, None, 0.125, key_scale=scale[:, :, :9], value_scale=scale) is None
    assert decode_attention(q, codes.float(), codes.float(), None, 0.125, key_scale=scale, value_scale=scale) is None


@pytest.mark.parametrize("head_dim", [64, 192, 256])
def test_one_sequence_of_codes_takes_the_one_row_kernels_at_their_own_plan(monkeypatch, device, head_dim):
    """An MHA model's int8 codes at one sequence go to the one-row kernels (VECTOR_MIN_WAVES_CODES) with their
    default plan (blocks shortened for heads wider than 128), over a cache written in part."""
    from modelpress.nn import triton_attention

    calls = []
    plan = triton_attention.split_plan
    monkeypatch.setattr(triton_attention, "split_plan", lambda *a, **kw: calls.append(kw) or plan(*a, **kw))
    codec, _ = KVCacheConfig("int8").codecs()
    generator = torch.Generator().manual_seed(head_dim)
    heads, length = 2, 300
    q = torch.randn(1, heads, 1, head_dim, generator=generator).to(device, torch.float16)
    stored = [codec.quantize(torch.randn(1, heads, length, head_dim, generator=generator)) for _ in "kv"]
    exact = [codec.dequantize(x, torch.float64).to(device) for x in stored]
    (k_codes, k_scale), (v_codes, v_scale) = ((x.qdata.to(device), x.scale.to(device)) for x in stored)
    allowed = torch.arange(length) <= 100                              # a third written
    mask = torch.zeros(1, 1, 1, length).masked_fill(~allowed, torch.finfo(torch.float16).min).to(device, torch.float16)
    got = decode_attention(q, k_codes, v_codes, mask, head_dim ** -0.5, key_scale=k_scale, value_scale=v_scale)
    assert calls == [dict(one_row=True, codes=True, head_dim=head_dim)]
    torch.testing.assert_close(got.double(), reference(q, *exact, mask, head_dim ** -0.5), rtol=2e-3, atol=2e-3)
