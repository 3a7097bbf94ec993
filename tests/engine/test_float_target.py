"""GPTQ fitted to the float model's outputs (GPTQConfig.float_target): the moved target is the least-squares
weight, and the engine pairs every observation with the very input the same call read in the float model."""

import copy

import torch
from conftest import build_tiny_llama
from tiny_models import token_ids

from modelpress.algorithms.quantize.gptq import GPTQ, GPTQConfig, float_target_weights
from modelpress.engine.runner import EngineSettings, run_sequential

SETTINGS = EngineSettings(batch_size=2)


def test_the_moved_target_is_the_least_squares_fit_of_the_float_outputs_on_the_quantized_inputs():
    generator = torch.Generator().manual_seed(0)
    n, k, rows = 12, 24, 400
    floats = torch.randn(rows, k, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, k)
    drifted = floats + 0.3 * torch.randn(rows, k, generator=generator, dtype=torch.float64)   # X~
    weights = [torch.randn(n, k, generator=generator, dtype=torch.float64), torch.randn(5, k, dtype=torch.float64)]
    hessian = drifted.t() @ drifted / rows
    drift = (floats - drifted).t() @ drifted / rows
    moved = float_target_weights(weights, hessian, drift, damp=0.0)
    for w, got in zip(weights, moved):
        expected = torch.linalg.lstsq(drifted, floats @ w.t()).solution.t()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        # so ||Q X~ - W X||^2 = ||(Q - W*) X~||^2 + the part no Q on X~ can reach, for any Q
        q = w + 0.5 * torch.randn(w.shape, generator=generator, dtype=torch.float64)
        whole = ((drifted @ q.t() - floats @ w.t()) ** 2).sum()
        split = ((drifted @ (q - got).t()) ** 2).sum() + ((drifted @ got.t() - floats @ w.t()) ** 2).sum()
        torch.testing.assert_close(whole, split, rtol=1e-10, atol=0)
    # no drift: the target is the weight; dampening pulls the target back towards the weight
    same = float_target_weights(weights, hessian, torch.zeros_like(drift), damp=0.1)
    assert all(torch.equal(a, b) for a, b in zip(same, weights))
    damped = float_target_weights(weights, hessian, drift, damp=0.5)
    assert (damped[0] - weights[0]).norm() < (moved[0] - weights[0]).norm()


class RecordingGPTQ(GPTQ):
    """GPTQ that keeps every (block, layer, inputs, float reference) it is shown."""

    def __init__(self, config):
        super().__init__(config)
        self.block, self.seen = 0, []

    def observe(self, group, inputs, reference=None):
        self.seen.append((self.block, group.key, inputs.clone(), None if reference is None else reference.clone()))
        super().observe(group, inputs, reference)

    def finish_block(self, block_index):
        super().finish_block(block_index)
        self.block = block_index + 1


def float_inputs(model, ids, batch_size):
    """(block, layer) -> the inputs each group leader reads in the float model, batch by batch."""
    found: dict[tuple[int, str], list[torch.Tensor]] = {}
    leaders = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    handles = []
    for index, block in enumerate(model.model.layers):
        for name in leaders:
            module = block.get_submodule(name)
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, key=(index, name): found.setdefault(key, []).append(args[0].clone())))
    with torch.no_grad():
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return found


def test_every_observation_is_paired_with_the_same_calls_input_in_the_float_model():
    ids = token_ids(320, 4, 16)
    model = build_tiny_llama(num_hidden_layers=3)
    expected = float_inputs(copy.deepcopy(model), ids, SETTINGS.batch_size)
    algorithm = RecordingGPTQ(GPTQConfig("int3/g32", float_target=True))       # solved level by level
    report = run_sequential(model, algorithm, ids, settings=SETTINGS)
    counts: dict[tuple[int, str], int] = {}
    for block, key, inputs, reference in algorithm.seen:
        batch = counts.get((block, key), 0)
        counts[(block, key)] = batch + 1
        torch.testing.assert_close(reference, expected[(block, key)][batch], rtol=1e-5, atol=1e-6)
        drifted = not torch.equal(inputs, reference)
        # block 0's q/k/v read the embedding in both models; after any quantized layer the inputs drift
        assert drifted == (block > 0 or key != "self_attn.q_proj"), (block, key)
    assert counts == {key: 2 for key in expected}
    shifts = {name: notes["float_target_shift"] for name, notes in report.notes.items()
              if notes["method"] == "gptq"}
    assert shifts["model.layers.0.self_attn.q_proj"] == 0
    assert shifts["model.layers.2.mlp.down_proj"] > 0


def test_the_float_target_is_solved_level_by_level():
    """Observed all at once, later levels would make up again for the drift earlier levels already removed."""
    assert GPTQ(GPTQConfig("int4")).sequential            # float_target is the default
    assert not GPTQ(GPTQConfig("int4", float_target=False)).sequential


def test_fitting_the_float_outputs_lowers_the_quantized_models_error_on_its_calibration_text():
    ids = token_ids(320, 8, 32)
    reference = build_tiny_llama(num_hidden_layers=3)
    with torch.no_grad():
        target = reference(input_ids=ids, use_cache=False).logits
    errors = {}
    for float_target in (False, True):
        model = copy.deepcopy(reference)
        run_sequential(model, GPTQ(GPTQConfig("int3/g32", float_target=float_target)), ids, settings=SETTINGS)
        with torch.no_grad():
            errors[float_target] = float(((model(input_ids=ids, use_cache=False).logits - target) ** 2).mean())
    assert errors[True] < 0.9 * errors[False], errors
