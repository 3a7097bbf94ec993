"""Shared fixtures: tiny random models built from configs (fast), and the real default model (slow,
loaded once per session; the first load dequantizes the GGUF into the cache, ~20 s)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("MODELPRESS_QUIET", "1")
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    # Triton installed without a GPU: its interpreter for every test, set before any module imports triton (a kernel
    # test that sets it after another test's import runs jit'd language functions outside the interpreter's scope)
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """One PyTorch thread for the test (tiny models run fastest so, and do not fight other work); the session's
    setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


FAMILY_SHAPE = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def randomized(model):
    """Norm weights and biases away from their initial ones and zeros, so that a step that skipped one would show."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def build_family(family: str, **overrides):
    """A tiny model of `family` (llama, llama3-rope, mistral, qwen2, qwen3, qwen2-window, mistral-window, gemma2,
    gemma3) with norm weights and biases randomized."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    torch.manual_seed(0)
    if family == "llama":
        return randomized(LlamaForCausalLM(tiny_llama_config(**overrides)))
    if family == "llama3-rope":
        return randomized(LlamaForCausalLM(tiny_llama_config(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})))
    if family == "mistral":
        return randomized(MistralForCausalLM(MistralConfig(**{**FAMILY_SHAPE, "sliding_window": None, **overrides})))
    if family == "qwen2":   # biases on q, k and v
        return randomized(Qwen2ForCausalLM(Qwen2Config(**{**FAMILY_SHAPE, "use_sliding_window": False, **overrides})))
    if family == "qwen3":   # per-head RMSNorms on q and k
        return randomized(Qwen3ForCausalLM(Qwen3Config(**{**FAMILY_SHAPE, **overrides})))
    if family == "qwen2-window":   # the first layer full attention, the second a window of 8
        return randomized(Qwen2ForCausalLM(Qwen2Config(**{**FAMILY_SHAPE, "use_sliding_window": True, "sliding_window": 8,
                                                          "max_window_layers": 1, **overrides})))
    if family == "mistral-window":   # every layer attends to its last 8 positions
        return randomized(MistralForCausalLM(MistralConfig(**{**FAMILY_SHAPE, "sliding_window": 8, **overrides})))
    if family == "gemma2":   # norms of 1 + w before and after attention and MLP, GELU, soft-capped scores and logits,
        # every other layer a sliding window
        return randomized(Gemma2ForCausalLM(Gemma2Config(**{**FAMILY_SHAPE, "sliding_window": 8, "query_pre_attn_scalar": 24,
                                                            "attn_implementation": "eager", **overrides})))
    if family == "gemma3":   # Gemma 2's layer without soft-capping, q/k norms, a rope of its own for sliding layers
        return randomized(Gemma3ForCausalLM(Gemma3TextConfig(**{
            **FAMILY_SHAPE, "num_hidden_layers": 3, "sliding_window": 8, "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            "attn_implementation": "eager", **overrides})))
    raise ValueError(family)


class CharTokenizer:
    """A byte-level stand-in tokenizer for tiny models (ids < 256)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def save_pretrained(self, path):
        return None


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    import importlib.util

    from modelpress.io.model import DEFAULT_GGUF_PACKAGE, load_model

    if importlib.util.find_spec(DEFAULT_GGUF_PACKAGE) is None:   # the GPU machine has its own Python without it
        pytest.skip(f"the default model's package {DEFAULT_GGUF_PACKAGE} is not installed (scripts/setup.sh installs it)")
    return load_model(None)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


def char_tokenizer():
    """A real transformers tokenizer (character-level WordLevel) that saves and reloads like any other."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_llama(path, seed: int = 0, **overrides):
    model = build_tiny_llama(seed, **overrides)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_text(tmp_path):
    from modelpress.io.text import default_corpus

    path = tmp_path / "text.txt"
    path.write_text(default_corpus()[:60_000], encoding="utf-8")
    return path


def random_packed(spec: str, n: int, k: int, seed: int = 0, perm: bool = False):
    """A packed (N, K) weight of `spec` made like a real layer's: rows of different magnitudes and a few large
    weights; perm=True also gives it a GPTQ input order."""
    from modelpress.formats import WeightScheme, quantize_weight

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * torch.logspace(-2, 0, n)[:, None]
    weight[torch.rand(n, k, generator=generator) < 0.01] *= 8
    input_perm = torch.randperm(k, generator=generator) if perm else None
    return quantize_weight(weight, WeightScheme.parse(spec), input_perm=input_perm)


# the native CPU library's builds (nn/cpu_native.py), by the flags that make each; those this CPU cannot run are skipped
NATIVE_BUILDS = {
    "avx512-bf16": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
    "avx512": ("-mno-avx512bf16",),
    "avx2": ("-mno-avx512f",),
    "plain": ("-mno-avx512f", "-mno-avx2", "-mno-avx", "-mno-fma", "-mno-f16c"),
}


def cpu_flags() -> set[str]:
    from pathlib import Path

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


def native_build(name: str, directory):
    """The native library built as NATIVE_BUILDS[name] into `directory`, loaded (skips where this CPU cannot run it)."""
    import shutil

    from modelpress.nn import cpu_native

    needs = {"avx512-bf16": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
             "avx512": {"avx512f", "avx512bw", "avx512vl"}, "avx2": {"avx2", "fma", "f16c"}, "plain": set()}[name]
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: the native kernels are not built")
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run the {name} build")
    return cpu_native.load(cpu_native.build(NATIVE_BUILDS[name], directory=directory))
