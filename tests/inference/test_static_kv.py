"""The static quantized KV cache (inference/static_kv.py): attention reads bit for bit the states the eager
QuantizedKVCache gives it, greedy decoding on the static (and, on CUDA, graph) path gives the eager
quantized cache's tokens with the same codes, the buffers really are smaller, and the decode step reads no
host value (so it can be captured)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from modelpress.errors import ModelpressError
from modelpress.formats.base import get_format
from modelpress.inference import kv_quant
from modelpress.inference.decoding import EagerSteps, GenerationSettings, generate
from modelpress.inference.kv_cache import KVCacheConfig, QuantizedKVCache, QuantizedKVLayer, cache_nbytes
from modelpress.inference.sampling import SamplingConfig
from modelpress.inference.static_decode import StaticCache, StaticDecoder
from modelpress.inference.static_kv import StaticQuantizedCache

PROMPT = [5, 17, 33, 2, 90, 41, 7]
# KIVI with small groups and window so that a short decode quantizes several key groups
SMALL_KIVI = {"int4": KVCacheConfig("int4", residual_length=4, group_size=4),
              "int2": KVCacheConfig("int2", residual_length=5, group_size=4, value_group_size=8)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def model():
    # a larger init spread than the default so that greedy tokens vary (and quantization changes some)
    return build_tiny_llama(0, initializer_range=0.2)


def config(mode: str) -> KVCacheConfig:
    return SMALL_KIVI.get(mode) or KVCacheConfig(mode)


def states(t: int, seed: int) -> torch.Tensor:
    x = torch.randn(1, 2, t, 16, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 20  # an outlier channel, as real keys have
    return x


# ---- the layer: the eager cache's numbers ----

@pytest.mark.parametrize("mode", ["int8", "fp8", "int4", "int2", "int8-window"])
def test_attention_reads_the_eager_quantized_cache_states_bit_for_bit(mode):
    """A 13-token prefill, then one token a call: after every call the static cache's (B, H, max_len, D)
    states equal the eager cache's (B, H, L, D) on the first L positions (exact float window included)."""
    cfg = KVCacheConfig("int8", residual_length=3) if mode == "int8-window" else config(mode)
    keys_in, values_in = states(40, 0), states(40, 1)
    eager, static = QuantizedKVLayer(cfg), StaticQuantizedCache(cfg, num_layers=1, max_len=45)
    start = 0
    for length in [13, *range(14, 41)]:
        new_k, new_v = keys_in[:, :, start:length], values_in[:, :, start:length]
        want = eager.update(new_k, new_v)
        static.index = torch.arange(start, length)
        got = static.update(new_k, new_v, 0)
        assert got[0].shape == got[1].shape == (1, 2, 45, 16)
        assert torch.equal(got[0][:, :, :length], want[0]) and torch.equal(got[1][:, :, :length], want[1])
        start = length
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()  # unwritten positions too


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_returned_states_are_the_dequantized_codes_not_the_inputs(mode):
    cfg = KVCacheConfig(mode)
    fmt = get_format(cfg.codecs()[0].format)
    x = states(9, 0)
    cache = StaticQuantizedCache(cfg, num_layers=1, max_len=12)
    cache.index = torch.arange(9)
    keys, values = cache.update(x, 2 * x, 0)
    expected = kv_quant.dequantize_per_token(kv_quant.quantize_per_token(x, fmt), fmt, torch.float32)
    assert torch.equal(keys[:, :, :9], expected) and not torch.equal(keys[:, :, :9], x)
    stored = cache.layers[0].stored[0]
    assert stored.qdata.dtype == torch.uint8 and stored.qdata.shape == (1, 2, 12, 16)
    assert torch.equal(stored.qdata[:, :, :9], kv_quant.quantize_per_token(x, fmt).qdata)
    assert torch.equal(keys[:, :, 9:], torch.zeros_like(keys[:, :, 9:]))  # unwritten: zero codes x zero scales


def test_bytes_fall_1_9x_at_8_bit_against_a_16_bit_static_cache():
    """Computed from the allocated buffers: bfloat16 states of SmolLM2-like heads (3 x 64), 2048 positions."""
    def allocated(cache: StaticCache) -> int:
        x = torch.zeros(1, 3, 1, 64, dtype=torch.bfloat16)
        cache.index = torch.arange(1)
        cache.update(x, x, 0)
        return cache.kv_bytes()

    float_bytes = allocated(StaticCache(1, 2048))
    assert float_bytes == 2 * 3 * 64 * 2048 * 2
    for mode in ("int8", "fp8"):
        quantized = StaticQuantizedCache(KVCacheConfig(mode), 1, 2048)
        nbytes = allocated(quantized)
        assert nbytes == 2 * 3 * 2048 * (64 + 2)            # one code a channel + one fp16 scale a head vector
        assert float_bytes / nbytes >= 1.9 and quantized.bytes_per_token() == nbytes / 2048
        assert cache_nbytes(quantized) == nbytes
    # KIVI 4-bit: packed codes + scales (+ offsets) of every position, plus a float ring of 128 + 2 x 128 tokens
    kivi = allocated(StaticQuantizedCache(KVCacheConfig("int4"), 1, 2048))
    codes = 2 * 3 * 2048 * 32
    scales = 3 * (2048 // 128) * 64 * 2 * 2 + 3 * 2048 * 2 * 2  # keys per channel and group; values per token
    assert kivi == codes + scales + 2 * 3 * 384 * 64 * 2
    assert float_bytes / kivi > 2.1


# ---- decoding through generate ----

def teacher_forced(stepper, tokens: list[int]) -> list[torch.Tensor]:
    out = [stepper.prefill(PROMPT).clone()]
    for token in tokens:
        out.append(stepper.step(token).clone())
    return out


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_static_quantized_decode_matches_the_eager_quantized_cache(model, mode):
    settings = dict(max_new_tokens=16, sampling=SamplingConfig(temperature=0.0), kv_cache=config(mode))
    static = generate(model, PROMPT, GenerationSettings(decode="static", **settings))
    eager = generate(model, PROMPT, GenerationSettings(decode="eager", **settings))
    plain = generate(model, PROMPT, GenerationSettings(decode="static", **{**settings, "kv_cache": "float"}))
    assert static.decode_path == "static" and eager.decode_path == "eager"
    assert static.tokens == eager.tokens
    with torch.no_grad():
        steps = EagerSteps(model, None, config(mode))
        decoder = StaticDecoder(model, len(PROMPT) + 16, graph=False, kv_cache=config(mode))
        floats = StaticDecoder(model, len(PROMPT) + 16, graph=False)
        ref, got = teacher_forced(steps, eager.tokens[:15]), teacher_forced(decoder, eager.tokens[:15])
        float_logits = teacher_forced(floats, eager.tokens[:15])
    assert isinstance(steps.cache, QuantizedKVCache)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert max((a - f).abs().max().item() for a, f in zip(got, float_logits)) > 1e-4  # attention read codes
    # the same codes (and scales) in every layer, for every token the eager cache holds quantized
    for eager_layer, static_layer in zip(steps.cache.layers, decoder.cache.layers):
        length = eager_layer.quantized_length
        assert length >= (8 if mode == "int4" else 22)
        for want, have in zip(eager_layer.stored, static_layer.stored):
            assert torch.equal(have.qdata[:, :, :length], want.qdata)
            rows = want.scale.shape[2]
            assert torch.equal(have.scale[:, :, :rows], want.scale)
    assert static.tokens != plain.tokens  # quantization changed the greedy text of this model


def test_default_kivi_modes_take_the_static_path(model):
    """int4/int2 with the default 128-token window and groups: static like the others (the short decode
    stays in the float window, so its tokens are the float cache's)."""
    for mode in ("int4", "int2"):
        settings = dict(max_new_tokens=6, sampling=SamplingConfig(temperature=0.0), kv_cache=mode)
        static = generate(model, PROMPT, GenerationSettings(decode="static", **settings))
        assert static.decode_path == "static"
        assert static.tokens == generate(model, PROMPT, GenerationSettings(decode="eager", **settings)).tokens


class HostReads(TorchDispatchMode):
    """Records ops that read a device value on the host or copy host data to the device: each would break or
    freeze a CUDA graph capture."""

    WATCHED = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero,
               torch.ops.aten.equal, torch.ops.aten.lift_fresh)

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.WATCHED:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_quantized_decode_step_reads_no_host_value(model, mode):
    decoder = StaticDecoder(model, len(PROMPT) + 12, graph=False, kv_cache=config(mode))
    with torch.no_grad():
        decoder.prefill(PROMPT)
        for token in (3, 4, 5, 6, 7):  # KIVI: past the window, a key group is re-quantized every step
            decoder.step(token)
        block = decoder._block(1)  # what a graph captures: the run, after the token id is written in place
        block.ids.fill_(8)
        watch = HostReads()
        with watch:
            decoder._run(block)
    assert isinstance(decoder.cache, StaticQuantizedCache) and decoder.cache.is_compileable
    assert watch.found == []


# ---- settings ----

def test_unknown_kv_cache_mode_is_refused_with_the_value():
    with pytest.raises(ModelpressError, match="unknown KV cache mode 'int3'"):
        GenerationSettings(kv_cache="int3")


def test_a_given_cache_is_used_as_it_is(model, caplog):
    from modelpress.inference.kv_cache import make_kv_cache

    cache = make_kv_cache(model, KVCacheConfig("fp8"))
    settings = GenerationSettings(max_new_tokens=3, decode="static", kv_cache="int8",
                                  sampling=SamplingConfig(temperature=0.0))
    with caplog.at_level(logging.WARNING, logger="modelpress.inference.decoding"):
        result = generate(model, PROMPT, settings, cache=cache)
    assert result.decode_path == "eager" and cache.get_seq_length() == len(PROMPT) + 2
    assert "kv_cache='int8' is ignored" in caplog.text and "a KV cache was given" in caplog.text


# ---- CUDA: the captured step ----

def test_an_int8_cache_reading_codes_returns_them_with_their_scales():
    """read_codes: the int8 cache with no float window hands attention its codes and per-token scales (which the
    fused attention reads), and they dequantize to the states it returns otherwise; other modes never do."""
    from modelpress.inference.fusion import dequantize_codes

    x = states(9, 0)
    plain, coded = (StaticQuantizedCache(KVCacheConfig("int8"), num_layers=1, max_len=12, read_codes=r)
                    for r in (False, True))
    for cache in (plain, coded):
        cache.index = torch.arange(9)
    keys, values = plain.update(x, 2 * x, 0)
    codes_k, codes_v = coded.update(x, 2 * x, 0)
    assert codes_k.dtype == codes_v.dtype == torch.uint8 and codes_k.shape == keys.shape
    k_scale, v_scale = codes_k.kv_scales
    assert torch.equal(dequantize_codes(codes_k, k_scale, torch.float32), keys)
    assert torch.equal(dequantize_codes(codes_v, v_scale, torch.float32), values)
    for cfg in (KVCacheConfig("fp8"), KVCacheConfig("int8", residual_length=3), SMALL_KIVI["int4"]):
        assert not StaticQuantizedCache(cfg, num_layers=1, max_len=12, read_codes=True).read_codes


def test_only_an_int8_cache_without_a_float_window_takes_the_write_kernel(monkeypatch):
    """fused_writes is kept for int8 with no float window (the one layout triton_kv.write_kv_int8 writes) and
    dropped for every other mode; on the CPU the kernel declines and the codec writes, the same codes either way."""
    from modelpress.inference import static_kv

    monkeypatch.setattr(static_kv, "WRITE_INT8_KERNEL", True)
    assert StaticQuantizedCache(KVCacheConfig("int8"), num_layers=1, max_len=12, fused_writes=True).fused_writes
    for cfg in (KVCacheConfig("fp8"), KVCacheConfig("int8", residual_length=3), SMALL_KIVI["int4"]):
        assert not StaticQuantizedCache(cfg, num_layers=1, max_len=12, fused_writes=True).fused_writes
    x = states(9, 0)
    fused, plain = (StaticQuantizedCache(KVCacheConfig("int8"), num_layers=1, max_len=12, fused_writes=f)
                    for f in (True, False))
    for cache in (fused, plain):
        cache.index = torch.arange(9)
        cache.update(x, 2 * x, 0)
    assert not fused.wrote_fused  # CPU tensors: the kernel did not serve
    for a, b in zip(fused.layers[0].stored, plain.layers[0].stored):
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_attention_reads_int8_codes_on_cuda(cuda, dtype, monkeypatch):
    """Under the decode-time fusions an int8 static cache hands attention its codes, and the steps give the logits
    of the same cache read dequantized, within the dtype's rounding: the kernels apply the scales to scores and
    probabilities (triton_attention.FOLD_CODE_SCALES), the dequantized states are rounded to the dtype, and in
    bfloat16 that difference can flip a code of the keys and values written afterwards now and then (the bound of
    the eager cache's comparison below; H100: 1.6e-2 in bfloat16, 6e-7 in float32; 0 and 6e-7 without the fold).
    On a real model the fold is no worse than the dequantized read: bench/kv_codes.py."""
    from modelpress.inference import fusion
    from modelpress.inference.decoding import kernel_context

    monkeypatch.setattr(fusion, "READ_INT8_CODES", True)

    model = build_tiny_llama(0, initializer_range=0.2).to(cuda, dtype)
    settings = GenerationSettings(max_new_tokens=12, kv_cache="int8", sampling=SamplingConfig(temperature=0.0))
    tokens = generate(model, PROMPT, settings).tokens
    with torch.no_grad(), kernel_context(settings, model):
        coded = StaticDecoder(model, len(PROMPT) + 12, graph=True, kv_cache=KVCacheConfig("int8"))
        assert coded.cache.read_codes
        got = teacher_forced(coded, tokens[:11])
        plain = StaticDecoder(model, len(PROMPT) + 12, graph=True, kv_cache=KVCacheConfig("int8"))
        plain.cache.read_codes = False
        want = teacher_forced(plain, tokens[:11])
    assert not fusion.reads_kv_codes(model, KVCacheConfig("int8"))   # the fusions undone: no codes
    scale = max(a.abs().max().item() for a in want)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    worst = max((a - b).abs().max().item() for a, b in zip(want, got)) / scale
    print(f"largest logit difference, relative to the largest logit: {worst:.2e}")
    assert worst <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_graph_step_with_a_quantized_cache_matches_the_eager_step_on_cuda(cuda, dtype, mode):
    model = build_tiny_llama(0, initializer_range=0.2).to(cuda, dtype)
    tokens = generate(model, PROMPT, GenerationSettings(max_new_tokens=12, decode="static", kv_cache=config(mode),
                                                        sampling=SamplingConfig(temperature=0.0))).tokens
    with torch.no_grad():
        ref = teacher_forced(StaticDecoder(model, len(PROMPT) + 12, graph=False, kv_cache=config(mode)), tokens[:11])
        graphed = StaticDecoder(model, len(PROMPT) + 12, graph=True, kv_cache=config(mode))
        got = teacher_forced(graphed, tokens[:11])
        eager = teacher_forced(EagerSteps(model, None, config(mode)), tokens[:11])
    assert graphed.graph is not None, graphed.graph_error
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ref, got):  # the same step on the same static cache, replayed
        assert torch.allclose(a, b, atol=tol, rtol=tol)
    # the eager QuantizedKVCache: attention over L, not max_len, positions, so bfloat16 rounding differs and
    # can flip a code now and then; float32 agrees to rounding
    scale = max(a.abs().max().item() for a in eager)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(eager, got):
        assert (a - b).abs().max().item() <= tol * scale


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_generate_with_a_quantized_cache_on_cuda_captures(cuda, mode):
    model = build_tiny_llama(0, initializer_range=0.2).to(cuda)
    settings = dict(max_new_tokens=16, sampling=SamplingConfig(temperature=0.0), kv_cache=config(mode))
    result = generate(model, PROMPT, GenerationSettings(**settings))
    eager = generate(model, PROMPT, GenerationSettings(decode="eager", **settings))
    assert result.decode_path == "graph"
    assert result.tokens == eager.tokens


@pytest.mark.gpu
def test_the_int8_write_kernel_decodes_the_codecs_tokens_on_cuda(cuda, monkeypatch):
    """With static_kv.WRITE_INT8_KERNEL the int8 cache is written by one kernel a layer (the report says so), and its
    codes are the codec's bit for bit, so greedy decoding gives the same tokens."""
    from modelpress.inference import static_kv

    model = build_tiny_llama(0, initializer_range=0.2).to(cuda)
    settings = GenerationSettings(max_new_tokens=16, kv_cache="int8", sampling=SamplingConfig(temperature=0.0))
    monkeypatch.setattr(static_kv, "WRITE_INT8_KERNEL", False)
    codec = generate(model, PROMPT, settings)
    monkeypatch.setattr(static_kv, "WRITE_INT8_KERNEL", True)
    kernel = generate(model, PROMPT, settings)
    assert kernel.decode_path == "graph" and "KV writes" in kernel.fusions and "KV writes" not in codec.fusions
    assert kernel.tokens == codec.tokens
