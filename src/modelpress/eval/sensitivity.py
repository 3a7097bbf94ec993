"""How much each linear layer, quantized alone under each candidate scheme, moves the model's output.

The quantity wanted is the KL divergence between the float model's next-token distribution and the
distribution with one layer perturbed (W -> W + ΔW). Near the float model its first-order term vanishes
and the second-order term is the Fisher quadratic form:

    KL(p_θ ‖ p_θ+Δ) ≈ ½ E_x E_{y~p_θ}[(∇_θ log p_θ(y|x) · Δ)²].

With the layer output Y = X Wᵀ, a weight change moves it by ΔY = X ΔWᵀ and the gradient with respect to
θ is carried by G = ∂ log p(y) / ∂Y. Keeping the diagonal over output elements (the usual approximation,
as in HAWQ-v2 and NVIDIA ModelOpt's auto-quantize) gives, per token t and output unit n,

    score(layer, scheme) = ½ · mean over tokens of Σ_n G²_tn · ΔY²_tn,    y sampled from the model itself,

in nats per token, comparable across layers and schemes. Cost: one forward and backward per batch of
calibration windows plus one extra matmul per layer and candidate, instead of a forward per layer and
candidate. Candidates are held packed (about a bit per weight of memory per bit of the format) and ΔW is
formed in the backward hook, so a ladder of many schemes fits beside a model that barely fits itself.
`measured_layer_kl` computes the real KL for chosen layers, to check the estimate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight, quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, replace_module
from modelpress.progress import progress


@dataclass(frozen=True)
class LayerCandidates:
    """Per layer: the packed weight each candidate scheme would store, and its stored bits."""

    name: str
    parameters: int
    packed: dict[str, PackedWeight]       # scheme spec -> the layer quantized under that scheme
    bits: dict[str, int]                  # scheme spec -> stored bits of the layer under that scheme

    def delta(self, spec: str, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in) of the candidate `spec` against the float weight."""
        return self.packed[spec].dequantize().to(weight.device) - weight.float()


def rtn_candidates(model: nn.Module, schemes: list[WeightScheme], skip=DEFAULT_SKIP) -> list[LayerCandidates]:
    """Every linear layer under every scheme by round-to-nearest, with its true stored bits."""
    out = []
    for name, module in find_linear_layers(model, skip).items():
        weight = linear_weight(module).detach().float()
        packed, bits = {}, {}
        for scheme in schemes:
            packed[scheme.spec] = quantize_weight(weight, scheme, name=f"layer {name}")
            bits[scheme.spec] = 8 * packed[scheme.spec].nbytes
        out.append(LayerCandidates(name, weight.numel(), packed, bits))
    return out


@torch.no_grad()
def _sample_targets(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = F.softmax(logits.float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def fisher_sensitivity(model: nn.Module, candidates: list[LayerCandidates], windows: torch.Tensor,
                       samples_per_window: int = 1, seed: int = 0, batch_size: int = 1,
                       positions: int | None = None) -> dict[str, dict[str, float]]:
    """score[layer][scheme] ≈ KL(float ‖ model with that layer quantized), nats per token. Windows (n, seq_len)
    go through the model `batch_size` at a time. With `positions`, ΔY is formed at that many random token
    positions per pass instead of all of them: the extra matmuls, which dominate the cost, shrink by
    seq_len / positions while every window still contributes its gradients (tokens of one window are
    strongly correlated, so few positions per window lose little)."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ModelpressError(f"sensitivity needs calibration windows (n, seq_len), got {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ModelpressError(f"sensitivity batch size must be positive, got {batch_size}")
    if positions is not None and positions <= 0:
        raise ModelpressError(f"sensitivity positions per window must be positive, got {positions}")
    modules = dict(model.named_modules())
    by_name = {c.name: c for c in candidates}
    scores = {c.name: {spec: 0.0 for spec in c.packed} for c in candidates}
    inputs: dict[str, torch.Tensor] = {}
    tokens = 0
    generator = torch.Generator().manual_seed(seed)
    scored = windows.shape[1] - 1                                     # the last position has no target
    picked = [torch.arange(scored)]                                   # positions of the current pass

    def keep_input(name):
        def hook(_module, args):
            inputs[name] = args[0].detach()[:, picked[0].to(args[0].device)]
        return hook

    def score_output(name):
        def hook(_module, _grad_in, grad_out):
            g = grad_out[0].detach()
            g2 = g[:, picked[0].to(g.device)].float().pow(2)          # (B, P, N)
            x = inputs.pop(name).float()                              # (B, P, K)
            weight = linear_weight(modules[name]).detach()
            for spec in by_name[name].packed:
                dy = x @ by_name[name].delta(spec, weight).t()        # (B, P, N)
                scores[name][spec] += 0.5 * float((g2 * dy.pow(2)).sum())
        return hook

    handles = []
    for c in candidates:
        handles.append(modules[c.name].register_forward_pre_hook(keep_input(c.name)))
        handles.append(modules[c.name].register_full_backward_hook(score_output(c.name)))
    was_training = model.training
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        device = next(model.parameters()).device
        batches = windows.split(batch_size)
        for ids in progress(batches, desc="sensitivity", total=len(batches)):
            ids = ids.to(device)
            for _ in range(samples_per_window):
                if positions is not None and positions < scored:
                    picked[0] = torch.randperm(scored, generator=generator)[:positions].sort().values
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
                targets = _sample_targets(logits.detach().cpu(), generator).to(device)
                logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).sum()
                logp.backward()
                tokens += ids.shape[0] * len(picked[0])
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: {spec: value / tokens for spec, value in per.items()} for name, per in scores.items()}


@torch.no_grad()
def measured_layer_kl(model: nn.Module, layer: str, scheme: WeightScheme, windows: torch.Tensor) -> float:
    """The real KL (nats/token) when only `layer` is quantized with RTN under `scheme`: a check on the estimate."""
    from modelpress.algorithms.quantize.rtn import quantize_layer

    perturbed = copy.deepcopy(model)
    replace_module(perturbed, layer, quantize_layer(perturbed.get_submodule(layer), scheme, name=layer))
    total, count = 0.0, 0
    for window in windows:
        ids = window.unsqueeze(0)
        ref = F.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), -1)
        got = F.log_softmax(perturbed(ids, use_cache=False).logits[:, :-1].float(), -1)
        total += float((ref.exp() * (ref - got)).sum())
        count += ids.shape[1] - 1
    return total / count
