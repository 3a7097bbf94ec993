"""Per-input-channel scales moved between a group of layers and the operation that produces their input
(shared by AWQ and SmoothQuant).

For layers reading x (..., K), W x = (W diag(s)) (x / s) for any positive s (K,). The division by s costs
nothing when it can be folded into whatever produced x:
- a norm with an elementwise affine (RMSNorm, LayerNorm): its weight (and bias) divided by s; a norm that
  multiplies by (1 + weight) (Gemma's RMSNorm stores the weight offset by one) gets (1 + weight) / s - 1;
- a linear layer whose output channels reach x one to one through operations that commute with a
  per-channel scale: its rows (and bias) divided by s. Examples: up_proj -> (act(gate) * up) -> down_proj;
  v_proj -> attention -> o_proj when every attention head has its own value head;
- a linear layer whose output channels each reach several channels of x (grouped-query attention: a value
  head serves several query heads, so v_proj has fewer outputs than o_proj has inputs): the fold exists
  only for scales tied across the channels of x one row feeds. `Producer.columns` is that map, read from
  the data (the rows doubled one bit of their index at a time, the channels of x that double with them
  spelling the index), and `Producer.tie` makes any scales tied (their geometric mean over the channels of
  a row) before they are folded;
- a K-row slice of a fused linear layer with a multiple of K outputs: the "up" half of Phi-3's
  gate_up_proj before down_proj, the value third of GPT-2's c_attn (or Phi-3's qkv_proj) before the
  attention output projection.
Producers are found by structure and data flow, never by name. Candidates for a group are the module whose
output is the very tensor the group reads and that has only a (K,) weight and bias (a norm, tried both
ways), then the linear layers (and K-row slices of them) called earlier in the block, latest first. A
candidate is accepted only if, with random scales s (between 1/4 and 4) folded into it and into the
group, the group reads exactly x / s and the block's output is unchanged (to float rounding); the second
check rules out producers whose output feeds anything besides the group (a mixture-of-experts block's
norm feeds the router and the experts too).
A group with no accepted producer keeps its input as it is, with a reason saying why; the caller decides
what that means.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from modelpress.algorithms.quantize.gptq import HessianSum
from modelpress.engine.algorithm import InputGroup
from modelpress.engine.context import BlockContext
from modelpress.engine.distributed import Ranks
from modelpress.nn.layers import is_linear, linear_weight


PRODUCER_KINDS = ("norm", "offset_norm", "linear")


@dataclass(frozen=True)
class Producer:
    name: str      # module path inside the block
    kind: str      # "norm": an elementwise affine weight (and bias); "offset_norm": output * (1 + weight);
                   # "linear": output rows (and bias); "spread": a candidate linear producer with fewer rows
                   # than channels, whose `columns` are not read yet (never accepted as such)
    rows: tuple[int, int] | None = None     # linear only: the K output rows that x is made of (fused layers)
    columns: tuple[int, ...] | None = None  # linear only: for each of x's K channels, the producer row (of
                                            # fewer than K) it comes from (grouped-query attention)

    @property
    def label(self) -> str:
        name = self.name if self.rows is None else f"{self.name}[{self.rows[0]}:{self.rows[1]}]"
        if self.columns is not None:
            name += f" (each row feeds {len(self.columns) // (max(self.columns) + 1)} input channels)"
        return name

    def tie(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` (K,) made foldable into this producer: unchanged, or for a producer whose rows feed
        several channels, the geometric mean over each row's channels, given to all of them."""
        if self.columns is None:
            return scale
        index = torch.tensor(self.columns, device=scale.device)
        rows = int(index.max()) + 1
        logs = torch.zeros(rows, device=scale.device).index_add_(0, index, scale.float().log())
        counts = torch.zeros(rows, device=scale.device).index_add_(0, index, torch.ones_like(logs[index]))
        return (logs / counts).exp()[index].to(scale.dtype)


@dataclass(frozen=True)
class FoldSearch:
    """Where a group's input scales can be folded, or why nowhere."""

    producer: Producer | None
    reason: str = ""

EXPERT_REASON = ("slice of fused expert weights: it reads only the tokens routed to it, so no input scale is "
                 "folded into the shared producer")


@dataclass
class ChannelStats:
    """Running statistics of one group's input x (..., K), in float32."""

    abs_sum: torch.Tensor                   # (K,) sum of |x| over rows (float64, like HessianSum)
    abs_max: torch.Tensor                   # (K,) max of |x| over rows
    hessian: HessianSum | None = None       # X^T X, when asked for
    rows: int = 0

    @classmethod
    def empty(cls, k: int, device: torch.device, hessian: bool) -> ChannelStats:
        return cls(torch.zeros(k, dtype=torch.float64, device=device), torch.zeros(k, device=device),
                   HessianSum.zeros(k, device) if hessian else None)

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        a = x.abs()
        self.abs_sum += a.double().sum(dim=0)
        torch.maximum(self.abs_max, a.amax(dim=0), out=self.abs_max)
        if self.hessian is not None:
            self.hessian.add(x)
        self.rows += x.shape[0]

    def reduce(self, ranks: Ranks) -> None:
        """Sums, maxima and row counts over all ranks (every rank calls it, in the same order)."""
        ranks.sum_(self.abs_sum)
        ranks.max_(self.abs_max)
        if self.hessian is not None:
            self.hessian.reduce(ranks)
        self.rows = ranks.sum_ints([self.rows])[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()


# ---- the fold: pure edits of weights ----------------------------------------------------------------------

def _set(t: torch.Tensor, value: torch.Tensor) -> None:
    t.copy_(value.to(t.dtype))


@torch.no_grad()
def fold_scales(producer: nn.Module, kind: str, consumers: Iterable[nn.Module], scale: torch.Tensor,
                rows: tuple[int, int] | None = None, columns: tuple[int, ...] | None = None) -> None:
    """Divide the producer's output channels by `scale` (K,) and multiply the consumers' input columns by it,
    in float32, in place. The group's outputs are unchanged up to rounding of the stored weights.
    `rows` (linear producers only) picks the K output rows of a fused layer that make up the input;
    `columns` maps each input channel to the producer row it comes from (the scale must be tied over them)."""
    s = scale.float()
    if columns is not None:
        index = torch.tensor(columns, device=s.device)
        row_scale = torch.ones(int(index.max()) + 1, device=s.device).index_copy_(0, index, s)
        if not torch.allclose(row_scale[index], s, rtol=1e-6):
            raise ValueError("scales folded into a producer whose rows feed several channels must be tied "
                             "(Producer.tie)")
        _divide_rows(producer, row_scale, rows)
    else:
        _divide_producer(producer, kind, s, rows)
    for module in consumers:
        weight = linear_weight(module)                        # (out, K)
        _set(weight, weight.float() * s.to(weight.device)[None, :])


def _divide_producer(producer: nn.Module, kind: str, s: torch.Tensor, rows: tuple[int, int] | None) -> None:
    if kind == "norm":
        for param in (producer.weight, getattr(producer, "bias", None)):
            if param is not None:
                _set(param, param.float() / s.to(param.device))
    elif kind == "offset_norm":                               # y = norm(x) * (1 + weight)
        _set(producer.weight, (1 + producer.weight.float()) / s.to(producer.weight.device) - 1)
    else:
        _divide_rows(producer, s, rows)


def _divide_rows(producer: nn.Module, s: torch.Tensor, rows: tuple[int, int] | None) -> None:
    start, stop = rows if rows is not None else (0, linear_weight(producer).shape[0])
    weight = linear_weight(producer)[start:stop]              # (len(s), in): a view, also for Conv1D
    _set(weight, weight.float() / s.to(weight.device)[:, None])
    bias = getattr(producer, "bias", None)
    if bias is not None:
        _set(bias[start:stop], bias[start:stop].float() / s.to(bias.device))


# ---- plumbing: statistics and producers of a block's groups -----------------------------------------------

def foldable_groups(context: BlockContext) -> list[InputGroup]:
    """Groups made of linear layers only (slices of fused expert weights read routed subsets of tokens and
    take no per-channel scales here)."""
    return [g for g in context.plan.groups if all(t.name in context.targets.linears for t in g.targets)]


def deepest_first(groups: Iterable[InputGroup]) -> list[InputGroup]:
    """Order in which to fold: a group's producer is shallower than the group, so folding deeper groups
    first means every search sees the final rows of its own layers."""
    return sorted(groups, key=lambda g: -g.level)


def collect_stats(context: BlockContext, groups: list[InputGroup], hessian: bool) -> dict[str, ChannelStats]:
    """One pass of the block over every calibration batch, recording each group's input statistics."""
    stats: dict[str, ChannelStats] = {}
    handles = []

    def hook(key: str):
        def record(_module, args):
            x = args[0]
            if key not in stats:
                stats[key] = ChannelStats.empty(x.shape[-1], x.device, hessian)
            stats[key].add(x)
        return record

    for group in groups:
        handles.append(context.targets.linears[group.key].register_forward_pre_hook(hook(group.key)))
    try:
        for _ in context.outputs():
            pass
    finally:
        for handle in handles:
            handle.remove()
    if context.ranks.distributed:     # this rank saw its share of the batches: sum over all of them
        for group in groups:
            weight = linear_weight(context.targets.linears[group.key])
            stats.setdefault(group.key, ChannelStats.empty(weight.shape[-1], weight.device, hessian)).reduce(context.ranks)
    return stats


@dataclass
class _Trace:
    order: list[str] = field(default_factory=list)                 # module names, in order of finishing
    seen: set[str] = field(default_factory=set)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # first output of each norm-like module
    group_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    group_start: dict[str, int] = field(default_factory=dict)      # len(order) when the leader started


def _trace(context: BlockContext, groups: list[InputGroup]) -> tuple[_Trace, torch.Tensor]:
    trace = _Trace()
    handles = []
    leaders = {g.key for g in groups}
    for name, module in context.block.named_modules():
        if not name:
            continue

        keep = _is_norm_like(module, None)     # only a norm's output is compared with a group's input

        def after(_m, _args, output, name=name, keep=keep):
            if name not in trace.seen:
                trace.seen.add(name)
                trace.order.append(name)
                if keep and isinstance(output, torch.Tensor):
                    trace.outputs[name] = output
        handles.append(module.register_forward_hook(after))
        if name in leaders:
            def before(_m, args, name=name):
                if name not in trace.group_inputs:
                    trace.group_inputs[name] = args[0]
                    trace.group_start[name] = len(trace.order)
            handles.append(module.register_forward_pre_hook(before))
    try:
        reference = next(context.outputs(1))
    finally:
        for handle in handles:
            handle.remove()
    return trace, reference


def _is_norm_like(module: nn.Module, k: int | None) -> bool:
    """Only a (k,) weight and optionally a (k,) bias (any k if None), no submodules, not a linear layer."""
    params = dict(module.named_parameters(recurse=False))
    if "weight" not in params or is_linear(module) or any(True for _ in module.children()):
        return False
    size = params["weight"].shape if k is None else (k,)
    return set(params) <= {"weight", "bias"} and len(size) == 1 and all(p.shape == size for p in params.values())


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b is a or a reshaped view of it (a MoE block flattens (B, T, K) to (B*T, K) before its layers)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.shape[-1] == b.shape[-1])


def _candidates(context: BlockContext, group: InputGroup, trace: _Trace) -> list[Producer]:
    x = trace.group_inputs.get(group.key)
    if x is None:
        return []
    k = x.shape[-1]
    members = {t.name for t in group.targets}
    found = [Producer(name, kind) for name, out in trace.outputs.items()
             if _same_values(out, x) and _is_norm_like(context.block.get_submodule(name), k)
             for kind in ("norm", "offset_norm")]
    earlier = trace.order[: trace.group_start[group.key]]
    for name in reversed(earlier):
        module = context.block.get_submodule(name)
        if not is_linear(module) or name in members:
            continue
        n = linear_weight(module).shape[0]
        if n == k:
            found.append(Producer(name, "linear"))
        elif n % k == 0:                                    # fused (gate_up, qkv): each K-row slice, last first
            found += [Producer(name, "linear", (start, start + k)) for start in range(n - k, -1, -k)]
        if n < k and k % n == 0:                            # v_proj behind grouped-query attention
            found.append(Producer(name, "spread"))
        elif n > k and (n - k) % 2 == 0 and k % ((n - k) // 2) == 0:
            m = (n - k) // 2                                # a fused qkv with grouped-query attention:
            found.append(Producer(name, "spread", (n - m, n)))  # K query rows, then m key and m value rows
    return found


def _spread_columns(context: BlockContext, producer: Producer, group: InputGroup,
                    inputs: torch.Tensor) -> tuple[int, ...] | None:
    """For a linear producer with fewer (selected) rows than the group has inputs: the row each input
    channel comes from, read off the data. Rows whose index has bit b set are doubled, one bit at a time;
    the channels that double with them spell their row's index. None unless every channel scales by exactly
    1 or 2 each time (the path from rows to channels is linear and one to many)."""
    module = context.block.get_submodule(producer.name)
    start, stop = producer.rows if producer.rows is not None else (0, linear_weight(module).shape[0])
    m = stop - start
    base = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    energy = (base * base).sum(dim=0)
    if bool((energy == 0).any()):
        return None                                          # a silent channel says nothing about its row
    consumer = context.targets.linears[group.targets[0].name]
    index = torch.arange(m)
    columns = torch.zeros(inputs.shape[-1], dtype=torch.long)
    for bit in range(max(m - 1, 1).bit_length()):
        double = (((index >> bit) & 1).float() + 1).to(base.device)
        seen, _ = _trial(context, list(module.parameters(recurse=False)), consumer,
                         lambda: _divide_rows(module, 1 / double, producer.rows))
        if seen is None or seen.shape != inputs.shape:
            return None
        ratio = (seen.detach().reshape(base.shape).float() * base).sum(dim=0) / energy
        one, two = (ratio - 1).abs() < 1e-2, (ratio - 2).abs() < 2e-2
        if not bool((one | two).all()):
            return None
        columns |= two.cpu().long() << bit
    if int(columns.max()) >= m:
        return None
    return tuple(columns.tolist())


def _fold_tolerance(dtype: torch.dtype) -> float:
    return max(1e-4, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))


def _trial(context: BlockContext, params: list[torch.Tensor], consumer: nn.Module, edit
           ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Apply `edit()` to the weights, run the block on its first batch, restore `params` (every tensor the edit
    touches) and return (what `consumer` read first, or None, the block's output)."""
    saved = [p.detach().clone() for p in params]
    seen: list[torch.Tensor] = []
    handle = consumer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]) if not seen else None)
    try:
        with torch.no_grad():
            edit()
        output = next(context.outputs(1))
    finally:
        handle.remove()
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
    return (seen[0] if seen else None), output


def _fold_is_exact(context: BlockContext, producer: Producer, group: InputGroup, inputs: torch.Tensor,
                   reference: torch.Tensor) -> bool:
    """Fold random scales s in [1/4, 4]: the group must then read exactly inputs / s, and the block's output
    must not change (the producer's output reaches nothing but the group)."""
    module = context.block.get_submodule(producer.name)
    consumers = [context.targets.linears[t.name] for t in group.targets]
    gen = torch.Generator().manual_seed(1234 + context.index)
    scale = producer.tie((2.0 ** (torch.rand(inputs.shape[-1], generator=gen) * 4 - 2)).to(inputs.device))
    seen, output = _trial(context, list(module.parameters(recurse=False)) + [m.weight for m in consumers],
                          consumers[0], lambda: fold_scales(module, producer.kind, consumers, scale, producer.rows,
                                                            producer.columns))
    tolerance = _fold_tolerance(reference.dtype)
    return (seen is not None and seen.shape == inputs.shape
            and _relative_error(seen.float() * scale, inputs) <= tolerance
            and _relative_error(output, reference) <= tolerance)


def _resolved(context: BlockContext, group: InputGroup, inputs: torch.Tensor, candidates: list[Producer]):
    """The candidates in order, each "spread" one replaced by a linear producer with its channel map (lazily:
    a map is read only when every earlier candidate failed), or dropped when none is found."""
    for candidate in candidates:
        if candidate.kind != "spread":
            yield candidate
            continue
        columns = _spread_columns(context, candidate, group, inputs)
        if columns is not None:
            yield Producer(candidate.name, "linear", candidate.rows, columns)


def search_producers(context: BlockContext, groups: list[InputGroup]) -> dict[str, FoldSearch]:
    """For each group (by key), the module a per-channel scale of its input can be folded into, or the
    reason there is none. No module serves two groups."""
    trace, reference = _trace(context, groups)
    taken: set[tuple] = set()          # (module, rows): a norm is one producer whichever way it is read
    found: dict[str, FoldSearch] = {}
    for group in groups:
        x = trace.group_inputs.get(group.key)
        candidates = [c for c in _candidates(context, group, trace) if (c.name, c.rows) not in taken]
        accepted = next((c for c in _resolved(context, group, x, candidates)
                         if _fold_is_exact(context, c, group, x, reference)), None)
        if accepted is not None:
            taken.add((accepted.name, accepted.rows))
            found[group.key] = FoldSearch(accepted)
        elif not candidates:
            found[group.key] = FoldSearch(None, "no norm or linear layer produces this input with matching "
                                                "channels")
        else:
            tried = ", ".join(dict.fromkeys(c.label for c in candidates))
            found[group.key] = FoldSearch(None, f"no exact fold: scaling {tried} would change the block's output "
                                                "(the output feeds other layers too, or passes a nonlinearity)")
    return found


def find_producers(context: BlockContext, groups: list[InputGroup]) -> dict[str, Producer | None]:
    """search_producers without the reasons."""
    return {key: search.producer for key, search in search_producers(context, groups).items()}


def apply_fold(context: BlockContext, producer: Producer, group: InputGroup, scale: torch.Tensor) -> None:
    """Fold `scale` into a group found by find_producers: producer output / scale, group columns * scale."""
    consumers = [context.targets.linears[t.name] for t in group.targets]
    fold_scales(context.block.get_submodule(producer.name), producer.kind, consumers, scale, producer.rows,
                producer.columns)
