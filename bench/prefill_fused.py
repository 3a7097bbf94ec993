"""Could one Triton kernel that decodes 4-bit codes inside a tensor-core GEMM beat dequantize-then-cuBLAS at
prefill (issue 13, item 4: int4 within 1.1x of bf16 cuBLAS at M >= 256)? A measured no, kept reproducible.

    PYTHONPATH=src python bench/prefill_fused.py --json prefill_fused.json

QuantLinear's prefill plan (triton_backend.choose_plan, M >= 65) decodes the weight to a bf16 copy and calls
cuBLAS. This bench times, per 7B shape and M, on random int4/g128 weights rotated past L2 (CUDA-graph replay,
medians, as bench/kernels.py):
- bf16: F.linear on bf16 weights (cuBLAS), and that plan (dequantize kernel + cuBLAS);
- plain: a Triton bf16 GEMM with the same tiles and loop as the fused kernels (grouped launch order, pointer
  loads pipelined by Triton, tl.dot on wgmma): how close Triton itself gets to cuBLAS here;
- fused, three ways of handing decoded codes to tl.dot: "scale-B" decodes a (BN, BK) tile of codes in registers
  (triton_kernels._decode_nibbles), applies the group scale in float32, rounds to bf16 (what the dequantize kernel
  writes) and multiplies x by its transpose; "swap" computes y^T = W x^T so the decoded tile is the A operand
  (wgmma reads A from registers, B from shared memory); "scale-acc" multiplies raw codes and scales each group's
  partial product in float32.
Every fused result is checked against x @ dequantize(W).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    print("bench/prefill_fused.py times Triton kernels on CUDA: Triton is not installed here, nothing to measure.")
    sys.exit(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kernels import ROTATE_BYTES, random_packed, time_sequence  # noqa: E402

from modelpress.nn.triton_backend import dequantize  # noqa: E402
from modelpress.nn.triton_kernels import _decode_nibbles  # noqa: E402

TILES = [(128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3),
         (128, 64, 64, 8, 4, 3), (64, 128, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3)]  # BM, BN, BK, GROUP_M, warps, stages
VARIANTS = {"scale-B": 0, "swap": 2, "scale-acc": 3}


@triton.jit
def _program_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, GROUP_M row blocks per column block in launch order."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BN)
    first_m = (pid // per_group) * GROUP_M
    rows = min(tl.cdiv(M, BM) - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def plain_gemm(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               GROUP_M: tl.constexpr):
    pid_m, pid_n = _program_tile(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    x_ptrs = x_ptr + tl.where(offs_m < M, offs_m, 0)[:, None] * K + cols[None, :]
    w_ptrs = w_ptr + tl.where(offs_n < N, offs_n, 0)[None, :] * K + cols[:, None]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BK
        w_ptrs += BK
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def fused_int4(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, G, stride_sn, stride_sg, VARIANT: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Symmetric int4 (code - 8) * scale, bf16 activations; VARIANT as VARIANTS."""
    pid_m, pid_n = _program_tile(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows_w = tl.where(offs_n < N, offs_n, 0)
    x_ptrs = x_ptr + tl.where(offs_m < M, offs_m, 0)[:, None] * K + tl.arange(0, BK)[None, :]
    q_ptrs = q_ptr + rows_w[:, None] * (K // 2) + tl.arange(0, BK // 2)[None, :]
    s_ptrs = s_ptr + rows_w * stride_sn
    if VARIANT == 2:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(x_ptrs)
        lo, hi = _decode_nibbles(tl.load(q_ptrs), s_ptr, 0, 8, tl.bfloat16, True)
        s = tl.load(s_ptrs + (k0 // G) * stride_sg).to(tl.float32)
        if VARIANT == 3:
            w = tl.reshape(tl.join(lo, hi), (BN, BK))
            acc += tl.dot(x, tl.trans(w)) * s[None, :]
        else:
            lo = (lo.to(tl.float32) * s[:, None]).to(tl.bfloat16)
            hi = (hi.to(tl.float32) * s[:, None]).to(tl.bfloat16)
            w = tl.reshape(tl.join(lo, hi), (BN, BK))
            if VARIANT == 2:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BK
        q_ptrs += BK // 2
    if VARIANT == 2:
        tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(tl.bfloat16),
                 mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])
    else:
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16),
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _uses_wgmma(compiled) -> bool:
    return "wgmma.mma_async" in compiled.asm.get("ptx", "")


def run(shapes, ms) -> list[dict]:
    rows = []
    for n, k in shapes:
        first = random_packed("int4/g128", n, k)
        packs = [first] + [random_packed("int4/g128", n, k) for _ in range(math.ceil(ROTATE_BYTES / first.nbytes) - 1)]
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                   for _ in range(math.ceil(ROTATE_BYTES / (n * k * 2)))]
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            bf16 = time_sequence([lambda w=w: F.linear(x, w) for w in weights], repeats=10)["graph_us"]
            plan = time_sequence([lambda p=p: F.linear(x, dequantize(p, x.dtype)) for p in packs], repeats=10)["graph_us"]
            ref = (x @ dequantize(first, torch.bfloat16).t()).float()
            base = {"N": n, "K": k, "M": m, "bf16_us": bf16, "dequant_plan_us": plan}
            print(f"N={n} K={k} M={m}: bf16 {bf16:.1f} us, dequantize + cuBLAS {plan:.1f} us ({plan / bf16:.2f}x)",
                  flush=True)
            for bm, bn, bk, group, warps, stages in TILES:
                grid = (_cdiv(m, bm) * _cdiv(n, bn),)
                tiles = dict(BM=bm, BN=bn, BK=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
                compiled = plain_gemm[grid](x, weights[0], y, m, n, k, **tiles)
                t = time_sequence([lambda w=w: plain_gemm[grid](x, w, y, m, n, k, **tiles) for w in weights],
                                  repeats=10)["graph_us"]
                rows.append({**base, "kernel": "plain", "tile": [bm, bn, bk, group, warps, stages], "us": t,
                             "wgmma": _uses_wgmma(compiled)})
                for name, variant in VARIANTS.items():
                    s = first.scale
                    args = (m, n, k, 128, s.stride(0), s.stride(1))
                    compiled = fused_int4[grid](x, first.qdata, s, y, *args, VARIANT=variant, **tiles)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    t = time_sequence([lambda p=p: fused_int4[grid](x, p.qdata, p.scale, y, *args, VARIANT=variant,
                                                                    **tiles) for p in packs], repeats=10)["graph_us"]
                    rows.append({**base, "kernel": name, "tile": [bm, bn, bk, group, warps, stages], "us": t,
                                 "rel_err": err, "wgmma": _uses_wgmma(compiled)})
            for name in ("plain", *VARIANTS):
                best = min((r for r in rows if r["N"] == n and r["K"] == k and r["M"] == m and r["kernel"] == name),
                           key=lambda r: r["us"])
                print(f"  {name:9s} best {best['us']:7.1f} us ({best['us'] / bf16:.2f}x bf16, "
                      f"{best['us'] / plan:.2f}x the plan) tile {best['tile']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("prefill_fused.json"))
    parser.add_argument("--ms", default="256,2048")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/prefill_fused.py times CUDA kernels: no CUDA device here, nothing to measure.")
        return 1
    torch.manual_seed(0)
    rows = run([(4096, 4096), (11008, 4096)], [int(v) for v in args.ms.split(",")])
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
