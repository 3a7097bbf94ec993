"""Which tensor-core tiles triton_backend.choose_plan gives small M (batched decoding, verify passes); runs without a
GPU or Triton. tests/nn/test_triton_gemv.py checks the tiles' results."""

from __future__ import annotations

import pytest

from modelpress.nn import triton_backend
from modelpress.nn.triton_backend import choose_plan

SEVEN_B = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # q/k/v, o, gate/up, down


def test_int4_in_groups_of_128_take_the_small_m_tiles_split_towards_the_target():
    bn, sub, _, per_sm, min_steps = triton_backend.SMALL_M_TILES
    for m in (2, 9, 16):
        for n, k in SEVEN_B:
            plan = choose_plan(m, n, k, 128, 132, True)
            assert (plan.BM, plan.BN, plan.SUB, plan.gemv, plan.dequant) == (16, bn, sub, False, False)
            assert k // (plan.BKG * sub * plan.SPLIT) >= min_steps  # every split keeps its loop steps
            programs = -(-n // bn) * plan.SPLIT
            # split no further than the target asks: halving the split would fall short of it
            assert plan.SPLIT == 1 or programs // 2 < per_sm * 132
    # the sweep's per-shape best splits (bench/kernel_sweep.py --ms 16 --wide, H100)
    assert [choose_plan(16, n, k, 128, 132, True).SPLIT for n, k in SEVEN_B] == [2, 4, 1, 4]


def test_nf4_in_groups_of_64_take_them_too():
    bn, sub, *_ = triton_backend.SMALL_M_TILES
    plans = [choose_plan(16, n, k, 64, 132, True, 1) for n, k in SEVEN_B]
    assert all((p.BN, p.SUB, p.BKG) == (bn, sub, 64) for p in plans)
    assert [p.SPLIT for p in plans] == [2, 4, 1, 4]  # the nf4/g64 sweep's best or within 5% of it


@pytest.mark.parametrize("kind", [triton_backend.KIND_INT8, triton_backend.KIND_FP8E4])
def test_wide_8bit_weights_take_them_at_one_row_too(kind):
    bn, sub, *_ = triton_backend.SMALL_M_TILES
    other = triton_backend.SMALL_M_TILES_OTHER[0]
    for m in (1, 16):  # 8-bit weights have no GEMV: one row runs the tiles
        plans = [choose_plan(m, n, k, 128, 132, False, kind) for n, k in SEVEN_B]
        assert all((p.BM, p.gemv) == (16, False) for p in plans)
        # rows for two programs a multiprocessor (12288 and 22016 on 132): the small-M tiles, as the H100 timed
        # them better (--against-old-tiles); 4096 rows keep the other tiles, which were better there
        assert [(p.BN, p.SUB, p.SPLIT) for p in plans] == [(bn, sub, 2), (other, 1, 4), (bn, sub, 1), (other, 1, 8)]
    assert choose_plan(16, 8448, 4096, 128, 132, False, kind).BN == bn  # 264 tiles: 2 a SM
    assert choose_plan(16, 8416, 4096, 128, 132, False, kind).BN == other
    assert choose_plan(16, 8448, 4096, 128, 144, False, kind).BN == other  # more SMs, wider


def test_other_weights_keep_the_other_tiles():
    other = triton_backend.SMALL_M_TILES_OTHER[0]
    assert choose_plan(16, 4096, 4096, 64, 132, True).BN == other  # int4 in groups of 64
    assert choose_plan(16, 4096, 4096, 128, 132, True, 1).BN == other  # NF4 in groups of 128
    assert choose_plan(16, 4096, 4096, 128, 132, False).BN == other  # 4-bit codes that do not view as words
    assert choose_plan(16, 4096, 4096, 128, 132, False, triton_backend.KIND_FP8E4).BN == other  # fp8
    assert choose_plan(16, 4096, 4096, 64, 132, False, triton_backend.KIND_INT8).BN == other  # int8 in groups of 64
    wide = choose_plan(32, 4096, 4096, 128, 132, True)
    assert (wide.BM, wide.num_warps) == (32, 4)  # more than 16 rows: the BM = 32 tiles
    assert choose_plan(1, 4096, 4096, 128, 132, True).gemv  # one row of 4-bit weights: the GEMV
