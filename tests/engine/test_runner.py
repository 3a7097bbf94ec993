"""The sequential engine end to end: exact observations, GPTQ on four architectures, CPU and CUDA."""

import copy

import pytest
import torch
from conftest import build_tiny_llama
from tiny_models import build_tiny_gpt2, build_tiny_mixtral, last_hidden, load_bert, token_ids

from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq
from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.engine.algorithm import InputGroup, LayerSolution
from modelpress.engine.blocks import find_blocks
from modelpress.engine.runner import EngineSettings, run_sequential
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import find_linear_layers, is_linear
from modelpress.nn.quant_experts import QuantExperts
from modelpress.nn.quant_linear import QuantLinear


class RecordingIdentity:
    """Observes like GPTQ (sum of x^T x per group) and gives every layer its own weight back."""

    def __init__(self, sequential: bool) -> None:
        self.sequential = sequential
        self.sums: dict[str, torch.Tensor] = {}
        self.block = 0

    def describe(self) -> str:
        return "identity"

    def observe(self, group: InputGroup, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        key = f"{self.block}.{group.key}"
        self.sums[key] = self.sums.get(key, 0) + x.T @ x

    def solve(self, group: InputGroup) -> list[LayerSolution]:
        return [LayerSolution(t.weight.detach().clone()) for t in group.targets]

    def finish_block(self, block_index: int) -> None:
        self.block = block_index + 1


@pytest.mark.parametrize("sequential", [True, False])
def test_observed_inputs_are_exactly_each_layers_inputs(sequential):
    model = build_tiny_llama()
    ids = token_ids(320, 5, 32)
    # plain hooks on an untouched copy: what each linear layer really reads
    reference = copy.deepcopy(model)
    expected: dict[str, torch.Tensor] = {}
    stack = find_blocks(reference)
    handles = []
    for b, block in enumerate(stack.blocks):
        for name, module in find_linear_layers(reference, within=block).items():
            def hook(_m, args, key=f"{b}.{name}"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                expected[key] = expected.get(key, 0) + x.T @ x
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in ids.split(2):
            reference(input_ids=batch)
    algorithm = RecordingIdentity(sequential)
    report = run_sequential(model, algorithm, ids, settings=EngineSettings(batch_size=2))
    assert report.layers == 14 and report.unobserved == []
    assert set(algorithm.sums) == {"0.self_attn.q_proj", "0.self_attn.o_proj", "0.mlp.gate_proj", "0.mlp.down_proj",
                                   "1.self_attn.q_proj", "1.self_attn.o_proj", "1.mlp.gate_proj", "1.mlp.down_proj"}
    for key, value in algorithm.sums.items():
        assert torch.allclose(value, expected[key], rtol=1e-5, atol=1e-6), key
    # identity solutions leave the model as it was
    x = token_ids(320, 2, 32, seed=1)
    assert torch.allclose(last_hidden(model, x), last_hidden(reference, x), atol=1e-5)


def _output_error(model, reference, ids):
    return float((last_hidden(model, ids) - last_hidden(reference, ids)).pow(2).mean())


def _check_gptq_beats_rtn(build, vocab, scheme_spec, expected_layers):
    scheme = WeightScheme.parse(scheme_spec)
    reference = build()
    gptq, rtn = copy.deepcopy(reference), copy.deepcopy(reference)
    ids = token_ids(vocab, 8, 32)
    report = quantize_gptq(gptq, GPTQConfig(scheme), ids, batch_size=4)
    quantize_rtn(rtn, RTNConfig(scheme))
    assert report.layers == expected_layers
    assert not [n for n, m in find_linear_layers(gptq).items() if is_linear(m)]  # nothing left in float
    held_out = token_ids(vocab, 4, 32, seed=5)
    assert _output_error(gptq, reference, ids) < _output_error(rtn, reference, ids)
    assert _output_error(gptq, reference, held_out) < 1.2 * _output_error(rtn, reference, held_out)
    return gptq, report


def test_gptq_on_llama():
    model, report = _check_gptq_beats_rtn(build_tiny_llama, 320, "int3/g32", 14)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert report.rtn_outside_blocks == [] and report.run.unobserved == []


def test_gptq_on_gpt2_conv1d_layers():
    model, _ = _check_gptq_beats_rtn(build_tiny_gpt2, 256, "int3/g32", 8)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, QuantLinear) and (c_attn.out_features, c_attn.in_features) == (192, 64)


def test_gptq_on_a_bert_encoder_quantizes_the_pooler_with_rtn():
    _, report = _check_gptq_beats_rtn(load_bert, 1000, "int4/g32", 6 * 6 + 1)
    assert report.rtn_outside_blocks == ["pooler.dense"]
    assert report.run.block_path == "encoder.layer"


def test_gptq_on_mixture_of_experts_observes_every_expert_and_reports_idle_ones():
    reference = build_tiny_mixtral(experts=4, top_k=2)
    model = copy.deepcopy(reference)
    for m in (reference, model):  # route nothing to expert 3 of block 0 (expert 2 takes its tokens)
        def reroute(_module, _args, out):
            logits, scores, index = out
            return logits, scores, torch.where(index == 3, torch.full_like(index, 2), index)
        m.model.layers[0].mlp.gate.register_forward_hook(reroute)
    ids = token_ids(256, 8, 32)
    report = quantize_gptq(model, GPTQConfig(WeightScheme.parse("int4/g32")), ids, batch_size=4)
    idle = {"model.layers.0.mlp.experts.gate_up_proj.3", "model.layers.0.mlp.experts.down_proj.3"}
    assert set(report.run.unobserved) == idle
    assert set(report.rtn_fallbacks()) >= idle
    for name in idle:
        assert report.run.notes[name]["method"] == "rtn"
    busy = report.run.notes["model.layers.1.mlp.experts.down_proj.3"]
    assert busy["method"] == "gptq" and busy["calibration_rows"] > 0
    assert report.layers == 2 * (4 + 2 * 4)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, QuantExperts) and isinstance(experts.down_proj, QuantExperts)
    assert "gate_up_proj" not in dict(experts.named_parameters(recurse=False))
    error = _output_error(model, reference, ids)
    assert error < 0.05 * float(last_hidden(reference, ids).pow(2).mean())


def test_runs_unchanged_on_cuda(cuda):
    scheme = WeightScheme.parse("int4/g32")
    ids = token_ids(320, 6, 32)
    reference, on_cpu, on_gpu = build_tiny_llama(), build_tiny_llama(), build_tiny_llama()
    quantize_gptq(on_cpu, GPTQConfig(scheme), ids, device="cpu", batch_size=3)
    quantize_gptq(on_gpu, GPTQConfig(scheme), ids, device=cuda, batch_size=3)
    assert next(on_gpu.parameters()).device.type == "cpu"  # everything offloaded back
    assert isinstance(on_gpu.model.layers[1].mlp.down_proj, QuantLinear)
    x = token_ids(320, 2, 32, seed=3)
    float_out, cpu_out, gpu_out = (last_hidden(m, x) for m in (reference, on_cpu, on_gpu))
    cpu_error = (cpu_out - float_out).abs().mean()
    gpu_error = (gpu_out - float_out).abs().mean()
    # the same solution up to rounding-boundary codes that float summation order can flip
    assert abs(gpu_error - cpu_error) < 0.25 * cpu_error
    assert (gpu_out - cpu_out).abs().mean() < 0.5 * cpu_error
