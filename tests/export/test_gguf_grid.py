"""GPTQ solved on GGUF's own grids (GPTQConfig(grid="gguf")): the GGUF export holds the result bit for bit —
k-quant super-blocks where rows are whole 256-blocks, legacy 32-blocks elsewhere — and GPTQ's error
compensation beats rounding to nearest on that same grid."""

from __future__ import annotations

import copy

import pytest
import torch

import modelpress
from modelpress.algorithms.quantize import AWQConfig, GPTQConfig
from modelpress.algorithms.quantize.gguf_grid import gguf_grid, gguf_scheme
from modelpress.errors import ModelpressError
from modelpress.export import ExportOptions, export_model
from modelpress.export.gguf import GGUF_FILE
from modelpress.export.gguf_arch import permute_rows
from modelpress.export.kquants import kquant_codes, kquant_grid
from modelpress.formats.scheme import WeightScheme
from modelpress.io.model import LoadedModel
from tests.export.test_gguf import bpe_tokenizer, gguf_weights  # noqa: F401  (fixture)


def tiny_llama(tokenizer, hidden: int, inner: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inner,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=True,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    for param in model.parameters():   # heavier-tailed than init's, so groups differ and GPTQ has work to do
        if param.dim() == 2:
            param.data = param.data * (1 + 3 * torch.rand_like(param.data) ** 4)
    return LoadedModel(model, tokenizer, source="tiny-llama", float_source="tiny-llama")


def calibration(tokenizer, samples: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (samples, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec, kquant, legacy", [("int4-asym/g32", "Q4_K", "Q4_1"), ("int5-asym/g32", "Q5_K", "Q5_1")])
def test_gptq_on_the_gguf_grid_exports_bit_for_bit(bpe_tokenizer, tmp_path, spec, kquant, legacy):
    # hidden 288: q/k/v/o/gate/up rows are not whole 256-blocks (legacy 32-blocks); down_proj's 512 are
    loaded = tiny_llama(bpe_tokenizer, hidden=288, inner=512)
    report = modelpress.quantize(loaded, GPTQConfig(spec, grid="gguf"), calibration=calibration(bpe_tokenizer))
    assert report.layers == 14
    result = export_model(loaded, ["gguf"], tmp_path / "out", ExportOptions(gguf_float_type="F32"))[0]
    types = {layer.name.rsplit(".", 1)[-1]: layer.target for layer in result.layers if layer.name.endswith("proj")}
    assert result.lossless, [(x.name, x.reason) for x in result.layers if not x.lossless]
    assert types["down_proj"] == kquant and types["q_proj"] == legacy and types["up_proj"] == legacy
    weights = gguf_weights(tmp_path / "out" / "gguf" / GGUF_FILE)
    for i, block in enumerate(loaded.model.model.layers):
        q = block.self_attn.q_proj.dequantized_weight()
        assert torch.equal(weights[f"blk.{i}.attn_q.weight"], q[permute_rows(q.shape[0], 4)])
        assert torch.equal(weights[f"blk.{i}.ffn_down.weight"], block.mlp.down_proj.dequantized_weight())
        assert torch.equal(weights[f"blk.{i}.ffn_up.weight"], block.mlp.up_proj.dequantized_weight())


def test_gptq_beats_round_to_nearest_on_the_same_kquant_grid():
    """On one layer: GPTQ's sweep over the Q4_K grid (imatrix importance) lowers the layer objective
    ||(W - Q) X||² below rounding every weight to its nearest level of that grid (llama-quantize with imatrix)."""
    torch.manual_seed(0)
    n, k = 64, 512
    x = torch.randn(2048, k) * torch.linspace(0.2, 3.0, k)            # uneven channel energies
    x[:, : k // 2] += 0.8 * x[:, k // 2:]                              # and correlated channels
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(n, k)
    scheme = gguf_scheme(WeightScheme.parse("int4-asym/g32"))
    assert scheme.scale_dtype == "float32"

    def objective(q: torch.Tensor) -> float:
        d = weight - q
        return float(torch.einsum("nk,kl,nl->", d, hessian, d))

    from modelpress.algorithms.quantize.gptq import gptq_solve

    grid_of = lambda w: gguf_grid(w, hessian, scheme)  # noqa: E731
    solution = gptq_solve(weight, hessian, scheme, grid=grid_of)
    grid = kquant_grid(weight, "Q4_K", torch.diag(hessian))
    assert torch.equal(solution.scale, grid.scale) and torch.equal(solution.offset, grid.offset)
    nearest = grid.scale.repeat_interleave(32, 1) * kquant_codes(weight, grid).float() + \
        grid.offset.repeat_interleave(32, 1)
    assert objective(solution.quantized) < 0.75 * objective(nearest)   # measured 0.62


def test_gguf_grid_asks_for_float32_scales_and_gptq_solvers():
    assert GPTQConfig("int4-asym/g32", grid="gguf").scheme.spec == "int4-asym/g32/float32"
    assert GPTQConfig("int4/g32", grid="gguf").scheme.spec == "int4/g32"   # Q4_0 blocks hold float16 scales
    assert AWQConfig("int6/g16", solver="gptq", grid="gguf").scheme.scale_dtype == "float32"
    with pytest.raises(ModelpressError, match="unknown GPTQ grid 'ggml'"):
        GPTQConfig("int4/g32", grid="ggml")
    with pytest.raises(ModelpressError, match="solver='gptq'"):
        AWQConfig("int4-asym/g32", grid="gguf")
    with pytest.raises(ModelpressError, match="static_groups"):
        GPTQConfig("int4-asym/g32", grid="gguf", static_groups=False)


def test_quantize_command_takes_the_gguf_grid(bpe_tokenizer, tmp_path):
    from modelpress.commands.quantize import run  # noqa: F401  (the option is wired)
    from modelpress.cli import main

    assert main(["quantize", "default", "--method", "rtn", "--format", "int4", "--grid", "gguf",
                 "--out", str(tmp_path / "x")]) == 2    # rtn has no grid: a clear error, nothing written
    assert not (tmp_path / "x").exists()
