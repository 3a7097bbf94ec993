"""GPTQ (or AWQ+GPTQ) solved on a GGUF grid, so that the GGUF export holds the result bit for bit.

GPTQ with static groups fixes every group's range before its sweep (gptq.GridRule). This rule picks those
ranges the way a GGUF type stores them:

- k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): where the scheme is a k-quant's codes and groups
  (export.kquants.SCHEME_KQUANTS: int4-asym/g32 -> Q4_K, int5-asym/g32 -> Q5_K, int6/g16 -> Q6_K,
  int3/g16 -> Q3_K, int2-asym/g16 -> Q2_K) and the row length is a multiple of 256, the super-block header
  is searched by our k-quant encoder with the Hessian's diagonal as importance (what llama.cpp's imatrix
  gives llama-quantize). Its effective scales d·sc are float32 products that float16 cannot hold, so such
  schemes store their scales in float32 (`gguf_scheme`); the export factors them back into the header.
- legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and rows that are not whole super-blocks: the format's own
  importance-weighted scale search, rounded to float16 so that the 32-blocks hold the ranges exactly.

GPTQ then sweeps with these ranges fixed, so its error compensation works for the stored grid rather than
for a grid the export would later replace.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from modelpress.formats.scheme import WeightScheme

SUPER_BLOCK = 256
SEARCH_STEPS = 20    # the format rule's scale search, as GPTQ's default shrink_steps


def kquant_type(scheme: WeightScheme) -> str | None:
    """The k-quant whose codes and groups are exactly the scheme's, or None."""
    from modelpress.export.kquants import SCHEME_KQUANTS

    group = scheme.group_size if scheme.granularity == "group" else None
    return SCHEME_KQUANTS.get((scheme.format, group))


def gguf_scheme(scheme: WeightScheme) -> WeightScheme:
    """The scheme with the scale storage a GGUF grid needs: float32 for a k-quant's schemes (d·sc products),
    else unchanged (legacy blocks store float16 scales, which the rule rounds to)."""
    if kquant_type(scheme) is not None and scheme.scale_dtype != "float32" and not scheme.double_quant:
        return replace(scheme, scale_dtype="float32")
    return scheme


def gguf_grid(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, offset), each (N, G), for an (N, K) weight: see the module docstring."""
    from modelpress.algorithms.quantize.gptq import format_grid
    from modelpress.export.kquants import kquant_grid

    importance = torch.diag(hessian).float().clamp_min(0)
    qtype = kquant_type(scheme)
    if qtype is not None and weight.shape[1] % SUPER_BLOCK == 0 and scheme.scale_dtype == "float32":
        grid = kquant_grid(weight, qtype, importance)
        return grid.scale.to(weight.device), None if grid.offset is None else grid.offset.to(weight.device)
    # searched and rounded as float16 scales, which float32 storage then holds exactly
    return format_grid(weight, replace(scheme, scale_dtype="float16"), importance, SEARCH_STEPS)
