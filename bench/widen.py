"""A trained Llama's function in a larger Llama's shape: every weight of the small model placed in the large one,
every other weight zero, so the wide model computes the small model's logits (up to rounding) while each of its
forwards reads and multiplies as many bytes as a model of the large shape.

Why: speculative decoding's speedup is the product of two things, what a draft step and a verify pass cost at the
target's size, and how often the draft is accepted. Random weights give the first honestly and the second not at
all; no trained 7B model is available offline. A 7B-shaped model carrying the default model's function gives both:
7B costs, and the acceptance of a quantized copy of a trained model (the default model's, which, at 135M
parameters, is more sensitive to quantization than a 7B model is, so its acceptance is if anything low).

The map, small (h, i, l layers, n heads of d, n_kv key/value heads) into large (H, I, L, N heads of D = m d):
- hidden units and MLP units: the first h of H and the first i of I;
- query head j -> head p(j); its dimension e (rotate-half pairs (e, e + d/2)) -> m e and m e + D/2, so that the
  large model's rotary frequency there, theta^(-2 m e / D), is the small one's, theta^(-2e/d) (same theta);
  queries scaled by sqrt(D/d) for the softmax's 1/sqrt(D); values keep their first d dimensions;
- key/value heads follow their query heads' grouping (GQA groups of either size, where one divides the other);
- RMS norms: gains times sqrt(h/H) and eps times h/H, so that the norm over H units, h of them nonzero, equals
  the small one over h;
- layers l..L-1 all zero: their attention and MLP add nothing to the residual stream.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim")


def widened_config(small: LlamaConfig, **shape) -> LlamaConfig:
    """The small model's config in the large shape (`shape`: WIDTH_KEYS; head_dim defaults to hidden / heads)."""
    unknown = set(shape) - set(WIDTH_KEYS)
    if unknown:
        raise ValueError(f"widen: unknown shape keys {sorted(unknown)}; use {WIDTH_KEYS}")
    shape.setdefault("head_dim", shape.get("hidden_size", small.hidden_size)
                     // shape.get("num_attention_heads", small.num_attention_heads))
    config = LlamaConfig(**{**small.to_dict(), **shape})
    config.rms_norm_eps = small.rms_norm_eps * small.hidden_size / config.hidden_size
    config._attn_implementation = getattr(small, "_attn_implementation", None) or "sdpa"
    _check(small, config)
    return config


def _check(small: LlamaConfig, large: LlamaConfig) -> None:
    d, big_d = _head_dim(small), _head_dim(large)
    problems = [f"{key} {getattr(small, key)} > {getattr(large, key)}" for key in WIDTH_KEYS[:5]
                if getattr(small, key) > getattr(large, key)]
    if big_d % d or d % 2:
        problems.append(f"head_dim {big_d} is not a multiple of {d}")
    g, big_g = _group(small), _group(large)
    if g % big_g and big_g % g:
        problems.append(f"query heads per key/value head {g} and {big_g}: neither divides the other")
    if getattr(small, "attention_bias", False) or getattr(small, "mlp_bias", False):
        problems.append("biases (not mapped)")
    if problems:
        raise ValueError("widen: the small model does not fit the large shape: " + "; ".join(problems))


def _head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _group(config: LlamaConfig) -> int:
    return config.num_attention_heads // config.num_key_value_heads


def head_maps(small: LlamaConfig, large: LlamaConfig) -> tuple[list[int], list[int]]:
    """(p, kv): query head j of the small model sits at large head p[j]; large key/value head t holds the small
    key/value head kv[t] (only the large key/value heads some placed query head reads are listed)."""
    g, big_g = _group(small), _group(large)
    heads = range(small.num_attention_heads)
    if big_g % g == 0:  # each small group fits inside one large group: keep the groups apart
        p = [(j // g) * big_g + j % g for j in heads]
        return p, list(range(small.num_key_value_heads))
    p = list(heads)  # large groups are smaller: several of them read copies of one small key/value head
    return p, [t * big_g // g for t in range(-(-small.num_attention_heads // big_g))]


def rotary_rows(d: int, big_d: int) -> torch.Tensor:
    """Large-head dimension of each small-head dimension of queries and keys (rotate-half pairs kept, frequencies
    kept: dimension e -> m e, e + d/2 -> m e + D/2, m = D/d)."""
    m, half = big_d // d, d // 2
    e = torch.arange(half)
    return torch.cat([m * e, m * e + big_d // 2])


@torch.no_grad()
def widen(model: LlamaForCausalLM, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
          **shape) -> LlamaForCausalLM:
    """A LlamaForCausalLM of the large `shape` computing `model`'s logits (module docstring), built on `device`
    in `dtype` (default: the small model's). The small model is not changed."""
    small = model.config
    config = widened_config(small, **shape)
    source = next(model.parameters())
    device, dtype = torch.device(device or source.device), dtype or source.dtype
    with torch.device("meta"):
        wide = LlamaForCausalLM(config)
    wide = wide.to(dtype=dtype).to_empty(device=device).eval()
    if config.tie_word_embeddings:  # to_empty may give the tied pair two tensors
        wide.lm_head.weight = wide.model.embed_tokens.weight
    for p in wide.parameters():
        p.zero_()
    for name, module in wide.named_modules():  # non-persistent buffers (rotary inv_freq) are garbage after to_empty
        if name.endswith("rotary_emb"):
            parent = wide.get_submodule(name.rsplit(".", 1)[0]) if "." in name else wide
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config).to(device))
    h, big_h = small.hidden_size, config.hidden_size
    d, big_d = _head_dim(small), _head_dim(config)
    norm_gain = math.sqrt(h / big_h)
    p, kv = head_maps(small, config)
    rows = rotary_rows(d, big_d)

    def put(target: torch.Tensor, index: tuple, values: torch.Tensor) -> None:
        target[index] = values.to(device=device, dtype=dtype)

    put(wide.model.embed_tokens.weight, (slice(None), slice(0, h)), model.model.embed_tokens.weight)
    if not config.tie_word_embeddings:
        put(wide.lm_head.weight, (slice(None), slice(0, h)), model.lm_head.weight)
    put(wide.model.norm.weight, (slice(0, h),), model.model.norm.weight.float() * norm_gain)
    for small_layer, layer in zip(model.model.layers, wide.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            put(getattr(layer, norm).weight, (slice(0, h),), getattr(small_layer, norm).weight.float() * norm_gain)
        attn, small_attn = layer.self_attn, small_layer.self_attn
        q = small_attn.q_proj.weight.float().view(-1, d, h) * math.sqrt(big_d / d)
        o = small_attn.o_proj.weight.float().view(h, -1, d)
        for j, target_head in enumerate(p):
            put(attn.q_proj.weight, (target_head * big_d + rows, slice(0, h)), q[j])
            put(attn.o_proj.weight, (slice(0, h), slice(target_head * big_d, target_head * big_d + d)), o[:, j])
        k = small_attn.k_proj.weight.float().view(-1, d, h)
        v = small_attn.v_proj.weight.float().view(-1, d, h)
        for t, source_head in enumerate(kv):
            put(attn.k_proj.weight, (t * big_d + rows, slice(0, h)), k[source_head])
            put(attn.v_proj.weight, (slice(t * big_d, t * big_d + d), slice(0, h)), v[source_head])
        i = small.intermediate_size
        for name in ("gate_proj", "up_proj"):
            put(getattr(layer.mlp, name).weight, (slice(0, i), slice(0, h)), getattr(small_layer.mlp, name).weight)
        put(layer.mlp.down_proj.weight, (slice(0, h), slice(0, i)), small_layer.mlp.down_proj.weight)
    return wide


def widest_error(small: nn.Module, wide: nn.Module, prompt: list[int]) -> float:
    """Largest |logit difference| of the two models on `prompt` (one forward each, no cache), over the largest
    |logit| of the small model: how closely the wide model carries the small one's function."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        a = small(input_ids=ids.to(next(small.parameters()).device)).logits.float().cpu()
        b = wide(input_ids=ids.to(next(wide.parameters()).device)).logits.float().cpu()
    return float((a - b).abs().max() / a.abs().max())
