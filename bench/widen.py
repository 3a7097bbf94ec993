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
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from modelpress.algorithms.prune.structured import head_dim_of
from modelpress.formats.packed import expand_groups, quantize_weight
from modelpress.nn.quant_linear import QuantLinear

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
    d, big_d = head_dim_of(small), head_dim_of(large)
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


@dataclass(frozen=True)
class Placement:
    """Where a small projection's (N, K) weight goes in the large one's: small row small_rows[r] to large row
    large_rows[r] (a small row may go to several), small column c to large column cols[c], times factor."""

    small_rows: torch.Tensor
    large_rows: torch.Tensor
    cols: torch.Tensor
    factor: float = 1.0

    def place(self, small: torch.Tensor, shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        """`small` (N, K) placed in zeros of `shape`, float32, on `device` (default: small's)."""
        device = device or small.device
        out = torch.zeros(shape, device=device)
        rows, cols = self.large_rows.to(device), self.cols.to(device)
        out[rows[:, None], cols[None, :]] = small.to(device).float()[self.small_rows.to(device)] * self.factor
        return out


def placements(small: LlamaConfig, large: LlamaConfig) -> dict[str, Placement]:
    """The Placement of each projection of a decoder layer (the same in every layer), by its name in the layer."""
    h, i = small.hidden_size, small.intermediate_size
    d, big_d = head_dim_of(small), head_dim_of(large)
    p, kv = head_maps(small, large)
    rotary = rotary_rows(d, big_d)
    dims = torch.arange(d)

    def heads(sources: list[int], targets: list[int], within: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([j * d + dims for j in sources]), torch.cat([t * big_d + within for t in targets]))

    hidden, inner = torch.arange(h), torch.arange(i)
    q_rows = heads(list(range(len(p))), p, rotary)
    return {
        "self_attn.q_proj": Placement(*q_rows, hidden, math.sqrt(big_d / d)),
        "self_attn.k_proj": Placement(*heads(kv, list(range(len(kv))), rotary), hidden),
        "self_attn.v_proj": Placement(*heads(kv, list(range(len(kv))), dims), hidden),
        "self_attn.o_proj": Placement(hidden, hidden, heads(list(range(len(p))), p, dims)[1]),
        "mlp.gate_proj": Placement(inner, inner, hidden),
        "mlp.up_proj": Placement(inner, inner, hidden),
        "mlp.down_proj": Placement(hidden, hidden, inner),
    }


@torch.no_grad()
def widen(model: LlamaForCausalLM, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
          **shape) -> LlamaForCausalLM:
    """A LlamaForCausalLM of the large `shape` computing `model`'s logits (module docstring), built on `device`
    in `dtype` (default: the small model's). The small model is not changed. Its quantized layers (QuantLinear)
    become quantized layers of the large model on the same grid: their codes placed as the weights are (every other
    code zero's), so the large model computes the small quantized model's function too."""
    small = model.config
    config = widened_config(small, **shape)
    source = next(model.parameters())
    device = torch.device(device or source.device)
    dtype = dtype or (source.dtype if source.is_floating_point() else torch.float32)
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
    h = small.hidden_size
    norm_gain = math.sqrt(h / config.hidden_size)

    def put(target: torch.Tensor, index: tuple, values: torch.Tensor) -> None:
        target[index] = values.to(device=device, dtype=dtype)

    put(wide.model.embed_tokens.weight, (slice(None), slice(0, h)), _float_weight(model.model.embed_tokens))
    if not config.tie_word_embeddings:
        put(wide.lm_head.weight, (slice(None), slice(0, h)), _float_weight(model.lm_head))
    put(wide.model.norm.weight, (slice(0, h),), model.model.norm.weight.float() * norm_gain)
    maps = placements(small, config)
    for small_layer, layer in zip(model.model.layers, wide.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            put(getattr(layer, norm).weight, (slice(0, h),), getattr(small_layer, norm).weight.float() * norm_gain)
        for name, placement in maps.items():
            parent_name, child = name.rsplit(".", 1)
            small_proj, target = small_layer.get_submodule(name), layer.get_submodule(name)
            if isinstance(small_proj, QuantLinear):
                setattr(layer.get_submodule(parent_name), child,
                        _widen_quantized(small_proj, placement, tuple(target.weight.shape), device, dtype))
            else:
                target.weight.copy_(placement.place(small_proj.weight, tuple(target.weight.shape), device))
    return wide


def _float_weight(module: nn.Module) -> torch.Tensor:
    return module.dequantized_weight().float() if hasattr(module, "dequantized_weight") else module.weight.float()


def _widen_quantized(small: QuantLinear, placement: Placement, shape: tuple[int, int], device: torch.device,
                     dtype: torch.dtype) -> QuantLinear:
    """The large projection of a quantized small one, on its grid: the weight and the per-element scales (and
    offsets) placed alike, each large group's scale the one its placed elements share (1 where it has none), then
    quantize_weight with those scales, which gives back the small layer's codes where they were placed."""
    packed = small.packed
    scheme = packed.scheme
    if packed.input_perm is not None or packed.scale_scale is not None or scheme.granularity == "tensor":
        raise ValueError(f"widen: {scheme} with a column order or double-quantized scales is not mapped")
    n, k = packed.shape
    g, big_g = scheme.group_length(k), scheme.group_length(shape[1])
    weight = placement.place(packed.dequantize(), shape, device)
    placed = placement.place(torch.ones(n, k), shape, device) > 0
    per_group = {"scale": packed.group_scales()}
    if packed.offset is not None:
        per_group["offset"] = packed.offset.float()
    grids = {}
    for name, values in per_group.items():
        grid = placement.place(expand_groups(values, n, k, g), shape, device).view(shape[0], -1, big_g)
        mask = placed.view(shape[0], -1, big_g)
        first = torch.where(mask.any(-1), grid.masked_fill(~mask, float("-inf")).amax(-1), 0.0 if name == "offset"
                            else 1.0)
        if not torch.equal(grid[mask], first.unsqueeze(-1).expand_as(grid)[mask]):
            raise ValueError(f"widen: the small groups of {scheme} do not map into whole groups of the large layer")
        grids[name] = first
    large = quantize_weight(weight, scheme, scale=grids["scale"], offset=grids.get("offset"))
    return QuantLinear(large).to(device)  # scales stay in the scheme's dtype, as quantizing a bf16 model leaves them


def widest_error(small: nn.Module, wide: nn.Module, prompt: list[int]) -> float:
    """Largest |logit difference| of the two models on `prompt` (one forward each, no cache), over the largest
    |logit| of the small model: how closely the wide model carries the small one's function."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        a = small(input_ids=ids.to(next(small.parameters()).device)).logits.float().cpu()
        b = wide(input_ids=ids.to(next(wide.parameters()).device)).logits.float().cpu()
    return float((a - b).abs().max() / a.abs().max())
