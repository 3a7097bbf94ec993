"""Where the GGUF writer meets the k-quant encoder (export/kquants.py): None when no encoder for `qtype` exists,
so the writer falls back to gguf-py's reference quantizers for the legacy types."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def available(qtype: GGMLQuantizationType) -> bool:
    if qtype.name not in K_TYPES:
        return False
    try:
        from modelpress.export import kquants
    except ImportError:
        return False
    return qtype.name in getattr(kquants, "ENCODERS", {})


def quantize(array: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray | None:
    if not available(qtype):
        return None
    from modelpress.export import kquants

    return kquants.ENCODERS[qtype.name](array, importance)
