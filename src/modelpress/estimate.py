"""Memory calculator: what a model's weights take in each number format, and what its KV cache takes.

Weights. With only a parameter count, every parameter is counted in the format (the usual headline
figures: 7B parameters are 28 GB in fp32, 14 GB in fp16, 7 GB in int8, 3.5 GB at 4 bits), and scale
overhead comes from `WeightScheme.theoretical_bits_per_weight`. With a model's shapes, the linear layers
that `modelpress quantize` packs are counted exactly as PackedWeight stores them (codes with padded rows,
scales, offsets), and the other parameters (embeddings, norms, output head) are counted in float16.

KV cache. bytes = 2 (K and V) · layers · kv_heads · head_dim · context · batch · bytes per element, with
the scale overhead of quantized caches included in the bytes per element (see KV_DTYPES).
Calibration. What a calibrated method (GPTQ and friends, engine/runner.py) holds while it works, on the
calibration device, from the model's shapes and the settings: the block being compressed (with GPTQ's float
target, a float copy beside it), the hidden states carried between blocks (engine/states.py: two or three
streams of samples x tokens x width at the peak, or about two batches when they are kept in host memory),
the statistics of the layers observed together (float64 K x K Hessians per input group: GPTQ with its
float target and SparseGPT observe one level of a block at a time, plain GPTQ and AWQ the whole block), the
largest solve's working matrices (while the sums of the level's other groups wait) and one batch's forward;
observing and solving do not overlap, so the device peak is the larger of the two beside the block and the
hidden states. Input groups and levels come from a traced forward of one block on fake tensors (no memory,
no weights); where that trace fails (routing in a mixture of experts is data-dependent) every layer counts as
its own group: an upper bound for methods that observe a whole block at once, an approximation for the others.

Decimal units (1 GB = 10**9 bytes) as in model cards, GiB (2**30) beside them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from modelpress.errors import ModelpressError
from modelpress.formats.packed import empty_packed
from modelpress.formats.scheme import WeightScheme

GB = 10**9
GIB = 2**30
REST_BITS = 16  # parameters a quantize run leaves alone are counted as float16 in the quantized rows

# label -> float bits (int) or scheme spec (str); the order of the printed table
FORMAT_ROWS: tuple[tuple[str, int | str], ...] = (
    ("fp32", 32),
    ("fp16/bf16", 16),
    ("int8/channel", "int8/channel"),
    ("fp8", "fp8-e4m3/channel"),
    ("int4/g128", "int4/g128"),
    ("int4-asym/g128", "int4-asym/g128"),
    ("nf4/g64", "nf4/g64"),
    ("nf4/g64/dq", "nf4/g64/dq"),
    ("int3/g128", "int3/g128"),
    ("int2/g64", "int2/g64"),
    ("ternary", "ternary"),
)

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_parameter_count(text: str) -> int:
    """'7B', '13b', '135M', '1.5B', '7000000000', '7_000_000' or '7e9' -> a positive integer."""
    match = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ModelpressError(f"cannot read parameter count {text!r}; expected e.g. 7B, 135M, 1.5B or 7000000000")
    number = float(match.group(1).replace("_", "").replace(",", ""))
    count = round(number * _SUFFIXES[match.group(2).upper()])
    if count <= 0:
        raise ModelpressError(f"parameter count must be positive, got {text!r}")
    return count


@dataclass(frozen=True)
class LinearShape:
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class StatsGroup:
    """Layers of a block that read one input (q/k/v; gate/up; one expert's slice): one set of statistics."""

    level: int            # engine/plan.py's level (q/k/v 0, o 1, gate/up 2, down 3 in a Llama block)
    inputs: int           # K, the width of the input
    rows: int             # output rows of its layers together
    reference: bool       # has a float reference under GPTQ's float target (dense layers; experts have none)


@dataclass(frozen=True)
class BlockLayout:
    parameters: int                       # one block's parameters
    hidden_size: int                      # width of the hidden states between blocks
    groups: tuple[StatsGroup, ...]
    traced: bool                          # groups from a traced forward; False: every layer alone (a bound)


@dataclass(frozen=True)
class ModelShapes:
    """What the calculator needs to know about a model; nothing is loaded to learn it."""

    parameters: int                       # every stored parameter, tied ones once
    linear: tuple[LinearShape, ...] = ()  # the weights a quantize run packs (output head excluded)
    layers: int | None = None             # attention layers, KV heads and head size, for the KV cache
    kv_heads: int | None = None
    head_dim: int | None = None
    block: BlockLayout | None = None      # one repeated block, for the calibration estimate
    blocks: int | None = None             # how many of them

    @property
    def quantized_parameters(self) -> int:
        return sum(s.numel for s in self.linear)


@dataclass(frozen=True)
class WeightEstimate:
    label: str
    scheme: str | None           # the exact scheme spec (None for float formats)
    quantized_parameters: int    # parameters counted in this format
    weight_bytes: int            # their codes (or float values), before overhead
    overhead_bytes: int          # scales, offsets, double-quantization constants
    float_bytes: int             # the other parameters, kept in float16 (0 with only a parameter count)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.overhead_bytes + self.float_bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, overhead included."""
        return 8 * (self.weight_bytes + self.overhead_bytes) / self.quantized_parameters

    def to_dict(self) -> dict:
        return {"format": self.label, "scheme": self.scheme, "quantized_parameters": self.quantized_parameters,
                "weight_bytes": self.weight_bytes, "overhead_bytes": self.overhead_bytes,
                "float_bytes": self.float_bytes, "total_bytes": self.total_bytes,
                "total_gb": self.total_bytes / GB, "total_gib": self.total_bytes / GIB,
                "bits_per_weight": self.bits_per_weight}


def estimate_weights(label: str, fmt: int | str, parameters: int,
                     linear: Sequence[LinearShape] | None = None) -> WeightEstimate:
    """Bytes of `parameters` weights in one format: float bits (int) or a scheme spec (str).

    Without `linear`, every parameter is counted in the format; with it, those shapes are counted exactly as
    packed and the remaining parameters in float16."""
    if linear is not None and not linear:
        raise ModelpressError("the model has no linear layers to quantize")
    if isinstance(fmt, int):
        return WeightEstimate(label, None, parameters, math.ceil(parameters * fmt / 8), 0, 0)
    scheme = WeightScheme.parse(fmt)
    if linear is None:
        overhead_bits = scheme.theoretical_bits_per_weight() - scheme.bits
        return WeightEstimate(label, scheme.spec, parameters, math.ceil(parameters * scheme.bits / 8),
                              round(parameters * overhead_bits / 8), 0)
    codes = overhead = 0
    for shape, count in Counter(linear).items():
        packed = empty_packed(scheme, (shape.out_features, shape.in_features), device="meta")
        layer_codes = packed.qdata.numel() * packed.qdata.element_size()
        codes += count * layer_codes
        overhead += count * (packed.nbytes - layer_codes)
    quantized = sum(s.numel for s in linear)
    rest = math.ceil((parameters - quantized) * REST_BITS / 8)
    return WeightEstimate(label, scheme.spec, quantized, codes, overhead, rest)


def estimate_all_weights(shapes: ModelShapes | int) -> list[WeightEstimate]:
    """One row per entry of FORMAT_ROWS, for a parameter count or a model's shapes."""
    if isinstance(shapes, int):
        return [estimate_weights(label, fmt, shapes) for label, fmt in FORMAT_ROWS]
    rows = []
    for label, fmt in FORMAT_ROWS:
        if isinstance(fmt, int):  # float rows: the whole model in that float format
            rows.append(estimate_weights(label, fmt, shapes.parameters))
        else:
            rows.append(estimate_weights(label, fmt, shapes.parameters, shapes.linear))
    return rows


@dataclass(frozen=True)
class KVDtype:
    bits: int                  # per stored element
    group: int | None = None   # elements sharing the overhead below; None: one head vector of one token
    group_bits: int = 0        # overhead bits per group (fp16 scale, and fp16 zero point when asymmetric)
    note: str = ""

    def bits_per_element(self, head_dim: int) -> float:
        if not self.group_bits:
            return float(self.bits)
        return self.bits + self.group_bits / (self.group or head_dim)


KV_DTYPES: dict[str, KVDtype] = {
    "float32": KVDtype(32),
    "float16": KVDtype(16),
    "bfloat16": KVDtype(16),
    "int8": KVDtype(8, None, 16, "int8 absmax, one fp16 scale per (token, head)"),
    "fp8": KVDtype(8, None, 16, "fp8-e4m3, one fp16 scale per (token, head)"),
    "int4": KVDtype(4, 32, 32, "int4-asym, fp16 scale + fp16 zero point per 32 values"),
}


@dataclass(frozen=True)
class KVCacheEstimate:
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    batch: int
    dtype: str
    bits_per_element: float

    @property
    def bytes_per_token(self) -> float:
        """For one sequence: K and V of every layer and KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bits_per_element / 8

    @property
    def total_bytes(self) -> int:
        return math.ceil(self.bytes_per_token * self.context * self.batch)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "context": self.context, "batch": self.batch, "dtype": self.dtype,
                "bits_per_element": self.bits_per_element, "bytes_per_token": self.bytes_per_token,
                "total_bytes": self.total_bytes, "total_gb": self.total_bytes / GB,
                "total_gib": self.total_bytes / GIB, "note": KV_DTYPES[self.dtype].note}


def estimate_kv_cache(layers: int, kv_heads: int, head_dim: int, context: int = 4096, batch: int = 1,
                      dtype: str = "float16") -> KVCacheEstimate:
    if dtype not in KV_DTYPES:
        raise ModelpressError(f"unknown KV cache dtype {dtype!r}; known: {', '.join(KV_DTYPES)}")
    for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("context", context), ("batch", batch)):
        if not isinstance(value, int) or value <= 0:
            raise ModelpressError(f"KV cache {name} must be a positive integer, got {value!r}")
    return KVCacheEstimate(layers, kv_heads, head_dim, context, batch, dtype,
                           KV_DTYPES[dtype].bits_per_element(head_dim))


def kv_shape_from_config(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config (the text part of multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and heads:
        head_dim = text.hidden_size // heads
    if not (layers and kv_heads and head_dim):
        raise ModelpressError(f"cannot find layers / KV heads / head size in the {type(config).__name__}; "
                              "give --layers, --kv-heads and --head-dim")
    return int(layers), int(kv_heads), int(head_dim)


CALIBRATED_METHODS = ("gptq", "awq", "sparsegpt", "wanda", "smoothquant")


@dataclass(frozen=True)
class CalibrationEstimate:
    method: str
    samples: int
    seq_len: int
    batch_size: int
    float_target: bool
    offload: bool
    element_size: int            # bytes of one float of the model as calibrated (float32: 4)
    block_bytes: int             # the block on the device, and its float copy under the float target
    hidden_bytes: int            # hidden states on the device at their peak
    statistics_bytes: int        # running sums of the layers observed together, at the largest level
    solve_bytes: int             # the largest solve's working memory, with the sums still held then
    activation_bytes: int        # one batch through the block, with the observation's copies
    outside_bytes: int           # embeddings, final norm and head: on the device while block inputs are captured
    host_model_bytes: int        # the float model in host memory (one block of it when streamed)
    host_hidden_bytes: int       # hidden states in host memory when offloaded
    streams: int                 # hidden-state streams alive at the peak
    traced: bool                 # input groups from a traced forward (else an upper bound)

    @property
    def device_bytes(self) -> int:
        """The largest of three phases: capturing block inputs (the modules outside the blocks, block 0 once,
        one stream), observing a block's layers (their sums growing, one batch's forward) and solving them."""
        capture = self.outside_bytes + self.block_bytes + self.hidden_bytes // self.streams + self.activation_bytes
        observing = self.statistics_bytes + self.activation_bytes
        return max(capture, self.block_bytes + self.hidden_bytes + max(observing, self.solve_bytes))

    @property
    def host_bytes(self) -> int:
        return self.host_model_bytes + self.host_hidden_bytes

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "device_bytes": self.device_bytes, "host_bytes": self.host_bytes}


def _held_sums(method: str, groups: Sequence[StatsGroup], float_target: bool) -> list[list[tuple[StatsGroup, int]]]:
    """The sets of groups `method` observes together, each group with the bytes of its running sums: float64
    X^T X (and the float target's cross term) per group; Wanda and SmoothQuant one value per input channel.
    GPTQ with its float target and SparseGPT observe a block level by level (engine/plan.py), plain GPTQ and
    AWQ all of it at once."""
    def sums(g: StatsGroup) -> int:
        if method in ("wanda", "smoothquant"):
            return 8 * g.inputs
        return 8 * g.inputs**2 * (2 if method == "gptq" and float_target and g.reference else 1)

    if (method == "gptq" and float_target) or method == "sparsegpt":
        levels = sorted({g.level for g in groups})
        return [[(g, sums(g)) for g in groups if g.level == lv] for lv in levels]
    return [[(g, sums(g)) for g in groups]]


def _solving(method: str, group: StatsGroup, float_target: bool) -> int:
    """Working memory of one group's solve once its float64 sum is released, from the solvers' code.
    GPTQ / SparseGPT: four float32 K x K matrices at once (the Hessian, its damped copy and two more while the
    columns are permuted by activation order and while the inverse factor is made), and (N, K) float32
    weights, permuted copies, expanded group ranges, codes and errors (40 bytes per weight). The float target
    first moves the weights (gptq.float_target_weights) while the cross term's float64 sum is still held:
    float32 Hessian and cross term, float64 damped Hessian, cross term, Cholesky factor and one temporary (40
    bytes per K x K entry) and (N, K) float64 weights three times; its solve then has the cross term's sum
    beside it. AWQ: the scale search's candidates (every group's float32 Hessian is counted apart)."""
    k, n = group.inputs, group.rows
    if method in ("wanda", "smoothquant"):
        return 8 * n * k
    if method == "awq":
        return 4 * k * k + 16 * n * k
    if method == "gptq" and float_target and group.reference:
        return max(40 * k * k + 24 * n * k, 24 * k * k + 48 * n * k)
    return 16 * k * k + 40 * n * k


def _phases(method: str, groups: Sequence[StatsGroup], float_target: bool) -> tuple[int, int]:
    """(statistics while observing, the largest solve with what is still held then), at their largest."""
    observing = solving = 0
    for held in _held_sums(method, groups, float_target):
        total = sum(b for _, b in held)
        observing = max(observing, total)
        # AWQ keeps every group's float32 Hessian from its preparation
        kept = sum(4 * g.inputs**2 for g, _ in held) if method == "awq" else 0
        for group, own in held:   # the other groups' sums wait while this one is solved
            solving = max(solving, total - own + kept + _solving(method, group, float_target))
    return observing, solving


def estimate_calibration(shapes: ModelShapes, method: str = "gptq", samples: int = 128, seq_len: int = 512,
                         batch_size: int = 8, float_target: bool = True, offload: bool = False,
                         element_size: int = 4, streamed: bool = False) -> CalibrationEstimate:
    """Memory of a calibrated run (module docstring) on `shapes`, which must carry a block layout."""
    from modelpress.engine.states import peak_streams

    if method not in CALIBRATED_METHODS:
        raise ModelpressError(f"no calibration estimate for method {method!r}; known: {', '.join(CALIBRATED_METHODS)}")
    if shapes.block is None or not shapes.blocks:
        raise ModelpressError("a calibration estimate needs a model's shapes (give a MODEL, not --params)")
    for name, value in (("samples", samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ModelpressError(f"calibration {name} must be a positive integer, got {value!r}")
    block = shapes.block
    reference = method == "gptq" and float_target
    batch_rows = min(batch_size, samples) * seq_len
    stream = samples * seq_len * block.hidden_size * element_size
    streams = peak_streams(reference)
    widest_input = max(g.inputs for g in block.groups)   # the MLP's intermediate width, down_proj's input
    # one batch: the block's forward (norms, projections, rotary copies, attention and the MLP's gate, up, act
    # and product: about ten hidden-wide and four intermediate-wide values per token), the observed input in
    # float64, and under the float target the float block's inputs of the level and the drift's copies
    activation = batch_rows * element_size * (10 * block.hidden_size + 4 * widest_input)
    if method not in ("wanda", "smoothquant"):
        activation += batch_rows * widest_input * 8
    if reference:
        activation += batch_rows * widest_input * (8 + 2 * element_size)
    outside = shapes.parameters - shapes.blocks * block.parameters
    observing, solving = _phases(method, block.groups, float_target)
    return CalibrationEstimate(
        method=method, samples=samples, seq_len=seq_len, batch_size=batch_size, float_target=reference,
        offload=offload, element_size=element_size,
        block_bytes=block.parameters * element_size * (2 if reference else 1),
        hidden_bytes=(2 * batch_rows * block.hidden_size * element_size * (2 if reference else 1)) if offload
        else streams * stream,
        statistics_bytes=observing, solve_bytes=solving,
        activation_bytes=activation, outside_bytes=outside * element_size,
        host_model_bytes=(outside + block.parameters if streamed else shapes.parameters) * element_size,
        host_hidden_bytes=streams * stream if offload else 0,
        streams=streams, traced=block.traced)


def block_layout(build: Callable[[], nn.Module], skip: Sequence[str] | None = None) -> BlockLayout:
    """The first repeated block of the model `build()` makes, built and run on fake tensors (shapes only: no
    memory, no weights): its parameter count, width, and the input groups and levels the engine would plan
    (engine/plan.py). Where the traced forward fails (data-dependent routing in a mixture of experts), every
    dense layer is its own group at its own level and every expert slice of one fused parameter shares one."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from modelpress.engine.blocks import find_blocks, hidden_width
    from modelpress.engine.capture import first_call
    from modelpress.engine.plan import plan_block
    from modelpress.engine.targets import find_targets
    from modelpress.nn.layers import DEFAULT_SKIP
    from modelpress.nn.quant_experts import QuantExperts

    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # what fake tensors say of storage pointers is not the user's concern
        model = build().eval()
        stack = find_blocks(model)
        block = stack.blocks[0]
        targets = find_targets(block, tuple(DEFAULT_SKIP if skip is None else skip))
        parameters = sum(p.numel() for p in block.parameters())
        try:
            if targets.expert_params:
                QuantExperts.prepare_model(model)
                block = stack.blocks[0]
                targets = find_targets(block, tuple(DEFAULT_SKIP if skip is None else skip))
            hidden, call = first_call(model, stack, torch.zeros(1, 8, dtype=torch.long))
            width = int(hidden.shape[-1])
            plan = plan_block(block, targets, hidden, call)
            named = [(g.level, [t.name for t in g.targets]) for g in plan.groups]
            traced = True
        except Exception:  # noqa: BLE001 - any failure of the fake forward: fall back to the layer list
            width = hidden_width(model)
            if width is None:
                raise ModelpressError(f"cannot tell the width of {type(model).__name__}'s hidden states") from None
            fused = {p.path: i for i, p in enumerate(targets.expert_params)}
            named = [(i, [name]) for i, name in enumerate(targets.linears)]
            named += [(len(named) + fused[f.path], [name]) for name, (f, _) in targets.experts.items()]
            traced = False
        groups = []
        for level, names in named:
            shapes = [targets.target(block, n).weight.shape for n in names]
            groups.append(StatsGroup(level, int(shapes[0][-1]), int(sum(s[0] for s in shapes)),
                                     reference=names[0] in targets.linears))
    return BlockLayout(int(parameters), width, tuple(groups), traced)
