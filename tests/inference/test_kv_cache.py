"""Quantized KV cache: round-trip error bounds of each layout, real stored bytes, attention really reading the
quantized states, crop (speculative rollback), and use through transformers' forward and generate."""

import pytest
import torch
from conftest import build_tiny_llama
from transformers import DynamicCache

from modelpress.errors import ModelpressError
from modelpress.formats.base import get_format
from modelpress.inference import kv_quant
from modelpress.inference.kv_cache import KVCacheConfig, QuantizedKVCache, QuantizedKVLayer, make_kv_cache


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def states(b=1, h=2, t=256, d=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 3] *= 20  # an outlier channel, as real keys have
    return x.to(dtype)


def test_int8_per_token_error_is_at_most_half_a_step():
    x = states()
    q = kv_quant.quantize_per_token(x, get_format("int8"))
    back = kv_quant.dequantize_per_token(q, get_format("int8"), torch.float32)
    step = q.scale.float()  # (B, H, T, 1): absmax / 127
    assert torch.allclose(step, x.abs().amax(-1, keepdim=True) / 127, rtol=1e-3)
    assert ((back - x).abs() <= step / 2 * 1.001 + 1e-7).all()
    assert q.qdata.dtype == torch.uint8 and q.qdata.shape == x.shape and q.scale.dtype == torch.float16


def test_fp8_per_token_error_is_within_half_an_ulp():
    x = states()
    fmt = get_format("fp8-e4m3")
    q = kv_quant.quantize_per_token(x, fmt)
    back = kv_quant.dequantize_per_token(q, fmt, torch.float32)
    scale = q.scale.float()
    # 3 mantissa bits: relative error <= 2**-4 for normal values, absolute <= scale * 2**-10 for subnormals
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * 1.001
    assert ((back - x).abs() <= bound).all()
    assert (back.abs().amax(-1) - x.abs().amax(-1)).abs().max() < 1e-2 * x.abs().amax()


def test_kivi_keys_per_channel_and_values_per_token_error_bounds():
    x = states(t=256)
    fmt = get_format("int4-asym")
    keys = kv_quant.quantize_per_channel(x, fmt, group=128)
    assert keys.scale.shape == (1, 2, 2, 64)  # one scale per channel and group of 128 tokens
    back = kv_quant.dequantize_per_channel(keys, fmt, torch.float32)
    grouped = x.view(1, 2, 2, 128, 64)
    span = grouped.amax(3) - grouped.amin(3)                              # (1, 2, 2, 64)
    bound = (span / 15 / 2).unsqueeze(3).expand_as(grouped).reshape(x.shape)
    assert ((back - x).abs() <= bound * 1.01 + 1e-3).all()
    values = kv_quant.quantize_per_token(x, fmt)
    back = kv_quant.dequantize_per_token(values, fmt, torch.float32)
    span = x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)
    assert ((back - x).abs() <= span / 15 / 2 * 1.01 + 1e-3).all()
    assert keys.qdata.shape == (1, 2, 256, 32) and values.qdata.shape == (1, 2, 256, 32)  # 2 codes a byte


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    x = states(t=128)
    fmt = get_format("int4-asym")
    per_channel = kv_quant.dequantize_per_channel(kv_quant.quantize_per_channel(x, fmt, 128), fmt, torch.float32)
    per_token = kv_quant.dequantize_per_token(kv_quant.quantize_per_token(x, fmt), fmt, torch.float32)
    normal = [c for c in range(64) if c != 3]
    err_channel = (per_channel - x)[..., normal].pow(2).mean()
    err_token = (per_token - x)[..., normal].pow(2).mean()
    assert err_channel < err_token / 4


@pytest.mark.parametrize("fmt_name", ["int8", "fp8-e4m3", "int4-asym", "int2-asym"])
def test_requantizing_dequantized_states_gives_the_same_codes(fmt_name):
    fmt = get_format(fmt_name)
    x = states(t=64)
    q = kv_quant.quantize_per_token(x, fmt)
    again = kv_quant.quantize_per_token(kv_quant.dequantize_per_token(q, fmt, torch.float32), fmt)
    same = (again.qdata == q.qdata).float().mean()
    assert same > 0.999  # exact up to float16 rounding of a recomputed scale


def fill(layer, x, chunk):
    out = None
    for part in x.split(chunk, dim=2):
        out = layer.update(part, part.clone())
    return out


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_per_token_modes_return_the_quantized_states_of_every_token(mode):
    layer = QuantizedKVLayer(KVCacheConfig(mode))
    x = states(t=40)
    keys, values = fill(layer, x, chunk=7)
    fmt = get_format(KVCacheConfig(mode).codecs()[0].format)
    expected = kv_quant.dequantize_per_token(kv_quant.quantize_per_token(x, fmt), fmt, torch.float32)
    assert torch.equal(keys, expected) and torch.equal(values, expected)
    assert layer.keys.shape[2] == 0 and layer.get_seq_length() == 40  # nothing left in float


def test_kivi_keeps_the_recent_window_in_float_and_quantizes_whole_groups():
    layer = QuantizedKVLayer(KVCacheConfig("int4", residual_length=32, group_size=16))
    x = states(t=100)
    keys, _ = fill(layer, x, chunk=5)
    assert layer.get_seq_length() == 100
    assert layer.quantized_length == 64 and layer.keys.shape[2] == 36  # 32 <= window < 32 + 16
    assert torch.equal(keys[:, :, 64:], x[:, :, 64:])                 # the window is exact
    assert not torch.equal(keys[:, :, :64], x[:, :, :64])             # older tokens are quantized
    fmt = get_format("int4-asym")
    expected = kv_quant.dequantize_per_channel(kv_quant.quantize_per_channel(x[:, :, :64], fmt, 16), fmt, torch.float32)
    assert torch.equal(keys[:, :, :64], expected)


@pytest.mark.parametrize("mode, keep", [("int8", 23), ("int4", 80), ("int4", 41), ("int4", 5)])
def test_crop_keeps_exactly_what_attention_saw(mode, keep):
    layer = QuantizedKVLayer(KVCacheConfig(mode, residual_length=32 if mode == "int4" else None, group_size=16))
    x = states(t=100)
    before = fill(layer, x, chunk=9)
    layer.crop(keep - 100)  # negative: remove that many
    assert layer.get_seq_length() == keep
    after = layer.full_states()
    assert torch.equal(after[0], before[0][:, :, :keep]) and torch.equal(after[1], before[1][:, :, :keep])
    more = states(t=30, seed=1)
    keys, _ = fill(layer, more, chunk=30)
    assert layer.get_seq_length() == keep + 30 and keys.shape[2] == keep + 30


def test_bytes_per_token_fall_1_9x_at_8_bit_and_3_5x_at_4_bit_against_a_16_bit_cache():
    # SmolLM2-like heads (head dim 64) in bfloat16; bytes are what the cache really stores
    d, h = 64, 3
    float_per_token = 2 * h * d * 2  # keys + values, 2 bytes each

    def stored_bytes(mode, tokens):
        layer = QuantizedKVLayer(KVCacheConfig(mode))
        fill(layer, states(h=h, t=tokens, d=d, dtype=torch.bfloat16), chunk=1024)
        return layer.nbytes()

    for mode in ("int8", "fp8"):
        assert float_per_token * 2048 / stored_bytes(mode, 2048) >= 1.9
    # KIVI: each token beyond the float window costs 4-bit codes plus amortised scales
    marginal = (stored_bytes("int4", 4096) - stored_bytes("int4", 2048)) / 2048
    assert float_per_token / marginal >= 3.5
    assert float_per_token * 8192 / stored_bytes("int4", 8192) >= 3.5  # the 128-token window amortised
    assert float_per_token / marginal < 4  # scales are counted


def run_in_chunks(model, ids, cache, chunk):
    with torch.no_grad():
        return torch.cat([model(part, past_key_values=cache, use_cache=True).logits for part in ids.split(chunk, 1)], 1)


@pytest.fixture(scope="module")
def model_and_ids():
    model = build_tiny_llama(0, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             initializer_range=0.05)
    ids = torch.randint(3, 320, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    return model, ids, reference


def kl(reference, logits):
    p = torch.log_softmax(reference, -1)
    return (p.exp() * (p - torch.log_softmax(logits, -1))).sum(-1).mean().item()


def test_logits_through_a_quantized_cache_stay_close_to_the_float_cache(model_and_ids):
    model, ids, reference = model_and_ids
    float_logits = run_in_chunks(model, ids, make_kv_cache(model, KVCacheConfig("float")), 16)
    assert torch.allclose(float_logits, reference, atol=1e-4)
    results = {}
    for mode in ("int8", "fp8", "int4"):
        config = KVCacheConfig(mode, residual_length=32 if mode == "int4" else None, group_size=32)
        cache = make_kv_cache(model, config)
        assert isinstance(cache, QuantizedKVCache)
        logits = run_in_chunks(model, ids, cache, 16)
        assert cache.get_seq_length() == 160
        results[mode] = (logits - reference).abs().max().item(), kl(reference, logits)
    scale = reference.abs().max().item()
    assert 0 < results["int8"][0] < 0.01 * scale and results["int8"][1] < 1e-4
    assert 0 < results["fp8"][0] < 0.05 * scale
    assert results["int8"][1] < results["fp8"][1] < results["int4"][1] < 0.05


def test_transformers_generate_uses_the_cache(model_and_ids):
    model, ids, _ = model_and_ids
    prompt = ids[:, :20]
    cache = make_kv_cache(model, KVCacheConfig("int8"))
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert out.shape[1] == 32
    assert cache.get_seq_length() == 31  # the last token is never fed back
    assert cache.nbytes() > 0 and cache.bytes_per_token() == cache.nbytes() / 31
    assert isinstance(make_kv_cache(model, KVCacheConfig("float")), DynamicCache)


def test_bad_cache_settings_fail_with_the_value():
    with pytest.raises(ModelpressError, match="unknown KV cache mode 'int3'"):
        KVCacheConfig("int3")
    with pytest.raises(ModelpressError, match="residual length must be >= 0, got -1"):
        KVCacheConfig("int4", residual_length=-1)
    with pytest.raises(ModelpressError, match="full-attention"):
        make_kv_cache(build_tiny_llama(0, layer_types=["sliding_attention", "full_attention"], sliding_window=8),
                      KVCacheConfig("int8"))


@pytest.mark.slow
def test_int8_cache_keeps_default_model_perplexity_within_1_percent(default_model):
    from modelpress.io.text import load_text, make_windows

    model = default_model.model
    window = make_windows(default_model.tokenizer, load_text(None), seq_len=256, eval_windows=1).eval[:1]
    nll = {}
    for mode in ("float", "int8"):
        logits = run_in_chunks(model, window, make_kv_cache(model, KVCacheConfig(mode)), 64)[0, :-1]
        nll[mode] = torch.nn.functional.cross_entropy(logits.float(), window[0, 1:]).item()
    assert nll["int8"] != nll["float"]  # attention really read the quantized states
    assert abs(nll["int8"] - nll["float"]) < 0.01  # perplexity ratio exp(delta) within 1%
