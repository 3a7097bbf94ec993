"""The quality gate: does a compressed model reach the quality a recipe (or `--max-kl`) asks for, and if not,
which layers cost the most.

Attribution is measured, not estimated: for each compressed layer, the float model with only that layer
swapped for its compressed version is scored against the float model's cached distributions (the reference
of eval/reference.py, cut to its first `ATTRIBUTION_WINDOWS` windows of at most `ATTRIBUTION_TOKENS` tokens
so that a few hundred layers take a few hundred short forwards, not full evaluations). Layers whose shape
differs from the float model's (structurally pruned ones) cannot be swapped alone and are counted apart.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.eval.quality import QualityResult
from modelpress.eval.reference import ReferenceLogits, compute_reference, reference_perplexity, score_against
from modelpress.nn.layers import linear_weight, replace_module
from modelpress.nn.registry import compressed_module_kind
from modelpress.recipe.stages import Gate

ATTRIBUTION_WINDOWS = 2
ATTRIBUTION_TOKENS = 128


@dataclass
class GateResult:
    passed: bool
    kl_divergence: float
    perplexity_ratio: float
    top1_agreement: float
    missed: list[str]
    attribution: list[tuple[str, float]] = field(default_factory=list)   # (layer, KL with only it compressed)
    unattributed: list[str] = field(default_factory=list)                # compressed layers of another shape
    method: str = ""

    def to_json(self) -> dict:
        return {"passed": self.passed, "kl_divergence": self.kl_divergence, "perplexity_ratio": self.perplexity_ratio,
                "top1_agreement": self.top1_agreement, "missed": self.missed,
                "attribution": [{"layer": n, "kl_divergence": kl} for n, kl in self.attribution],
                "unattributed_layers": len(self.unattributed), "attribution_method": self.method}

    def describe(self) -> str:
        """What people read when the gate stops a run: what was missed and the layers that cost most."""
        lines = [f"quality gate missed: {'; '.join(self.missed)}"]
        if self.attribution:
            lines.append(f"layers contributing most KL ({self.method}):")
            width = max(len(name) for name, _ in self.attribution)
            lines += [f"  {name:<{width}}  KL {kl:.5f}" for name, kl in self.attribution]
        if self.unattributed:
            lines.append(f"  ({len(self.unattributed)} compressed layers differ in shape from the float model's and "
                         f"cannot be measured alone)")
        return "\n".join(lines)


def check_gate(gate: Gate, quality: QualityResult, reference_perplexity: float, original: nn.Module | None = None,
               compressed: nn.Module | None = None, reference: ReferenceLogits | None = None) -> GateResult:
    """The gate's verdict on `quality`; a miss with the models and the reference given also measures which
    layers contribute most to the KL."""
    ratio = quality.perplexity / reference_perplexity
    missed = gate.misses(quality.kl_divergence or 0.0, ratio, quality.top1_agreement or 0.0)
    result = GateResult(not missed, quality.kl_divergence or 0.0, ratio, quality.top1_agreement or 0.0, missed)
    if missed and gate.attribution_layers and original is not None and compressed is not None and reference is not None:
        probe = reference.prefix(min(ATTRIBUTION_WINDOWS, reference.windows.shape[0]),
                                 min(ATTRIBUTION_TOKENS, reference.windows.shape[1]))
        ranked, result.unattributed = layer_attribution(original, compressed, probe)
        result.attribution = ranked[: gate.attribution_layers]
        result.method = (f"measured: KL of the float model with only that layer compressed, on "
                         f"{probe.windows.shape[0]} "
                         f"windows of {probe.windows.shape[1]} tokens")
    return result


def gate_model(gate: Gate, original: nn.Module, compressed: nn.Module, windows: torch.Tensor) -> GateResult:
    """`compressed` scored against `original` (exact distributions) on token windows (W, T), and judged."""
    reference = compute_reference(original, windows)
    quality = score_against(compressed, reference)
    return check_gate(gate, quality, reference_perplexity(reference), original, compressed, reference)


@torch.no_grad()
def layer_attribution(original: nn.Module, compressed: nn.Module, reference: ReferenceLogits
                      ) -> tuple[list[tuple[str, float]], list[str]]:
    """(layer, KL) for every compressed layer swapped alone into a copy of `original`, largest first; and the
    compressed layers that could not be swapped (shape differs, or absent from the float model)."""
    probe = copy.deepcopy(original)
    floats = dict(probe.named_modules())
    measured, skipped = [], []
    for name, module in compressed.named_modules():
        base = floats.get(name)
        if not _changed(module, base):
            continue
        if base is None or _shape(module) != _shape(base):
            skipped.append(name)
            continue
        replace_module(probe, name, module)
        kl = score_against(probe, reference).kl_divergence
        replace_module(probe, name, base)
        measured.append((name, float(kl)))   # type: ignore[arg-type]
    return sorted(measured, key=lambda item: -item[1]), skipped


def _changed(module: nn.Module, base: nn.Module | None) -> bool:
    """A compressed layer, or a plain linear layer whose weight is no longer the float model's."""
    if compressed_module_kind(module) is not None:
        return True
    if not isinstance(module, nn.Linear) or not isinstance(base, nn.Linear):
        return False
    return module.weight.shape != base.weight.shape or not torch.equal(module.weight, base.weight)


def _shape(module: nn.Module) -> tuple[int, int] | None:
    out_features, in_features = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if out_features is not None and in_features is not None:
        return int(out_features), int(in_features)
    try:
        return tuple(linear_weight(module).shape)   # type: ignore[return-value]
    except AttributeError:
        return None
