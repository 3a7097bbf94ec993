"""LoRA (Hu et al. 2022) and QLoRA-style recovery (Dettmers et al. 2023): low-rank adapters trained on
top of a frozen base, the base being a packed QuantLinear or a float linear layer.

    y = base(x) + (α / r) · B (A dropout(x))        A: (r, K), B: (N, r), B starts at zero

Merging a packed base is done on real numbers, never on codes: dequantize the base, add (α / r)·B A, and
quantize the sum again under the base's scheme with a named method: "rtn" (round to nearest, the format's
own scale rule, fresh scales for the new weight) or "gptq" (calibrated; needs calibration token ids).
Adding the update to the stored codes would keep the old scales, clip whatever leaves their range and
round the update away wherever it is smaller than half a quantization step.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import quantize_weight
from modelpress.formats.scheme import WeightScheme
from modelpress.io.atomic import atomic_file
from modelpress.nn.layers import DEFAULT_SKIP, find_linear_layers, linear_weight, output_head_names, replace_module
from modelpress.nn.quant_linear import QuantLinear

MERGE_METHODS = ("rtn", "gptq")
ADAPTERS_FILE = "adapters.safetensors"   # beside a saved model: its adapters, kept apart (finetune --lora)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    skip: tuple[str, ...] = DEFAULT_SKIP     # layer name patterns left without an adapter

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ModelpressError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ModelpressError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ModelpressError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def base_weight(base: nn.Module) -> torch.Tensor:
    """(N, K) float32 weight of a QuantLinear (dequantized, in the layer's own column order) or linear layer."""
    if isinstance(base, QuantLinear):
        return base.dequantized_weight(torch.float32)
    return linear_weight(base).detach().float()


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        out_features, in_features = base_weight(base).shape
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = alpha / rank
        device = next(iter(base.buffers()), None)
        device = device.device if device is not None else next(base.parameters()).device
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))   # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """(N, K) float32: (α / r) · B A."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return base_weight(self.base) + self.delta_weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + update * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def add_lora(model: nn.Module, config: LoRAConfig = LoRAConfig()) -> dict[str, LoRALinear]:
    """Wrap every QuantLinear and linear layer (minus skips and the output head) in a LoRALinear, in place;
    everything else in the model is frozen, so only the adapters train."""
    targets = _lora_targets(model, config.skip)
    if not targets:
        raise ModelpressError(f"no linear or quantized layers to adapt (skip patterns: {list(config.skip)})")
    for p in model.parameters():
        p.requires_grad_(False)
    done = {}
    for name, module in targets.items():
        new = LoRALinear(module, config.rank, config.alpha, config.dropout)
        replace_module(model, name, new)
        done[name] = new
    return done


def _lora_targets(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    heads = output_head_names(model)
    found = dict(find_linear_layers(model, skip))
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and name not in heads and not _matches(name, skip):
            found[name] = module
    inside_adapters = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {n: m for n, m in found.items() if not any(n.startswith(f"{a}.") for a in inside_adapters)}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module, method: str = "rtn", calibration_ids: torch.Tensor | None = None,
               device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """Fold every adapter into its base, in place. A packed base is re-quantized under its own scheme by
    `method`; a float base simply gets the merged float weight. Returns the new layers by name."""
    if method not in MERGE_METHODS:
        raise ModelpressError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    adapters = lora_layers(model)
    if not adapters:
        raise ModelpressError(f"{type(model).__name__} has no LoRA adapters to merge")
    packed = {name: a.base.scheme for name, a in adapters.items() if isinstance(a.base, QuantLinear)}
    if method == "gptq" and packed:
        _check_gptq_merge(model, adapters, packed, calibration_ids)
    done: dict[str, nn.Module] = {}
    for name, adapter in adapters.items():
        with torch.no_grad():
            merged = adapter.merged_weight()
        base = adapter.base
        bias = getattr(base, "bias", None)
        if isinstance(base, QuantLinear) and method == "rtn":
            new: nn.Module = QuantLinear(quantize_weight(merged, base.scheme, name=f"layer {name}"), bias)
        else:  # a float base, or a packed one waiting for GPTQ below
            new = _float_linear(merged, bias)
        new.to(merged.device)
        replace_module(model, name, new)
        done[name] = new
    if method == "gptq" and packed:
        from modelpress.algorithms.quantize.gptq import GPTQConfig, quantize_gptq

        quantize_gptq(model, GPTQConfig(scheme=next(iter(packed.values()))), calibration_ids, device=device)
        done.update({name: model.get_submodule(name) for name in packed})
    return done


def _check_gptq_merge(model: nn.Module, adapters: dict[str, LoRALinear], packed: dict[str, WeightScheme],
                      calibration_ids: torch.Tensor | None) -> None:
    """GPTQ quantizes every float linear layer it meets under one scheme: the merged packed layers must be
    the only float layers (besides the output head) it will see, and share a scheme. Checked before merging."""
    if calibration_ids is None:
        raise ModelpressError("merging with gptq needs calibration token ids; pass calibration_ids or use rtn")
    distinct = sorted({s.spec for s in packed.values()})
    if len(distinct) > 1:
        raise ModelpressError(f"gptq merge needs one scheme for all merged layers, found {', '.join(distinct)}; "
                              f"use rtn")
    inside = tuple(f"{name}." for name in adapters)
    others = [n for n in find_linear_layers(model) if not n.startswith(inside)]
    others += [n for n in adapters if n not in packed]
    if others:
        raise ModelpressError(f"gptq merge would also quantize float layers ({', '.join(sorted(others)[:3])}"
                              f"{'...' if len(others) > 3 else ''}); use rtn")


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


# ---- adapters on disk -----------------------------------------------------------------------------------

def adapters_bytes(model: nn.Module) -> bytes:
    """Every adapter's A and B (`<layer>.lora_a`, `<layer>.lora_b`) as one safetensors blob; rank and alpha
    per layer in its metadata."""
    adapters = lora_layers(model)
    if not adapters:
        raise ModelpressError(f"{type(model).__name__} has no LoRA adapters to save")
    tensors, layers = {}, {}
    for name, adapter in adapters.items():
        tensors[f"{name}.lora_a"] = adapter.lora_a.detach().float().contiguous().cpu()
        tensors[f"{name}.lora_b"] = adapter.lora_b.detach().float().contiguous().cpu()
        layers[name] = {"rank": adapter.rank, "alpha": adapter.alpha}
    return save(tensors, metadata={"producer": "modelpress lora", "layers": json.dumps(layers)})


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    payload = adapters_bytes(model)
    with atomic_file(path, mode="wb") as handle:
        handle.write(payload)
    return Path(path)


def unwrap_lora(model: nn.Module) -> dict[str, nn.Module]:
    """Put every adapter's base back in its place (the adapters are dropped), in place."""
    bases = {}
    for name, adapter in lora_layers(model).items():
        replace_module(model, name, adapter.base)
        bases[name] = adapter.base
    return bases


def load_adapters(model: nn.Module, path: str | Path) -> dict[str, LoRALinear]:
    """Wrap the layers named in the file (unless already wrapped) and load their adapters, in place."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            layers = json.loads((handle.metadata() or {})["layers"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ModelpressError(f"{path} is not a readable LoRA adapter file: {err}") from None
    existing = lora_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    done = {}
    for name, spec in layers.items():
        adapter = existing.get(name)
        if adapter is None:
            try:
                base = model.get_submodule(name)
            except AttributeError:
                raise ModelpressError(f"{path}: the model has no layer {name!r}") from None
            adapter = LoRALinear(base, int(spec["rank"]), float(spec["alpha"]))
            replace_module(model, name, adapter)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        if a.shape != adapter.lora_a.shape or b.shape != adapter.lora_b.shape:
            raise ModelpressError(f"{path}: adapter {name} has shapes {tuple(a.shape)}/{tuple(b.shape)}, the layer "
                                  f"needs {tuple(adapter.lora_a.shape)}/{tuple(adapter.lora_b.shape)}")
        with torch.no_grad():
            adapter.lora_a.copy_(a)
            adapter.lora_b.copy_(b)
        adapter.lora_a.requires_grad_(True)
        adapter.lora_b.requires_grad_(True)
        done[name] = adapter
    return done
