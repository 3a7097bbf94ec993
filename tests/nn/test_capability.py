"""What the GPU's compute capability turns off in a kernel plan (triton_backend.for_capability); runs without a GPU.
tests/nn/test_arch_compile.py compiles every launch for each of these GPUs."""

from __future__ import annotations

import pytest

from modelpress.nn.triton_backend import KernelConfig, choose_plan, for_capability

GEMV = choose_plan(1, 4096, 4096, 128, 132, True)  # the Hopper plan of an int4 GEMV


def test_hopper_keeps_the_plan():
    assert for_capability(GEMV, (9, 0)) is GEMV
    assert for_capability(GEMV, (10, 0)) is GEMV


@pytest.mark.parametrize("cap, pdl, half, native_fp8, stages", [
    ((8, 9), False, True, True, 4),     # L4, RTX 4090: no griddepcontrol
    ((8, 6), False, True, False, 4),    # A10, RTX 3090: no e4m3 conversions either
    ((8, 0), False, False, False, 4),   # A100: no max.xorsign.abs (float16-pair products) either
    ((7, 5), False, False, False, 1),   # T4: no cp.async either
])
def test_older_gpus_lose_what_they_cannot_run(cap, pdl, half, native_fp8, stages):
    config = for_capability(KernelConfig(gemv=True, gluon=True, pdl=True, stages=4), cap)
    assert (config.pdl, config.half, config.native_fp8, config.stages) == (pdl, half, native_fp8, stages)
    assert for_capability(GEMV, cap).BN == GEMV.BN and for_capability(GEMV, cap).SPLIT == GEMV.SPLIT


def test_a_feature_already_off_stays_off():
    config = KernelConfig(pdl=False, half=False, native_fp8=False, stages=1)
    assert for_capability(config, (9, 0)) == config
