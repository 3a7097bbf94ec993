"""The engine on the architectures users bring, each from a tiny config (random weights, fixed seeds): RTN,
GPTQ, AWQ and SmoothQuant run; every layer an algorithm cannot treat its own way says why; KL against the
float model is finite and GPTQ's is no worse than RTN's; a saved model reloads to identical logits."""

import copy
import math

import pytest
import torch
from tiny_models import FAMILIES, METHODS, build_family, fallbacks, quantize_family, token_ids

from modelpress.algorithms.quantize.smoothing import EXPERT_REASON
from modelpress.eval.quality import evaluate_quality
from modelpress.io.model import LoadedModel
from modelpress.io.save import load_compressed, save_compressed
from modelpress.nn.layers import find_linear_layers
from modelpress.nn.quant_linear import QuantLinear
from modelpress.nn.w8a8_linear import W8A8Linear

CALIBRATION = token_ids(256, 8, 32, seed=0)
EVALUATION = token_ids(256, 4, 32, seed=1)

# where AWQ must find a producer to fold into (block-relative layer -> producer), by data flow alone
GQA = {"self_attn.o_proj": "self_attn.v_proj (each row feeds 2 input channels)"}   # 4 query heads, 2 value heads
EXPECTED_FOLDS = {
    "llama": {"mlp.down_proj": "mlp.up_proj", **GQA},
    "mistral": GQA, "qwen2": GQA, "qwen3": GQA, "qwen2_moe": GQA,   # (Mixtral: RTN scores best for o_proj)
    "gemma2": {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "pre_feedforward_layernorm", **GQA},  # 1 + w
    "gemma3": {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "pre_feedforward_layernorm", **GQA},
    "phi3": {"self_attn.qkv_proj": "input_layernorm", "mlp.down_proj": "mlp.gate_up_proj[96:192]",  # "up" half
             "self_attn.o_proj": "self_attn.qkv_proj[128:192]"},                                    # values
    "gpt2": {"attn.c_proj": "attn.c_attn[128:192]", "mlp.c_fc": "ln_2"},
    "opt": {"fc1": "final_layer_norm"},
}
MOE = ("mixtral", "qwen2_moe")


@pytest.fixture(scope="module")
def runs():
    """(family, method) -> (float model, quantized model, summary), computed once."""
    cache: dict = {}

    def get(family: str, method: str):
        if (family, method) not in cache:
            model = build_family(family)
            quantized = copy.deepcopy(model)
            cache[family, method] = (model, quantized, quantize_family(quantized, method, CALIBRATION))
        return cache[family, method]
    return get


def kl(reference, model) -> float:
    return evaluate_quality({"m": model}, EVALUATION, reference=reference, batch_size=4)["m"].kl_divergence


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_and_gptq_is_no_worse_than_rtn(family, runs):
    divergences = {}
    for method in METHODS:
        reference, quantized, _ = runs(family, method)
        divergences[method] = kl(reference, quantized)
        assert math.isfinite(divergences[method]) and divergences[method] > 0, (method, divergences)
    # random weights and 256 calibration tokens: end-to-end KL is noisy at this size (GPTQ keeps RTN per layer
    # where RTN scores better on the layer objective, but that does not bound the model's KL). Phi-3 with static
    # groups measured 1.06x RTN here, the permuted layout 0.91x; every other family 0.4-0.7x.
    assert divergences["gptq"] <= 1.1 * divergences["rtn"], divergences
    assert divergences["smoothquant"] < divergences["rtn"]       # int8 W8A8 against int4 weights


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_layer_is_replaced_and_every_fallback_says_why(family, runs):
    for method in METHODS:
        _, quantized, summary = runs(family, method)
        kind = W8A8Linear if method == "smoothquant" else QuantLinear
        assert not find_linear_layers(quantized), (method, list(find_linear_layers(quantized))[:3])
        assert any(isinstance(m, kind) for m in quantized.modules())
        assert all(reason for reason in fallbacks(method, summary).values()), (method, summary)
    awq = runs(family, "awq")[2]
    for layer, producer in EXPECTED_FOLDS.get(family, {}).items():
        for block in range(2):
            name = next(n for n in awq["producers"] if n.endswith(f".{block}.{layer}"))
            assert awq["producers"][name] == producer, (name, awq["producers"][name])


@pytest.mark.parametrize("family", MOE)
def test_expert_slices_say_what_happened_to_them(family, runs):
    awq = runs(family, "awq")[2]
    experts = {n: r for n, r in awq["unscaled_layers"].items() if ".experts." in n}
    assert experts and set(experts.values()) == {EXPERT_REASON}       # clip search only, said per slice
    sq_model, sq_summary = runs(family, "smoothquant")[1:]
    assert sq_summary["float_layers"] and all(".experts." in n for n in sq_summary["float_layers"])
    assert all(sq_model.get_parameter(n.rsplit(".", 1)[0]).dtype == torch.float32 for n in sq_summary["float_layers"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "smoothquant"])
def test_save_and_load_give_identical_logits(family, method, runs, tmp_path):
    _, quantized, _ = runs(family, method)
    save_compressed(LoadedModel(quantized, None, source=family, float_source=family), tmp_path / "out")
    back = load_compressed(tmp_path / "out").model
    with torch.no_grad():
        assert torch.equal(quantized(EVALUATION).logits, back(EVALUATION).logits)


# ---- export (issue 16 item 3): every family leaves modelpress, or is refused before anything is written -----

CT_REFUSED = {"gpt2": "Conv1D", "mixtral": "quant_experts", "qwen2_moe": "quant_experts"}
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def plain_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(EVALUATION).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_models_export_to_what_transformers_loads(family, runs, tmp_path):
    from modelpress.errors import ModelpressError
    from modelpress.export import ExportOptions, export_model

    _, quantized, _ = runs(family, "gptq")
    loaded = LoadedModel(quantized, None, source=family, float_source=family)
    with torch.no_grad():
        ours = quantized(EVALUATION).logits
    # hf: the dequantized weights in the plain architecture (GPT-2's Conv1D layout included)
    export_model(loaded, ["hf"], tmp_path / "hf", ExportOptions(hf_dtype="float32"))
    assert torch.allclose(plain_logits(tmp_path / "hf" / "hf"), ours, atol=1e-4)
    # compressed-tensors: bit for bit where transformers can hold the layers, else refused and nothing written
    if family in CT_REFUSED:
        with pytest.raises(ModelpressError, match=CT_REFUSED[family]):
            export_model(loaded, ["compressed-tensors"], tmp_path / "ct")
        assert not (tmp_path / "ct").exists()
    else:
        result = export_model(loaded, ["compressed-tensors"], tmp_path / "ct")[0]
        assert result.lossless
        assert torch.allclose(plain_logits(tmp_path / "ct" / "compressed-tensors"), ours, atol=1e-4)
    if family not in GGUF_ARCHS:   # GGUF: the four architectures it writes are tested in tests/export
        with pytest.raises(ModelpressError, match="does not know architecture"):
            export_model(loaded, ["gguf"], tmp_path / "gguf")
