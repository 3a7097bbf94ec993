"""How well calibration windows stand for the text a model will be used on.

A calibrated quantizer only knows the activations its calibration text produced: GPTQ weighs each input
channel by its second moment E[x_c^2] (the Hessian diagonal), AWQ scales channels by their mean |x|. When
the deployment text drives channels the calibration text leaves quiet, the quantizer spent its precision
elsewhere. Two measures, both against some evaluation windows:

- token coverage: the share of the evaluation text's tokens (occurrences) whose id appears anywhere in
  the calibration windows, and the number of distinct ids on each side;
- activation distance: for every linear layer inside the repeated blocks, the relative L1 distance
  sum_c |r_c - s_c| / sum_c s_c between the per-input-channel RMS sqrt(E[x_c^2]) under the calibration
  windows (r) and under the evaluation windows (s); 0 is the same profile, 1 is as far as the whole
  evaluation RMS mass. One number per block: the mean over its linear layers (q/k/v read one input and weigh it thrice,
  as GPTQ solves it three times).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelpress.engine.blocks import find_blocks
from modelpress.errors import ModelpressError
from modelpress.nn.layers import find_linear_layers


@dataclass(frozen=True)
class CalibrationDiagnostics:
    calibration_windows: int
    evaluation_windows: int
    calibration_distinct_tokens: int
    evaluation_distinct_tokens: int
    token_coverage: float                 # share of evaluation token occurrences seen in calibration
    block_distance: tuple[float, ...]     # per block, mean activation distance of its layers' inputs
    layer_distance: dict[str, float]      # per linear layer (full name)

    @property
    def mean_distance(self) -> float:
        return sum(self.block_distance) / max(len(self.block_distance), 1)

    def to_json(self) -> dict:
        return {"calibration_windows": self.calibration_windows, "evaluation_windows": self.evaluation_windows,
                "calibration_distinct_tokens": self.calibration_distinct_tokens,
                "evaluation_distinct_tokens": self.evaluation_distinct_tokens,
                "token_coverage": self.token_coverage, "mean_activation_distance": self.mean_distance,
                "block_activation_distance": list(self.block_distance),
                "layer_activation_distance": self.layer_distance}

    def lines(self) -> list[str]:
        blocks = " ".join(f"{d:.3f}" for d in self.block_distance)
        return [f"calibration token coverage of the evaluation text: {100 * self.token_coverage:.1f}% of its tokens "
                f"({self.calibration_distinct_tokens} distinct ids in {self.calibration_windows} calibration windows, "
                f"{self.evaluation_distinct_tokens} in {self.evaluation_windows} evaluation windows)",
                f"activation distance, calibration vs evaluation (relative L1 of per-channel RMS; mean "
                f"{self.mean_distance:.3f}), per block: {blocks}"]


def token_coverage(calibration: torch.Tensor, evaluation: torch.Tensor) -> float:
    """Share of the evaluation ids (every occurrence) that occur somewhere in the calibration ids."""
    seen = torch.isin(evaluation.reshape(-1), torch.unique(calibration))
    return float(seen.float().mean()) if seen.numel() else 0.0


def moment_distance(calibration: torch.Tensor, evaluation: torch.Tensor) -> float:
    """Relative L1 distance between per-channel RMS profiles, from second moments (K,) each."""
    r, s = calibration.clamp(min=0).sqrt(), evaluation.clamp(min=0).sqrt()
    return float((r - s).abs().sum() / s.sum().clamp(min=torch.finfo(s.dtype).tiny))


@torch.no_grad()
def input_second_moments(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """E[x_c^2] (K,) of the input of every linear layer inside the model's repeated blocks, over all token
    positions of `ids` (windows, seq_len). Layers that read the same tensor (q/k/v) report the same profile."""
    stack = find_blocks(model)
    layers = {f"{stack.block_name(i)}.{name}": module for i, block in enumerate(stack.blocks)
              for name, module in find_linear_layers(model, within=block).items()}
    sums: dict[str, torch.Tensor] = {}
    rows = [0]

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            total = sums.get(name)
            sums[name] = (x * x).sum(0) if total is None else total + (x * x).sum(0)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    device = next(model.parameters()).device
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            model(input_ids=batch)
            rows[0] += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(rows[0], 1) for name, total in sums.items()}


def diagnose_calibration(model: nn.Module, calibration: torch.Tensor, evaluation: torch.Tensor,
                         max_windows: int = 16, batch_size: int = 4) -> CalibrationDiagnostics:
    """Token coverage over all windows given; activation distance over at most `max_windows` of each
    (evenly spaced), on the float model as it is now."""
    if calibration.dim() != 2 or evaluation.dim() != 2 or not calibration.numel() or not evaluation.numel():
        raise ModelpressError(f"calibration diagnostics need (windows, seq_len) token ids on both sides, got "
                              f"{tuple(calibration.shape)} and {tuple(evaluation.shape)}")
    coverage = token_coverage(calibration, evaluation)
    calib = input_second_moments(model, _spread(calibration, max_windows), batch_size)
    evals = input_second_moments(model, _spread(evaluation, max_windows), batch_size)
    layer_distance = {name: moment_distance(calib[name], evals[name]) for name in calib}
    stack = find_blocks(model)
    blocks = []
    for i in range(len(stack)):
        prefix = f"{stack.block_name(i)}."
        own = [d for n, d in layer_distance.items() if n.startswith(prefix)]
        blocks.append(sum(own) / len(own) if own else 0.0)
    return CalibrationDiagnostics(int(calibration.shape[0]), int(evaluation.shape[0]),
                                  int(torch.unique(calibration).numel()), int(torch.unique(evaluation).numel()),
                                  coverage, tuple(blocks), layer_distance)


def _spread(ids: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` rows of ids, evenly spaced (all of them when there are fewer)."""
    if ids.shape[0] <= count:
        return ids
    return ids[torch.linspace(0, ids.shape[0] - 1, count).round().long()]
