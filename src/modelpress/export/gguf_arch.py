"""What llama.cpp needs to know about an architecture, as data: one row per Hugging Face `model_type`.

`permute_qk`: llama.cpp's `llama` graph applies RoPE to adjacent pairs (x0, x1), (x2, x3), ... of each head,
while Hugging Face's Llama rotates the two halves of a head (x_i, x_{i+d/2}). The same model in llama.cpp
therefore needs q_proj/k_proj rows reordered within each head: row h·d + 2i + j comes from row h·d + j·d/2 + i
(j in {0, 1}). Architectures that llama.cpp runs with NEOX-style RoPE (Qwen2, Qwen3) take rows as they are.
A row permutation moves whole rows, so it never touches a block's codes or scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

from modelpress.errors import ModelpressError


@dataclass(frozen=True)
class GGUFArch:
    arch: MODEL_ARCH
    permute_qk: bool

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch(MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GGUFArch(MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": GGUFArch(MODEL_ARCH.QWEN2, permute_qk=False),
    "qwen3": GGUFArch(MODEL_ARCH.QWEN3, permute_qk=False),
}


def arch_for(config) -> GGUFArch:
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelpressError(f"GGUF export does not know architecture {model_type!r} yet; it writes "
                              f"{', '.join(sorted(ARCHITECTURES))}") from None


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def check_supported(config) -> None:
    """Refuse settings the written keys cannot express, rather than writing a model that runs differently."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        raise ModelpressError(f"GGUF export does not write RoPE scaling of type {rope_type!r} yet")


def hyperparameters(config, arch: GGUFArch) -> list[tuple[str, object]]:
    """(writer method, value) pairs for the architecture's keys, read from the HF config."""
    check_supported(config)
    dim = head_dim(config)
    pairs: list[tuple[str, object]] = [
        ("add_context_length", int(config.max_position_embeddings)),
        ("add_embedding_length", int(config.hidden_size)),
        ("add_block_count", int(config.num_hidden_layers)),
        ("add_feed_forward_length", int(config.intermediate_size)),
        ("add_head_count", int(config.num_attention_heads)),
        ("add_head_count_kv", int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)),
        ("add_layer_norm_rms_eps", float(config.rms_norm_eps)),
        ("add_rope_freq_base", rope_theta(config)),
        ("add_rope_dimension_count", dim),
        ("add_vocab_size", int(config.vocab_size)),
    ]
    if dim != config.hidden_size // config.num_attention_heads:
        pairs += [("add_key_length", dim), ("add_value_length", dim)]
    return pairs


def permute_rows(rows: torch.Tensor | object, n_heads: int) -> torch.Tensor:
    """Row order for q_proj/k_proj (see the module docstring): index r of the result is source row order[r]."""
    total = int(rows) if not isinstance(rows, torch.Tensor) else rows.shape[0]
    dim = total // n_heads
    index = torch.arange(total).reshape(n_heads, 2, dim // 2)   # (head, half, i): HF row h·d + j·d/2 + i
    return index.transpose(1, 2).reshape(total)                 # (head, i, half): llama.cpp row h·d + 2i + j
