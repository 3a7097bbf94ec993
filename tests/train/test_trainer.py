"""The shared training loop: schedule, example order, float32 master weights, fp16 loss scaling."""

import itertools

import pytest
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.train.trainer import NonFiniteLoss, TrainConfig, example_order, lr_at, train


def test_warmup_then_cosine_schedule():
    config = TrainConfig(steps=10, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, config) for s in range(10)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert lr_at(10, config) == pytest.approx(0.1)
    # with a CPU-time budget the decay follows whichever ends first, the steps or the budget
    assert lr_at(5, config, budget_used=1.0) == pytest.approx(0.1)
    assert lr_at(5, config, budget_used=0.0) == lr_at(5, config)


def test_example_order_walks_whole_shuffled_epochs():
    order = example_order(5, steps=4, per_step=3, seed=7).reshape(-1)
    assert sorted(order[:5].tolist()) == list(range(5))
    assert sorted(order[5:10].tolist()) == list(range(5))
    assert torch.equal(order, example_order(5, 4, 3, seed=7).reshape(-1))


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    model = nn.Linear(8, 1)
    return model, lambda idx: ((model(x[idx]) - y[idx]) ** 2).mean()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_reduces_the_loss_and_keeps_float32_masters(precision):
    model, loss_fn = _regression()
    result = train(loss_fn, model.parameters(), 32, TrainConfig(steps=60, lr=0.05, batch_size=8, precision=precision))
    assert result.steps == 60 and len(result.losses) == 60
    assert sum(result.losses[-5:]) < 0.2 * sum(result.losses[:5])
    assert model.weight.dtype == torch.float32
    assert result.cpu_seconds > 0


def test_gradient_accumulation_equals_one_big_batch():
    a, loss_a = _regression()
    b, loss_b = _regression()
    b.load_state_dict(a.state_dict())
    train(loss_a, a.parameters(), 32, TrainConfig(steps=3, lr=0.01, batch_size=8, grad_accumulation=4,
                                                 precision="fp32", max_grad_norm=None))
    train(loss_b, b.parameters(), 32, TrainConfig(steps=3, lr=0.01, batch_size=32, precision="fp32",
                                                 max_grad_norm=None))
    # same examples each step (a whole epoch), same mean gradient
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_fp16_loss_scaling_skips_an_overflowing_step_then_trains():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    x = torch.randn(8, 4)
    calls, snapshots = [], []

    def loss_fn(idx):
        calls.append(len(calls))
        out = layer(x[idx])
        assert out.dtype == torch.float16                      # autocast really computes in fp16
        big = 4.0e4 if len(calls) == 1 else 1e-3                # first step: scaled fp16 gradients overflow
        return (out.float() * big).sum()

    def snapshot():
        snapshots.append(layer.weight.detach().clone())
        return 0.0

    before = layer.weight.detach().clone()
    config = TrainConfig(steps=2, lr=0.01, batch_size=8, precision="fp16", eval_every=1)
    result = train(loss_fn, layer.parameters(), 8, config, eval_fn=snapshot)
    assert result.skipped_steps == 1
    assert torch.equal(snapshots[0], before)                    # the overflowing step changed nothing
    assert not torch.equal(snapshots[1], before)                # the next one, at a lower scale, trained
    assert torch.isfinite(snapshots[1]).all()


def test_low_precision_master_weights_are_refused():
    layer = nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(ModelpressError, match="float32 master weights"):
        train(lambda idx: layer.weight.float().sum(), layer.parameters(), 4, TrainConfig(steps=1))


def test_cpu_time_budget_stops_early():
    model, loss_fn = _regression()
    result = train(loss_fn, model.parameters(), 32, TrainConfig(steps=1000, lr=0.01, time_budget_s=0.0))
    assert result.steps == 1 and result.stopped_early


@pytest.mark.parametrize("field, value", [("steps", 0), ("precision", "fp8"), ("lr", -1.0), ("batch_size", 0)])
def test_bad_config_fails_clearly(field, value):
    with pytest.raises(ModelpressError):
        TrainConfig(**{field: value})


def test_auto_precision_on_the_cpu_computes_in_bf16_over_float32_masters():
    model, _ = _regression()
    seen = []

    def loss_fn(idx):
        out = model(torch.randn(len(idx), 8))
        seen.append(out.dtype)
        return out.float().pow(2).mean()

    train(loss_fn, model.parameters(), 8, TrainConfig(steps=2, batch_size=4, precision="auto"), device="cpu")
    assert seen == [torch.bfloat16, torch.bfloat16] and model.weight.dtype == torch.float32


# --- a NaN/Inf loss stops training before it reaches the weights ------------------------------------------

def _blows_up_at(steps: set[int], precision: str):
    """A regression whose loss is NaN on the given (0-based) steps, with a snapshot of the weights per step."""
    model, loss_fn = _regression()
    calls, snapshots = [], []

    def loss(idx):
        calls.append(1)
        value = loss_fn(idx)
        return value * float("nan") if len(calls) - 1 in steps else value

    def snapshot():
        snapshots.append(model.weight.detach().clone())
        return 0.0

    config = TrainConfig(steps=8, lr=0.05, batch_size=32, precision=precision, eval_every=1, max_nonfinite_steps=3)
    return model, lambda: train(loss, model.parameters(), 32, config, eval_fn=snapshot), snapshots


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_loss_without_a_scaler_stops_at_once_keeping_the_last_good_weights(precision):
    model, run, snapshots = _blows_up_at({2}, precision)
    with pytest.raises(NonFiniteLoss, match=r"nan at step 3; the weights are those after step 2") as caught:
        run()
    assert caught.value.good_steps == 2 and len(snapshots) == 2
    assert torch.equal(model.weight, snapshots[-1])


def test_fp16_skips_a_nan_loss_then_gives_up_after_consecutive_ones():
    _, run, _ = _blows_up_at({1}, "fp16")
    result = run()                                              # one NaN step: skipped, scale lowered, trains on
    assert result.steps == 8 and result.nonfinite_steps == 1 and result.skipped_steps >= 1
    model, run, snapshots = _blows_up_at({2, 3, 4, 5, 6, 7}, "fp16")
    with pytest.raises(NonFiniteLoss, match=r"step 5 on 3 consecutive steps") as caught:
        run()
    assert caught.value.good_steps <= 2 and f"after step {caught.value.good_steps}." in str(caught.value)
    assert torch.equal(model.weight, snapshots[1]) and torch.isfinite(model.weight).all()


def test_nan_gradient_without_a_scaler_stops_before_the_step():
    layer = nn.Linear(4, 1)
    before = layer.weight.detach().clone()

    def loss(idx):   # finite value, NaN gradient: sqrt at 0
        return (layer.weight * 0).abs().sqrt().sum() + layer.bias.sum()

    with pytest.raises(NonFiniteLoss, match="gradients became NaN/Inf at step 1"):
        train(loss, layer.parameters(), 4, TrainConfig(steps=2, precision="fp32", max_grad_norm=None))
    assert torch.equal(layer.weight, before)
