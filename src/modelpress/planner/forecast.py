"""What a planned run will cost, said before it runs: bytes (exact), KL (estimated), seconds and peak memory.

- bytes: the float model's weight bytes, minus the float weights of the planned layers, plus each layer's
  packed bytes under its scheme, counted from the very PackedWeight the method stores (RTN and GPTQ with
  static groups store the same tensors): equal to `measure_size` of the result, byte for byte.
- KL: measured, not summed: the Fisher scores (eval/sensitivity.py) choose the mix, then the float model and
  the model with the chosen RTN candidates swapped in (already packed in memory) are run on the sensitivity
  windows. The sum of Fisher scores alone came out at half the real KL on SmolLM2 (mixed 4.5 b/w: 0.073
  estimated, 0.140 measured), too far for a forecast. For a calibrated method (GPTQ) the RTN mix's KL is an
  upper bound.
- seconds: RTN's time is measured while the candidates are packed (each scheme over every layer), shared
  out by layer size. GPTQ's is two forward passes of the calibration windows per block (one to observe,
  one to produce the next block's inputs: timed on one batch) plus one solve per layer (timed once per
  distinct layer shape and scheme on this machine).
- peak memory (resident set, as the kernel counts it): the process as it is now (model loaded in float), its
  memory-mapped weight files counted whole — a safetensors file is mapped lazily and only the pages read so far
  are resident, but quantizing reads every weight (on the default model RSS grew 462 -> 953 MB during RTN,
  almost all of it the mapped float weights paging in) — plus the packed layers (the float ones are
  released only when the run returns) plus the largest layer's quantization temporaries (about three float
  copies of its weight); for GPTQ also the block inputs and outputs of the calibration windows and the
  Hessians of the largest block's layers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from modelpress.nn.layers import linear_weight

TEMPORARY_COPIES = 3          # float copies of a layer's weight alive while it is quantized


@dataclass(frozen=True)
class Forecast:
    weight_bytes: int                 # exact: every weight tensor of the result
    bits_per_weight: float            # over the quantized layers, scales included
    kl_divergence: float              # estimated, nats per token
    kl_basis: str                     # how the KL was estimated
    seconds: float                    # the quantization itself (not loading or saving)
    peak_memory_bytes: int            # resident memory of the process at its peak

    def to_json(self) -> dict:
        return asdict(self)


def resident_bytes() -> int:
    """The process's resident memory once every mapped weight file is read: anonymous memory now plus the
    whole of each mapped *.safetensors file (Linux /proc; elsewhere the peak so far)."""
    try:
        import os

        with open("/proc/self/statm") as handle:
            fields = handle.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        return (int(fields[1]) - int(fields[2])) * page + mapped_weight_file_bytes()
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mapped_weight_file_bytes() -> int:
    """Bytes of the process's file mappings of weight files (*.safetensors, *.gguf), each region once."""
    regions = set()
    with open("/proc/self/maps") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith((".safetensors", ".gguf")):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                regions.add((start, end))
    return sum(end - start for start, end in regions)


def float_weight_bytes(module: nn.Module) -> int:
    weight = linear_weight(module)
    return weight.numel() * weight.element_size()


def rtn_seconds(layer_params: dict[str, int], chosen: dict[str, str], seconds_per_scheme: dict[str, float]) -> float:
    """Each scheme's measured time over all layers, shared out by layer size, summed over the chosen layers."""
    total = sum(layer_params.values())
    return sum(seconds_per_scheme[spec] * layer_params[name] / total for name, spec in chosen.items())


def forward_seconds(model: nn.Module, windows: torch.Tensor) -> float:
    """Seconds per window of one plain forward pass (a batch of `windows`)."""
    start = time.perf_counter()
    with torch.no_grad():
        model(windows, use_cache=False)
    return (time.perf_counter() - start) / windows.shape[0]


def gptq_seconds(modules: dict[str, nn.Module], chosen: dict[str, str], samples: int, per_window: float,
                 config_of) -> float:
    """Two forward passes of `samples` windows plus one timed solve per distinct (shape, scheme)."""
    from modelpress.algorithms.quantize.gptq import gptq_solve

    timed: dict[tuple, float] = {}
    total = 2 * samples * per_window
    for name, spec in chosen.items():
        weight = linear_weight(modules[name]).detach().float()
        key = (tuple(weight.shape), spec)
        if key not in timed:
            config = config_of(spec)
            hessian = torch.eye(weight.shape[1]) + 0.01
            start = time.perf_counter()
            gptq_solve(weight, hessian, config.scheme, damp=config.damp, block_size=config.block_size,
                       act_order=config.act_order, shrink_steps=config.shrink_steps, static_groups=True)
            timed[key] = time.perf_counter() - start
        total += timed[key]
    return total


def peak_bytes(now: int, packed_bytes: int, largest_layer_bytes: int, calibrated: tuple[int, int, int] | None,
               largest_block_hessian_bytes: int = 0) -> int:
    """`calibrated`: (samples, seq_len, hidden) of the calibration windows for GPTQ, None for RTN."""
    peak = now + packed_bytes + TEMPORARY_COPIES * largest_layer_bytes
    if calibrated is not None:
        samples, seq_len, hidden = calibrated
        peak += 2 * samples * seq_len * hidden * 4 + largest_block_hessian_bytes
    return peak


def linear_in(module: nn.Module) -> int:
    return linear_weight(module).shape[1]
