import pytest
import torch
from conftest import build_tiny_llama

from modelpress.errors import ModelpressError
from modelpress.eval.calibration import (
    diagnose_calibration,
    input_second_moments,
    moment_distance,
    token_coverage,
)


def ids(low: int, high: int, rows: int = 4, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(low, high, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


def test_token_coverage_counts_occurrences():
    calibration = torch.tensor([[1, 2, 3]])
    evaluation = torch.tensor([[1, 1, 4, 5]])          # two of four occurrences were seen
    assert token_coverage(calibration, evaluation) == 0.5
    assert token_coverage(evaluation, evaluation) == 1.0


def test_moment_distance_is_relative_l1_of_rms():
    a, b = torch.tensor([4.0, 9.0]), torch.tensor([1.0, 9.0])      # RMS 2, 3 against 1, 3
    assert moment_distance(a, b) == pytest.approx(1 / 4)
    assert moment_distance(b, b) == 0.0


def test_second_moments_match_the_block_input_by_hand():
    model = build_tiny_llama()
    x = ids(3, 200)
    moments = input_second_moments(model, x, batch_size=3)
    layers = model.model.layers
    assert len(moments) == 7 * len(layers)
    with torch.no_grad():
        normed = layers[0].input_layernorm(model.model.embed_tokens(x)).reshape(-1, model.config.hidden_size)
    expected = (normed.float() ** 2).mean(0)
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(moments[f"model.layers.0.self_attn.{name}"], expected, rtol=1e-5, atol=1e-7)


def test_diagnostics_zero_on_the_same_text_and_grow_with_another():
    model = build_tiny_llama()
    text = ids(3, 100, seed=1)
    same = diagnose_calibration(model, text, text)
    assert same.token_coverage == 1.0 and same.mean_distance == 0.0
    other = diagnose_calibration(model, ids(100, 200, seed=2), text)
    assert other.token_coverage == 0.0
    assert len(other.block_distance) == len(model.model.layers) and other.mean_distance > 0.05
    assert set(other.to_json()) >= {"token_coverage", "block_activation_distance", "mean_activation_distance"}
    with pytest.raises(ModelpressError, match="token ids"):
        diagnose_calibration(model, torch.tensor([1, 2]), text)
