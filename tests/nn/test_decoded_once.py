"""Evaluation decodes each packed weight once (nn.backends.decoded_once): same numbers, fewer decodes."""

import torch
from conftest import build_tiny_llama

from modelpress.algorithms.quantize.rtn import RTNConfig, quantize_rtn
from modelpress.eval.quality import evaluate_quality
from modelpress.formats.packed import PackedWeight
from modelpress.formats.scheme import WeightScheme
from modelpress.nn import backends


def counted(monkeypatch) -> dict:
    calls = {"n": 0}
    original = PackedWeight.dequantize

    def dequantize(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PackedWeight, "dequantize", dequantize)
    return calls


def test_evaluation_decodes_each_weight_once_and_changes_nothing(monkeypatch):
    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    windows = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = counted(monkeypatch)
    once = evaluate_quality({"m": model}, windows)["m"]
    assert calls["n"] == 14                            # 2 blocks x 7 layers, for 3 windows
    monkeypatch.setattr(backends, "_decoded", lambda packed, dtype: packed.dequantize(dtype))
    calls["n"] = 0
    every = evaluate_quality({"m": model}, windows)["m"]
    assert calls["n"] == 3 * 14
    assert once == every


def test_the_cache_ends_with_its_context_and_respects_its_budget(monkeypatch):
    model = build_tiny_llama()
    quantize_rtn(model, RTNConfig(WeightScheme.parse("int4/g32")))
    ids = torch.randint(0, 100, (1, 8))
    calls = counted(monkeypatch)
    with torch.no_grad(), backends.decoded_once(budget_bytes=0):   # nothing fits: decodes on every forward
        model(ids)
        model(ids)
    assert calls["n"] == 28
    with torch.no_grad():
        model(ids)
    assert calls["n"] == 42 and not backends._DECODED
