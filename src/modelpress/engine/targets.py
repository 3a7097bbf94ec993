"""The weight matrices of one block that an algorithm may change, and putting the algorithm's results back.

Two kinds of target:
- linear layers (nn.Linear, transformers' Conv1D), replaced by a QuantLinear or given a new dense weight;
- slices of fused expert parameters. transformers 5 stores a mixture-of-experts layer's experts as 3-D
  parameters (experts, out, in) (or (experts, in, out) when the experts module says `is_transposed`), read
  one expert at a time by the eager expert loop as `F.linear(x, param[e])`. Each expert's slice is its
  own target ("mlp.experts.down_proj.3"): observed with the tokens routed to that expert only (see
  `ExpertCallWatcher`), solved on its own, and the packed slices of a parameter replace it together as a
  QuantExperts module.
While a block is being calibrated, solved layers hold their dequantized weights in place (`apply_dense`);
the compressed modules replace them once the block is finished (`install_compressed`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from modelpress.engine.algorithm import LayerSolution, LayerTarget
from modelpress.formats.packed import PackedWeight
from modelpress.nn.layers import find_linear_layers, is_conv1d, linear_weight, replace_module
from modelpress.nn.quant_experts import QuantExperts
from modelpress.nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class ExpertParam:
    """A fused (experts, a, b) parameter inside a block."""

    module_path: str
    param_name: str
    transposed: bool          # stored (experts, in, out) rather than (experts, out, in)

    @property
    def path(self) -> str:
        return f"{self.module_path}.{self.param_name}" if self.module_path else self.param_name

    def parameter(self, block: nn.Module) -> torch.Tensor:
        owner = block.get_submodule(self.module_path) if self.module_path else block
        return getattr(owner, self.param_name)

    def slice_name(self, expert: int) -> str:
        return f"{self.path}.{expert}"


def find_expert_params(block: nn.Module) -> list[ExpertParam]:
    """3-D parameters of modules that are not convolutions: fused expert weights."""
    found = []
    for path, module in block.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.shape[0] > 0:
                found.append(ExpertParam(path, name, bool(getattr(module, "is_transposed", False))))
    return found


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


@dataclass
class BlockTargets:
    """Every target of one block, by name, with what is needed to observe and replace it."""

    linears: dict[str, nn.Module]
    experts: dict[str, tuple[ExpertParam, int]]     # slice name -> (fused parameter, expert index)
    expert_params: list[ExpertParam]

    def names(self) -> list[str]:
        return list(self.linears) + list(self.experts)

    def target(self, block: nn.Module, name: str) -> LayerTarget:
        if name in self.linears:
            module = self.linears[name]
            return LayerTarget(name, linear_weight(module), getattr(module, "bias", None))
        fused, expert = self.experts[name]
        weight = fused.parameter(block)[expert]
        return LayerTarget(name, weight.t() if fused.transposed else weight, None)


def find_targets(block: nn.Module, skip: Iterable[str] = ()) -> BlockTargets:
    patterns = tuple(skip)
    linears = find_linear_layers(block, patterns, within=block)
    experts: dict[str, tuple[ExpertParam, int]] = {}
    params = [p for p in find_expert_params(block) if not _skipped(p.path, patterns)]
    for fused in params:
        for expert in range(fused.parameter(block).shape[0]):
            experts[fused.slice_name(expert)] = (fused, expert)
    return BlockTargets(linears, experts, params)


class ExpertCallWatcher(TorchFunctionMode):
    """Sees every `F.linear(x, param[e])` (or `x @ param[e]` for transposed storage) on a watched fused
    parameter and calls `before(slice_name, x)`, then `after(slice_name, x, output)`."""

    def __init__(self, block: nn.Module, targets: BlockTargets,
                 before: Callable[[str, torch.Tensor], None] | None = None,
                 after: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        super().__init__()
        self.before, self.after = before, after
        params = [(fused, fused.parameter(block)) for fused in targets.expert_params]
        # parameters already replaced by QuantExperts are no longer watched
        self.watched = [(fused, p) for fused, p in params if isinstance(p, torch.Tensor)]

    def _slice(self, weight) -> str | None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type == "meta":
            return None
        for fused, param in self.watched:
            if (weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()
                    or tuple(weight.shape) != tuple(param.shape[1:]) or weight.stride() != param.stride()[1:]):
                continue
            step, rest = divmod(weight.storage_offset() - param.storage_offset(), param.stride(0))
            if rest == 0 and 0 <= step < param.shape[0]:
                return fused.slice_name(step)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) >= 2:
            name = self._slice(args[1])
        if name is not None and self.before is not None:
            self.before(name, args[0])
        out = func(*args, **kwargs)
        if name is not None and self.after is not None:
            self.after(name, args[0], out)
        return out


def apply_dense(block: nn.Module, targets: BlockTargets, solved: dict[str, LayerSolution]) -> None:
    """Write each solution's dense weight (a PackedWeight dequantized) into the float layer or expert slice,
    so that the rest of the block's calibration runs through what the compressed layers will compute.
    (Numerically this is the reference backend's dequantize-then-matmul.)"""
    with torch.no_grad():
        for name, solution in solved.items():
            value = solution.value
            dense = value.dequantize() if isinstance(value, PackedWeight) else value
            if name in targets.linears:
                module = targets.linears[name]
                module.weight.copy_(dense.t() if is_conv1d(module) else dense)
            else:
                fused, expert = targets.experts[name]
                fused.parameter(block)[expert].copy_(dense.t() if fused.transposed else dense)


def install_compressed(block: nn.Module, targets: BlockTargets, solved: dict[str, LayerSolution]) -> list[str]:
    """Replace every layer whose solution is a PackedWeight by a QuantLinear, and every fused expert
    parameter whose slices are all PackedWeights by a QuantExperts. Returns the replaced names."""
    replaced = []
    for name, module in targets.linears.items():
        value = solved[name].value if name in solved else None
        if isinstance(value, PackedWeight):
            new = QuantLinear(value, getattr(module, "bias", None)).to(module.weight.device)
            replace_module(block, name, new)
            replaced.append(name)
    for fused in targets.expert_params:
        param = fused.parameter(block)
        values = [solved[fused.slice_name(e)].value if fused.slice_name(e) in solved else None
                  for e in range(param.shape[0])]
        if all(isinstance(v, PackedWeight) for v in values):
            new = QuantExperts(values, dtype=param.dtype, transposed=fused.transposed).to(param.device)
            replace_module(block, fused.path, new)
            replaced.append(fused.path)
    return replaced
