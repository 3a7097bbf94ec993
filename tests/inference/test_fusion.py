"""Decode-time fusions (inference/fusion.py): packed rows stack and unstack exactly; a fused model computes what
it computed before, holds no more memory, and is given back exactly (each layer its own tensors); what cannot be
fused is left alone and named. On CUDA: the one-kernel RMS norm against transformers' own, and generate with the
fusions against generate without them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.errors import ModelpressError
from modelpress.formats import WeightScheme
from modelpress.formats.packed import concat_rows, quantize_weight, row_slices
from modelpress.inference.decoding import GenerationSettings, generate
from modelpress.inference.fusion import ATTENTION, FusedRMSNorm, SiblingPart, fuse_for_decode
from modelpress.inference.sampling import SamplingConfig
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.triton_act import silu_mul
from modelpress.nn.triton_attention import MAX_ROWS, MAX_TOKENS, decode_attention
from modelpress.nn.triton_kv import write_kv, write_kv_int8
from modelpress.nn.triton_norm import add_rms_norm, rms_norm
from modelpress.nn.triton_rope import rotary
from conftest import build_family

TOKENS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12]])


def packed_rows(spec: str, rows: list[int], k: int = 64, perm: torch.Tensor | None = None):
    generator = torch.Generator().manual_seed(3)
    return [quantize_weight(torch.randn(n, k, generator=generator), WeightScheme.parse(spec), input_perm=perm)
            for n in rows]


@pytest.mark.parametrize("spec", ["int4/g32", "int4-asym/g16", "nf4/g64", "int8/channel", "fp8-e4m3/g32",
                                  "int3-asym/g32"])
def test_stacked_rows_are_the_parts_exactly(spec):
    parts = packed_rows(spec, [48, 16, 16])
    stacked = concat_rows(parts)
    assert stacked.shape == (80, 64) and stacked.nbytes == sum(p.nbytes for p in parts)
    assert torch.equal(stacked.dequantize(), torch.cat([p.dequantize() for p in parts]))
    for part, back in zip(parts, row_slices(stacked, [48, 16, 16])):
        assert back.shape == part.shape
        assert torch.equal(back.dequantize(), part.dequantize())


def test_stacking_keeps_a_shared_input_permutation():
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    parts = packed_rows("int4/g32", [32, 16], perm=perm)
    assert torch.equal(concat_rows(parts).dequantize(), torch.cat([p.dequantize() for p in parts]))


@pytest.mark.parametrize("parts, reason", [
    (lambda: packed_rows("nf4/g64/dq", [32, 32]), "double-quantized"),
    (lambda: packed_rows("int8/tensor", [32, 32]), "one scale per tensor"),
    (lambda: packed_rows("int4/g32", [32]) + packed_rows("int4/g16", [32]), "rows of int4/g32 and int4/g16"),
    (lambda: packed_rows("int4/g32", [32]) + packed_rows("int4/g32", [32], k=96), "64 and 96 inputs"),
    (lambda: packed_rows("int4/g32", [32], perm=torch.arange(64)) + packed_rows("int4/g32", [32],
                                                                                perm=torch.arange(64).flip(0)),
     "permuted differently"),
])
def test_rows_that_do_not_stand_alone_are_refused(parts, reason):
    with pytest.raises(ModelpressError, match=reason):
        concat_rows(parts())


def storage_bytes(model: nn.Module) -> int:
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def packed(model: nn.Module, spec: str) -> nn.Module:
    quantize_rtn(model, RTNConfig(scheme=WeightScheme.parse(spec)))
    return model


@pytest.mark.parametrize("family, spec", [("llama", None), ("llama", "int4/g32"), ("qwen2", "int4-asym/g32"),
                                          ("qwen3", None), ("gemma3", "int8/channel"), ("mistral", "nf4/g32")])
def test_a_fused_model_computes_the_same_and_is_given_back(family, spec):
    model = build_family(family)
    if spec:
        packed(model, spec)
    before = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    memory = storage_bytes(model)

    report, undo = fuse_for_decode(model)
    layers = model.config.num_hidden_layers
    assert report.groups == 2 * layers and not report.skipped
    assert report.norms == len([m for m in modules.values() if "RMSNorm" in type(m).__name__])
    assert isinstance(model.model.layers[0].self_attn.k_proj, SiblingPart)
    assert isinstance(model.model.layers[0].input_layernorm, FusedRMSNorm)
    llama_kind = family != "gemma3"  # Gemma's MLP is GELU and its layer has four norms: neither fuses further
    assert report.mlps == (layers if llama_kind else 0) and report.adds == (2 * layers if llama_kind else 0)
    assert ("forward" in vars(model.model.layers[0].mlp)) == llama_kind
    sdpa = family != "gemma3"  # transformers runs Gemma 3's attention eagerly: left as it is
    assert report.attention == (layers if sdpa else 0)
    assert model.config._attn_implementation == (ATTENTION if sdpa else "eager")
    assert storage_bytes(model) <= memory + 64 * layers  # the stacked tensors replace the parts' own
    assert torch.allclose(logits(model), before, atol=1e-5, rtol=1e-5)

    undo()
    assert model.config._attn_implementation == ("sdpa" if sdpa else "eager")
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[name] and "forward" not in vars(m) for name, m in model.named_modules())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    storages = [t.untyped_storage().data_ptr() for t in after.values() if t.numel()]
    assert len(set(storages)) == len(storages) - tied(model), "a layer still shares its tensors"
    assert torch.equal(logits(model), before)


def tied(model: nn.Module) -> int:
    return int(model.config.tie_word_embeddings and model.get_output_embeddings() is not None)


@pytest.mark.parametrize("family, mlp_norm", [("llama", "post_attention_layernorm"),
                                              ("gemma3", "pre_feedforward_layernorm")])
def test_the_norms_before_layers_re_laid_for_the_rows_mode_are_the_ones_that_lay_x_out(family, mlp_norm):
    """_lay_norms marks the fused norm whose output each re-laid (not interleaved) q/k/v or [gate | up] layer reads:
    the input norm, and the MLP's own (Gemma's post-attention norm normalizes the attention's output instead); a
    layer left as stored, or interleaved for the one-row epilogue, marks nothing; undo clears the marks."""
    from modelpress.inference import fusion

    model = packed(build_family(family), "int4/g32")
    report, undo = fuse_for_decode(model)
    layers = model.model.layers
    for layer in layers:  # as _relayout leaves them: q/k/v re-laid in every layer, [gate | up] in the first only
        marks = [(layer.self_attn.q_proj.group.fused, False)]
        if layer is layers[0]:
            marks.append((layer.mlp.gate_proj.group.fused, False))
        elif family == "llama":
            marks.append((layer.mlp.gate_proj.group.fused, True))  # interleaved: its one-row epilogue
        for fused, interleaved in marks:
            fused.mma_words, fused.mma_interleaved = fused.qdata, interleaved
    lay_report = fusion.FusionReport()
    clear = fusion._lay_norms(model, lay_report)
    assert lay_report.laid == len(layers) + 1
    assert all(layer.input_layernorm.lays_x for layer in layers)
    assert getattr(layers[0], mlp_norm).lays_x
    assert not any(getattr(layer, mlp_norm).lays_x for layer in layers[1:])
    if family == "gemma3":
        assert not any(layer.post_attention_layernorm.lays_x for layer in layers)
    fusion._run_all(clear)
    assert not any(m.lays_x for m in model.modules() if isinstance(m, FusedRMSNorm))
    for layer in layers:
        for name in ("self_attn.q_proj", "mlp.gate_proj"):
            part = layer.get_submodule(name)
            vars(part.group.fused).pop("mma_words", None)
            vars(part.group.fused).pop("mma_interleaved", None)
    undo()


def test_a_sibling_called_on_another_input_computes_its_own():
    model = build_family("llama")
    attn = model.model.layers[0].self_attn
    originals = copy.deepcopy(attn)
    _, undo = fuse_for_decode(model)
    x, y = torch.randn(2, 3, 96), torch.randn(2, 3, 96)
    with torch.no_grad():
        q, k, v = attn.q_proj(x), attn.k_proj(y), attn.v_proj(x)
        assert torch.allclose(q, originals.q_proj(x), atol=1e-6)
        assert torch.allclose(k, originals.k_proj(y), atol=1e-6)
        assert torch.allclose(v, originals.v_proj(x), atol=1e-6)
        assert attn.q_proj.group._output is None or attn.q_proj.group._input is x  # only unread columns held
    undo()


def test_what_cannot_be_fused_is_left_and_named():
    model = packed(build_family("llama"), "nf4/g32/dq")
    layer = model.model.layers[1]
    layer.mlp.up_proj.register_forward_hook(lambda *args: None)
    report, undo = fuse_for_decode(model)
    assert report.groups == 0
    assert any("layers.0.self_attn.q_proj/k_proj/v_proj: cannot stack rows of double-quantized" in s
               for s in report.skipped)
    assert any("layers.1.mlp.gate_proj/up_proj: a projection has hooks" in s for s in report.skipped)
    assert type(layer.mlp.up_proj) is QuantLinear
    undo()


def test_each_norm_runs_once_with_the_adds_fused():
    """The add after a layer's MLP is computed with the next norm (the next layer's input norm, the final norm after
    the last layer), which then returns what it was handed instead of normalizing again."""
    model = packed(build_family("llama", num_hidden_layers=3), "int4/g32")
    before = logits(model)
    report, undo = fuse_for_decode(model)
    calls = []
    norms = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
    for norm in norms:
        norm.norm.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(logits(model), before)
    assert report.adds == 6 and len(calls) == len(norms) == 7  # 2 a layer and the final one, each once
    assert all(norm._handed is None for norm in norms)  # nothing held between calls
    undo()


def test_a_fused_layer_called_positionally_runs_its_class_forward():
    """The replaced forward passes keyword arguments through; a caller that passes more than the hidden states
    positionally gets the class's own forward (same result, the adds unfused)."""
    model = build_family("llama")
    layer = model.model.layers[0]
    hidden = torch.randn(1, 3, 96)
    positions = torch.arange(3)[None]
    angles = model.model.rotary_emb(hidden, positions)
    with torch.no_grad():
        want = layer(hidden, None, positions, position_embeddings=angles)
        _, undo = fuse_for_decode(model)
        try:
            assert "forward" in vars(layer)
            assert torch.equal(layer(hidden, None, positions, position_embeddings=angles), want)
            assert torch.equal(layer(hidden, attention_mask=None, position_ids=positions,
                                     position_embeddings=angles), want)
        finally:
            undo()


def test_an_mlp_of_another_activation_keeps_its_own_forward():
    model = build_family("llama", hidden_act="gelu")
    report, undo = fuse_for_decode(model)
    assert report.groups == 4 and report.mlps == 0 and report.adds == 4
    assert any("layers.0.mlp: its activation is not SiLU" in s for s in report.skipped)
    assert "forward" not in vars(model.model.layers[0].mlp)
    undo()


def test_the_rotary_function_is_replaced_once_and_put_back():
    import transformers.models.qwen3.modeling_qwen3 as qwen3

    original = qwen3.apply_rotary_pos_emb
    target, draft = build_family("qwen3"), build_family("qwen3", num_hidden_layers=1)
    before = logits(target)
    first, undo_target = fuse_for_decode(target)
    second, undo_draft = fuse_for_decode(draft)
    assert first.rotary == 1 and second.rotary == 0  # the draft's family was replaced already
    assert qwen3.apply_rotary_pos_emb is not original and qwen3.apply_rotary_pos_emb.__wrapped__ is original
    assert torch.allclose(logits(target), before, atol=1e-5)  # on the CPU the original function runs
    undo_draft()
    undo_target()
    assert qwen3.apply_rotary_pos_emb is original


@pytest.mark.parametrize("kv", ["float", "int8"])
def test_a_fused_model_decodes_the_same_tokens_on_the_static_cache(kv):
    """The static path (what the GPU captures) on a fused packed model, float and quantized KV cache: the fusions
    applied by hand here, since generate fuses on CUDA only."""
    model = packed(build_family("qwen3"), "int4/g32")
    settings = GenerationSettings(max_new_tokens=10, decode="static", kv_cache=kv,
                                  sampling=SamplingConfig(temperature=0.0))
    want = generate(model, [5, 17, 33, 2, 90], settings).tokens
    report, undo = fuse_for_decode(model)
    try:
        assert report.groups == 4
        assert generate(model, [5, 17, 33, 2, 90], settings).tokens == want
    finally:
        undo()


@pytest.mark.parametrize("heads, kv_heads, tokens, length, split", [
    (8, 2, 1, 10, True), (8, 2, 1, 1100, True), (8, 8, 3, 1100, True), (8, 8, 1, 10, True), (8, 8, 1, 1100, False)])
def test_attention_goes_to_the_split_cache_kernels_where_they_pay(monkeypatch, heads, kv_heads, tokens, length, split):
    """Shared key/value heads or several query tokens: the split-cache kernels; one token of a model with a key/value
    head per query head: the kernels over a short cache, SDPA over a long one (faster there). Either way the result
    is SDPA's where the kernels do not serve (CPU)."""
    import modelpress.inference.fusion as fusion
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert 10 <= fusion.MHA_SPLIT_MAX_POSITIONS < 1100
    calls = []
    monkeypatch.setattr(fusion, "decode_attention", lambda *args, **kwargs: calls.append(args) or None)
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    q = torch.randn(1, heads, tokens, 16)
    k, v = (torch.randn(1, kv_heads, length, 16) for _ in "kv")
    written = torch.arange(length) > length - 4 + torch.arange(tokens)[:, None]
    mask = torch.zeros(1, 1, tokens, length).masked_fill(written, -1e30)
    got, _ = fusion._split_cache_attention(module, q, k, v, mask, scaling=0.25)
    assert len(calls) == split
    assert torch.equal(got, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0])


def test_int8_codes_go_to_the_kernels_even_where_sdpa_would_take_float_states(monkeypatch):
    """One token of a model with a key/value head per query head over a long cache goes to SDPA from a float cache,
    but an int8 cache's codes go to the kernels: SDPA would need the whole cache dequantized first."""
    import modelpress.inference.fusion as fusion

    from modelpress.inference.kv_cache import KVCacheConfig

    codec, _ = KVCacheConfig("int8").codecs()
    calls = []
    monkeypatch.setattr(fusion, "decode_attention", lambda *args, **kwargs: calls.append(kwargs) or None)
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    length = fusion.MHA_SPLIT_MAX_POSITIONS + 76
    q = torch.randn(1, 4, 1, 16)
    stored = [codec.quantize(torch.randn(1, 4, length, 16)) for _ in "kv"]
    keys, values = (s.qdata for s in stored)
    keys.kv_scales = tuple(s.scale for s in stored)
    fusion._split_cache_attention(module, q, keys, values, None, scaling=0.25)
    assert len(calls) == 1 and calls[0]["key_scale"] is keys.kv_scales[0]
    states = [codec.dequantize(s, torch.float32) for s in stored]
    fusion._split_cache_attention(module, q, *states, None, scaling=0.25)
    assert len(calls) == 1  # the float states: SDPA


def test_int8_codes_the_kernels_do_not_serve_are_attended_dequantized(monkeypatch):
    """The static int8 cache's codes (keys carrying `kv_scales`) where the kernels do not serve (decode_attention
    returns None: on the CPU, unless Triton's interpreter runs them): SDPA over the states kv_quant dequantizes, so
    the same as the cache's own dequantized read."""
    import modelpress.inference.fusion as fusion
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from modelpress.inference.kv_cache import KVCacheConfig

    monkeypatch.setattr(fusion, "decode_attention", lambda *args, **kwargs: None)

    codec, _ = KVCacheConfig("int8").codecs()
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q = torch.randn(1, 4, 1, 16)
    stored = [codec.quantize(torch.randn(1, 2, 30, 16)) for _ in "kv"]
    keys, values = (s.qdata for s in stored)
    keys.kv_scales = tuple(s.scale for s in stored)
    got, _ = fusion._split_cache_attention(module, q, keys, values, None, scaling=0.25)
    k, v = (codec.dequantize(s, torch.float32) for s in stored)
    assert torch.equal(got, sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0])


def test_generate_fuses_only_on_cuda_and_reports_it():
    model = build_family("llama")
    settings = GenerationSettings(max_new_tokens=4, decode="eager", sampling=SamplingConfig(temperature=0.0))
    assert generate(model, [5, 17, 33], settings).fusions == ""  # the CPU's decode paths take no fusion


# ---------------------------------------------------------------- CUDA

@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_norm_kernel_gives_transformers_norm(cuda, family, dtype):
    norm = copy.deepcopy(build_family(family).model.layers[0].input_layernorm).to(cuda, dtype)
    gemma = family == "gemma3"
    eps = float(norm.eps if gemma else norm.variance_epsilon)
    for shape in [(96,), (1, 1, 96), (2, 7, 96), (5, 96)]:
        x = 3 * torch.randn(shape, device=cuda, dtype=dtype)
        got, want = rms_norm(x, norm.weight, eps, gemma), norm(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want)  # the dtype's own tolerance: at most a rounding apart
    # a per-head norm of a query sliced out of a fused q/k/v output: strided rows, read in place
    fused = torch.randn(2, 5, 3 * 96, device=cuda, dtype=dtype)
    query = fused[..., :192].view(2, 5, 2, 96)
    torch.testing.assert_close(rms_norm(query, norm.weight, eps, gemma), norm(query))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_norm_kernels_lay_their_output_out_for_the_rows_mode(cuda, dtype):
    """laid=True: the same output, and beside it (`mma_laid`) the output in fragment order, exactly as
    mma_ptx.fragment_order lays it (rows past the last zero), for 2 to MAX_ROWS rows of 16-bit values whose width is a
    multiple of 64; nothing laid for one row, more rows, float32 or other widths."""
    from modelpress.nn import mma_ptx

    norm = copy.deepcopy(build_family("llama").model.layers[0].input_layernorm)
    for rows in (1, 2, 5, mma_ptx.MAX_ROWS, mma_ptx.MAX_ROWS + 1):
        for width, gemma in ((192, False), (192, True), (96, False)):
            weight = torch.randn(width).to(cuda, dtype)
            x, r = (3 * torch.randn(1, rows, width, device=cuda, dtype=dtype) for _ in "xr")
            served = 2 <= rows <= mma_ptx.MAX_ROWS and width % 64 == 0 and dtype != torch.float32
            plain, laid = rms_norm(x, weight, 1e-6, gemma), rms_norm(x, weight, 1e-6, gemma, laid=True)
            assert torch.equal(laid, plain) and not hasattr(plain, "mma_laid")
            assert hasattr(laid, "mma_laid") == served
            if served:
                assert torch.equal(laid.mma_laid, mma_ptx.fragment_order(plain.view(rows, width)))
            if gemma or dtype == torch.float16:
                continue
            (total, plain), (total_laid, laid) = (add_rms_norm(x, r, weight, norm.variance_epsilon, laid=flag)
                                                   for flag in (False, True))
            assert torch.equal(total_laid, total) and torch.equal(laid, plain)
            assert hasattr(laid, "mma_laid") == served
            if served:
                assert torch.equal(laid.mma_laid, mma_ptx.fragment_order(plain.view(rows, width)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_add_and_norm_kernel_gives_the_add_then_the_norm(cuda, dtype):
    norm = copy.deepcopy(build_family("llama").model.layers[0].post_attention_layernorm).to(cuda, dtype)
    for shape in [(1, 1, 96), (2, 7, 96), (5, 96)]:
        x, r = (3 * torch.randn(shape, device=cuda, dtype=dtype) for _ in "xr")
        total, normed = add_rms_norm(x, r, norm.weight, norm.variance_epsilon)
        assert torch.equal(total, x + r)  # the residual stream is bit for bit the layer's own
        torch.testing.assert_close(normed, norm(x + r))
    assert add_rms_norm(x.half(), r.half(), norm.weight.half(), 1e-6) is None  # float16: left to PyTorch
    strided = torch.randn(96, 5, device=cuda, dtype=dtype).t()
    assert add_rms_norm(strided, r, norm.weight, 1e-6) is None  # rows not contiguous: left to PyTorch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_cache_write_kernel_writes_what_index_copy_writes(cuda, dtype):
    generator = torch.Generator().manual_seed(0)
    for b, h, t, d, length in [(1, 2, 1, 128, 9), (2, 3, 4, 96, 16), (1, 1, 3, 16, 5)]:
        keys, values = (torch.randn(b, h, length, d, generator=generator).to(cuda, dtype) for _ in "kv")
        # keys from the rotary kernel's layout, values sliced out of a fused projection output
        k = torch.randn(b, t, h, d, generator=generator).to(cuda, dtype).transpose(1, 2)
        v = torch.randn(b, t, 3 * h * d, generator=generator).to(cuda, dtype)[..., h * d:2 * h * d]
        v = v.view(b, t, h, d).transpose(1, 2)
        index = torch.randperm(length, generator=generator)[:t].to(cuda)
        want_k, want_v = keys.clone().index_copy_(2, index, k), values.clone().index_copy_(2, index, v)
        assert write_kv(keys, values, index, k, v)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert not write_kv(keys, values, index.float(), k, v)  # float positions: left to index_copy_


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_int8_cache_write_kernel_writes_what_the_codec_writes(cuda, dtype):
    """Codes and float16 scales bit for bit those of the int8 codec's PyTorch kernels and write_store on CUDA, for
    strided inputs, prefill and single tokens, all-zero vectors, ties and values past float16's range."""
    from modelpress.inference.kv_cache import KVCacheConfig
    from modelpress.inference.static_kv import empty_store, write_store

    codec = KVCacheConfig("int8").codecs()[0]
    generator = torch.Generator().manual_seed(0)
    for b, h, t, d, length in [(1, 2, 1, 128, 9), (2, 3, 5, 96, 16), (1, 1, 3, 16, 5)]:
        k = (torch.randn(b, t, h, d, generator=generator) * torch.logspace(-6, 4, d)).to(cuda, dtype).transpose(1, 2)
        v = torch.randn(b, t, 3 * h * d, generator=generator).to(cuda, dtype)[..., h * d:2 * h * d]
        v = v.view(b, t, h, d).transpose(1, 2)
        k[0, 0, 0] = 0  # an all-zero vector: scale 1
        v[0, 0, 0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 126.5])  # scale 1: ties go to even codes
        if dtype == torch.float32:
            v[-1, -1, -1, :2] = torch.tensor([1e30, -3e29])  # the scale clamped to float16's largest
        index = torch.randperm(length, generator=generator)[:t].sort().values.to(cuda)
        want = [empty_store(codec, k, length) for _ in "kv"]
        got = [empty_store(codec, k, length) for _ in "kv"]
        write_store(want[0], codec.quantize(k), index, index)
        write_store(want[1], codec.quantize(v), index, index)
        assert write_kv_int8(got[0].qdata, got[0].scale, got[1].qdata, got[1].scale, index, k, v)
        for a, w in zip(got, want):
            assert torch.equal(a.qdata, w.qdata) and torch.equal(a.scale, w.scale)
    assert not write_kv_int8(got[0].qdata, got[0].scale, got[1].qdata, got[1].scale, index.float(), k, v)
    two = got[0].scale.expand(-1, -1, -1, 2).contiguous()  # two scales a token: not this layout, nothing written
    assert not write_kv_int8(got[0].qdata, two, got[1].qdata, two.clone(), index, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_gated_activation_kernel_gives_silu_times_up(cuda, dtype):
    for shape in [(1, 1, 2 * 96), (3, 5, 2 * 1500), (4, 2 * 11008)]:
        h = 4 * torch.randn(shape, device=cuda, dtype=dtype)
        width = shape[-1] // 2
        want = F.silu(h[..., :width]) * h[..., width:]
        assert torch.equal(silu_mul(h), want)  # libdevice's expf and an IEEE division, as PyTorch computes
    assert silu_mul(h.half()) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_rotary_kernel_gives_transformers_rotary(cuda, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (3 * torch.randn(shape, generator=generator)).to(cuda, dtype)

    for b, hq, hk, t, d, cos_batch in [(1, 6, 2, 1, 16, 1), (2, 6, 6, 5, 16, 2), (2, 4, 2, 3, 128, 1),
                                       (1, 3, 1, 4, 96, 1)]:
        angles = torch.randn(cos_batch, t, d // 2, generator=generator).repeat(1, 1, 2)
        cos, sin = angles.cos().to(cuda, dtype), angles.sin().to(cuda, dtype)
        # queries and keys sliced out of one fused projection output, as SiblingPart hands them out
        fused = rand(b, t, (hq + 2 * hk) * d)
        q = fused[..., :hq * d].view(b, t, hq, d).transpose(1, 2)
        k = fused[..., hq * d:(hq + hk) * d].view(b, t, hk, d).transpose(1, 2)
        got, want = rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            if dtype == torch.float32:
                torch.testing.assert_close(g, w)
            else:  # every product and the sum rounded as PyTorch rounds them: the same numbers
                assert torch.equal(g, w)
    half = q.half(), k.half(), cos.half(), sin.half()
    assert rotary(*half) is None  # float16 is left to transformers' own


def attention_reference(q, k, v, mask, scaling):
    """float64 softmax attention of the stored values, (B, T, H, D)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("interleaved", [True, False])  # each split's blocks: every splits-th, or one run
@pytest.mark.parametrize("vector", [False, True])  # triton_attention's one-row kernels, for the shapes with one row
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b, heads, kv_heads, t, length, d", [
    (1, 32, 32, 1, 640, 128),      # Llama-2-7B decode step
    (1, 32, 8, 1, 3000, 128),      # grouped-query heads, chunks of 64
    (1, 8, 2, 5, 97, 64),          # speculative verification: 5 tokens, a ragged last chunk
    (2, 4, 4, 2, 9000, 80),        # two sequences, a head size that is no power of two, chunks of 128
    (3, 4, 4, 1, 300, 80),         # three sequences, one row a key/value head, a ragged last chunk
    (2, 2, 2, 1, 200, 256),        # heads of 256 (Gemma): the one-row kernels' blocks halved
])
def test_the_split_cache_attention_gives_softmax_attention(cuda, monkeypatch, interleaved, vector, dtype, b, heads,
                                                           kv_heads, t, length, d):
    from modelpress.nn import triton_attention

    monkeypatch.setattr(triton_attention, "INTERLEAVED_SPLITS", interleaved)
    monkeypatch.setattr(triton_attention, "VECTOR_ROWS", vector)
    monkeypatch.setattr(triton_attention, "VECTOR_MIN_WAVES", 0.0)  # at any batch, where the shape has one row
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(b, heads, t, d, generator=generator).to(cuda, dtype)
    k, v = (torch.randn(b, kv_heads, length, d, generator=generator).to(cuda, dtype) for _ in "kv")
    position = length - 3 * t  # the cache's last slots not written yet: masked, never read
    allowed = torch.arange(length)[None, :] <= torch.arange(position, position + t)[:, None]  # (T, L)
    additive = torch.zeros(1, 1, t, length).masked_fill(~allowed, torch.finfo(dtype).min).to(cuda, dtype)
    boolean = allowed.expand(b, 1, t, length).contiguous().to(cuda)
    for mask in (additive, boolean):
        got = decode_attention(q, k, v, mask, d ** -0.5)
        want = attention_reference(q, k, v, mask, d ** -0.5)
        assert got.shape == (b, t, heads, d) and got.dtype == dtype
        # float32 throughout, one rounding to the output's dtype (and the kernel's exp's few ulp)
        tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert torch.allclose(got.double(), want, atol=tolerance, rtol=tolerance)
    k[:, :, position + t:] = float("nan")  # slots no query may see: never read
    assert not decode_attention(q, k, v, additive, d ** -0.5).isnan().any()
    if t == 1:  # no mask: every position attends
        k[:, :, position + t:] = 0
        assert torch.allclose(decode_attention(q, k, v, None, d ** -0.5).double(),
                              attention_reference(q, k, v, None, d ** -0.5), atol=1e-2, rtol=1e-2)


def test_one_row_kernels_are_taken_where_one_row_a_head_fills_the_gpu(monkeypatch):
    """The one-row variant serves one query row a key/value head of int8 codes always, of float states once the
    (sequence, key/value head) programs fill the GPU; one warp a program."""
    from modelpress.nn import triton_attention
    from modelpress.nn.triton_attention import one_row_kernels, split_plan

    monkeypatch.setattr(triton_attention, "VECTOR_ROWS", True)
    assert one_row_kernels(1, 16 * 32, 132) and one_row_kernels(1, 132, 132)
    assert not one_row_kernels(1, 32, 132)       # one sequence of a 7B: the tile kernels
    assert not one_row_kernels(4, 16 * 8, 132)   # grouped-query heads: a tile of 4 rows
    assert one_row_kernels(1, 32, 132, codes=True)   # int8 codes: at any count
    assert split_plan(640, 512, 132, one_row=True, codes=True) == (32, 4, 1)   # one warp, 16 waves: 4 splits
    assert split_plan(640, 32, 132, one_row=True, codes=True) == (32, 20, 1)   # as many splits as blocks
    assert split_plan(640, 512, 132, one_row=True, head_dim=256)[0] == 16      # a warp's tile no larger than timed
    assert split_plan(640, 512, 132, one_row=True, head_dim=192)[0] == 16      # padded to 256: a power of two
    assert split_plan(640, 512, 132, one_row=True, head_dim=64)[0] == 32
    assert split_plan(640, 512, 132) == (64, 1, 4)                             # the tiles: 64 positions, 4 waves
    assert split_plan(8192, 32, 132)[0] == 128
    monkeypatch.setattr(triton_attention, "VECTOR_ROWS", False)
    assert not one_row_kernels(1, 16 * 32, 132) and not one_row_kernels(1, 16 * 32, 132, codes=True)


def test_the_split_cache_attention_leaves_what_it_does_not_serve(cuda):
    q, k, v = (torch.randn(shape, device=cuda) for shape in ((1, 4, 2, 64), (1, 2, 50, 64), (1, 2, 50, 64)))
    assert decode_attention(q, k, v, None, 0.125) is None  # two tokens, no mask: causal or not is not said
    per_head = torch.zeros(1, 4, 2, 50, device=cuda)
    assert decode_attention(q, k, v, per_head, 0.125) is None
    groups = torch.randn(1, 2 * (MAX_ROWS // 2 + 1), 2, 64, device=cuda)  # more query rows a key/value head than served
    assert decode_attention(groups, k, v, torch.zeros(1, 1, 2, 50, device=cuda), 0.125) is None
    many = torch.randn(1, 4, MAX_TOKENS + 1, 64, device=cuda)
    assert decode_attention(many, k, v, torch.zeros(1, 1, MAX_TOKENS + 1, 50, device=cuda), 0.125) is None
    assert decode_attention(q.cpu(), k.cpu(), v.cpu(), None, 0.125) is None


@pytest.mark.parametrize("spec", [None, "int4/g32"])
@pytest.mark.parametrize("path", ["eager", "graph"])
def test_generate_with_fusions_gives_the_tokens_without(cuda, spec, path):
    dtype = torch.float32 if spec is None else torch.bfloat16
    model = build_family("qwen3").to(dtype)
    if spec:
        packed(model, spec)
    model = model.to(cuda)
    norms = len([m for m in model.modules() if type(m).__name__ == "Qwen3RMSNorm"])  # 4 a layer and the final one
    runs = {}
    for fuse in (False, True):
        settings = GenerationSettings(max_new_tokens=12, decode=path, fuse=fuse,
                                      sampling=SamplingConfig(temperature=0.0))
        runs[fuse] = generate(model, [5, 17, 33, 2, 90], settings)
    writes = ", KV writes" if path == "graph" else ""  # the static cache's keys and values in one kernel
    assert runs[True].fusions == (f"4 sibling groups, {norms} norms, 2 MLPs, 4 residual adds, 2 attentions, "
                                  f"rotary{writes}")
    assert runs[False].fusions == ""
    assert runs[True].decode_path == runs[False].decode_path == path
    if dtype == torch.float32:
        assert runs[True].tokens == runs[False].tokens
    else:  # bfloat16 sums in another order: the first tokens agree
        assert runs[True].tokens[:4] == runs[False].tokens[:4]
    assert type(model.model.layers[0].self_attn.q_proj) in (nn.Linear, QuantLinear)  # given back


def test_a_fusion_that_fails_leaves_the_model_as_it_was(monkeypatch):
    """fuse_for_decode undoes what it did before an error, so generate can decode unfused."""
    import modelpress.inference.fusion as fusion

    model = packed(build_family("llama"), "int4/g32")
    modules = dict(model.named_modules())

    def broken(parts):
        raise RuntimeError("no room")

    monkeypatch.setattr(fusion, "_stack", broken)
    with pytest.raises(RuntimeError, match="no room"):
        fuse_for_decode(model)
    assert all(m is modules[name] for name, m in model.named_modules()) and len(modules) == len(
        dict(model.named_modules()))  # the norms fused before the error are back


def test_fusing_leaves_the_random_state_alone():
    """Sampling without a generator draws from the global state: fusing must not move it."""
    model = packed(build_family("gemma3"), "int4/g32")
    state = torch.get_rng_state()
    _, undo = fuse_for_decode(model)
    undo()
    assert torch.equal(torch.get_rng_state(), state)


def test_relaid_codes_are_refused_off_the_decode_path_and_given_back(monkeypatch):
    """The in-place re-layout for the tensor-core GEMV (on the CPU with the support check forced: the layout is
    the same permutation everywhere): a re-laid layer refuses calls its codes cannot serve, and undo gives every
    byte back."""
    from modelpress.inference import fusion
    from modelpress.nn import triton_backend

    model = build_family("llama", hidden_size=128, intermediate_size=256, num_attention_heads=8)
    model = packed(model, "int4/g64")
    monkeypatch.setattr(triton_backend, "mma_supported", lambda p: p.scheme.format == "int4")
    monkeypatch.setattr(fusion, "INTERLEAVE", True)
    report, undo = fuse_for_decode(model)
    undo()
    assert report.relaid == 0  # float32 activations: the kernel takes 16-bit ones, so nothing is re-laid
    model = model.to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report, undo = fuse_for_decode(model)
    layers = model.config.num_hidden_layers
    assert report.relaid == 4 * layers  # the q/k/v group, o, the gate/up group, down
    assert report.gated == layers  # each gate/up group's rows interleaved for the activation in its epilogue
    assert model.model.layers[0].mlp.gate_proj.group.fused.mma_interleaved
    assert "4-bit layers on the tensor-core GEMV" in report.summary()
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.mma_words.data_ptr() == layer.qdata.data_ptr()  # a view: no second copy of the codes
    assert not torch.equal(layer.qdata, state["model.layers.0.self_attn.o_proj.qdata"])
    with pytest.raises(ModelpressError, match="laid out for the tensor-core GEMV"):
        layer(torch.randn(1, 128, dtype=torch.bfloat16))
    undo()
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert "mma_words" not in vars(layer)


@pytest.mark.parametrize("spec, split", [("int4/g128", False), ("int4-asym/g64", False), ("nf4/g64", False),
                                         ("int4/g128", True), ("nf4/g64", True)])
def test_generate_on_the_tensor_core_gemv_gives_the_tokens_of_the_cuda_core_one(cuda, spec, split, monkeypatch):
    from modelpress.inference import fusion
    from modelpress.nn import triton_backend

    monkeypatch.setattr(triton_backend, "MMA_FORMATS", ("int4", "int4-asym", "nf4"))
    monkeypatch.setattr(fusion, "INTERLEAVE", True)
    if split:  # every layer short of row tiles: K split across programs, the partial sums through the workspace
        monkeypatch.setattr(triton_backend, "MMA_SPLIT_K", True)
        monkeypatch.setattr(triton_backend, "MMA_MIN_TILES_PER_SM", 10**6)
        monkeypatch.setattr(triton_backend, "MMA_SPLIT_MIN_STEPS", 1)
        width = 2048 if spec.startswith("nf4") else 1024   # NF4's plan steps over 1024 columns: K >= 2048 to split
        model = build_family("llama", hidden_size=width, intermediate_size=2 * width, num_attention_heads=width // 64,
                             head_dim=64)  # o_proj's K = width too: every layer's K long enough to split
    else:
        monkeypatch.setattr(triton_backend, "MMA_MIN_TILES_PER_SM", 0)  # a tiny model's layers, re-laid all the same
        model = build_family("llama", hidden_size=256, intermediate_size=512, num_attention_heads=16)
    model = packed(model.to(torch.bfloat16), spec).to(cuda)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = GenerationSettings(max_new_tokens=12, decode="graph", sampling=SamplingConfig(temperature=0.0))
    runs = {}
    for relayout in (False, True):
        monkeypatch.setattr(fusion, "RELAYOUT", relayout)
        runs[relayout] = generate(model, [5, 17, 33, 2, 90], settings)
    layers = model.config.num_hidden_layers
    assert runs[True].fusions.endswith(f"{layers} MLP activations in the GEMV, {4 * layers} 4-bit layers on the "
                                       "tensor-core GEMV, rotary, KV writes")
    assert "tensor-core" not in runs[False].fusions
    # bfloat16 sums in another order: a random model's near-tied logits part after a few tokens (the wider split
    # model's at the fourth on an H100); a wrong layer would part at the first. Kernel parity: test_mma_gemv.py
    agree = 2 if split else 4
    assert runs[True].tokens[:agree] == runs[False].tokens[:agree]
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)  # the stored order is back
