"""Which weight schemes each runtime can run, decided per layer by the exporters' own tests.

A plan for a runtime may only use schemes the runtime holds bit for bit, otherwise the forecast (size, KL)
would describe a model nobody deploys: the export would re-round the layer. So each runtime lists the
candidate schemes worth trying, and every (layer, candidate) is kept only if the exporter for that runtime
says the packed candidate maps losslessly (the same functions `modelpress export` uses):

- modelpress    every scheme QuantLinear runs: the mixed-precision ladder (algorithms/quantize/mixed_run.py)
- llamacpp      GGUF legacy blocks, all groups of 32: int4/g32 -> Q4_0, int4-asym/g32 -> Q4_1, int5/g32 -> Q5_0,
                int5-asym/g32 -> Q5_1, int8/g32 -> Q8_0 (export/gguf_blocks.lossless_type). The k-quants
                (Q2_K..Q6_K) hold a layer only when its scales factor exactly into a k-quant header
                (encode_kquant_lossless); round-to-nearest and GPTQ scales do not, so no candidate here
                targets them, but the check accepts one that does.
- transformers  compressed-tensors pack-quantized symmetric integers (export/ct_layers.convert_packed),
                (a row that a group size does not divide, K = 576 with g128, is written exactly with smaller
                groups and repeated scales: lossless, a few more scale bytes in the export than here).
                Asymmetric RTN keeps float offsets, which compressed-tensors' integer zero points re-round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from modelpress.algorithms.quantize.mixed_run import DEFAULT_CANDIDATES
from modelpress.errors import ModelpressError
from modelpress.formats.packed import PackedWeight


def _any(packed: PackedWeight) -> bool:
    return True


def _gguf(packed: PackedWeight) -> bool:
    from modelpress.export import gguf_blocks

    return gguf_blocks.lossless_type(packed)[0] is not None or gguf_blocks.encode_kquant_lossless(packed) is not None


def _compressed_tensors(packed: PackedWeight) -> bool:
    from modelpress.export.ct_layers import convert_packed

    return convert_packed(packed).lossless


@dataclass(frozen=True)
class Runtime:
    name: str
    candidates: tuple[str, ...]                   # scheme specs, cheapest first
    holds: Callable[[PackedWeight], bool]         # the layer, packed under a candidate, runs as it is
    export_target: str | None                     # `modelpress export --to` for this runtime


RUNTIMES: dict[str, Runtime] = {
    "modelpress": Runtime("modelpress", DEFAULT_CANDIDATES, _any, None),
    "llamacpp": Runtime("llamacpp", ("int4/g32", "int4-asym/g32", "int5/g32", "int5-asym/g32", "int8/g32"),
                        _gguf, "gguf"),
    "transformers": Runtime("transformers", ("int3/g64", "int4/g128", "int4/g64", "int4/g32", "int8/channel"),
                            _compressed_tensors, "compressed-tensors"),
}


def runtime(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ModelpressError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}") from None
