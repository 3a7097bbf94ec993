"""Compile the M = 1 Gluon GEMV for an H100/H200 (sm_90) on a machine without a GPU and count its SASS.

Triton's wheel carries ptxas and nvdisasm, so a kernel can be built for any target offline. This prints the
instructions of the kernel's main loop (the basic block with the most instructions that branches back to
itself) by opcode, and per weight: the GEMV streams weights, so instructions per weight bound its rate where
issue, not memory, is the limit (an SM issues 4 warp-instructions per cycle).

    PYTHONPATH=src python bench/sass.py --spec int4/g128 --n 4096 --k 4096
    PYTHONPATH=src python bench/sass.py --spec nf4/g64 --n 11008 --k 4096 --dump nf4.sass
    PYTHONPATH=src python bench/sass.py --mma --spec int4/g128 --n 12288 --k 4096   # the tensor-core GEMV

Needs Triton with Gluon (pip install triton) but no GPU and no CUDA driver.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def compile_gemv(spec: str, n: int, k: int, half: bool, kernel_name: str = "gemv4_gluon_kernel"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from modelpress.formats.scheme import WeightScheme
    from modelpress.nn import gluon_gemv, triton_backend

    scheme = WeightScheme.parse(spec)
    config = triton_backend.gluon_gemv_plan(n, k, min(scheme.group_size or 128, 128))
    scale_shape = (n, k // scheme.group_size) if scheme.group_size else (n, 1)
    launch = triton_backend._gemv_launch(scheme, (n, k), scale_shape, 1, False, False, config)
    constants = {**launch.constants, "USE_ASM": True}
    half = half and constants["KIND"] == 0  # float16-pair products: int4 only
    if half:
        dot, pairs = gluon_gemv.half_asm(constants["ZERO"], constants["AFFINE"], bf16=True)
        constants.update(HALF=True, DOT_ASM=dot, PAIRS_ASM=pairs)
    options = {"num_warps": constants.pop("num_warps"), "num_stages": constants.pop("num_stages")}
    constants.pop("launch_pdl", None)
    scale = "fp16" if scheme.scale_dtype == "float16" else "fp32"
    split = launch.grid[2] > 1
    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": f"*{scale}", "offset_ptr": f"*{scale}",
                 "perm_ptr": f"*{scale}", "table_ptr": f"*{scale}", "bias_ptr": f"*{scale}", "y_ptr": "*bf16",
                 "ws_ptr": "*fp32" if split else "*bf16", "lock_ptr": "*i32" if split else "*bf16",
                 "N": "i32", "K": "i32", "group_size": "i32", "k_per_split": "i32", "exponent_bits": "i32",
                 "stride_wn": "i32", "stride_sn": "i32", "stride_sg": "i32"}
    kernel = getattr(gluon_gemv, kernel_name)
    for name in kernel.arg_names:
        if name not in signature:
            signature[name] = "constexpr"
    # what Triton's launcher specializes on at run time: 16-byte aligned pointers, integers divisible by 16
    values = {"N": n, "K": k, "group_size": launch.group_size, "k_per_split": launch.k_per_split,
              "exponent_bits": 0x4B000000, "stride_wn": k // 8, "stride_sn": scale_shape[1], "stride_sg": 1}
    aligned = [name for name, kind in signature.items()
               if kind.startswith("*") or (kind == "i32" and values[name] % 16 == 0)]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = GluonASTSource(kernel, signature, constants, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled, config, launch


def compile_mma_gemv(spec: str, n: int, k: int, variant: str = "plain", x_mode: str = "plain",
                     plan: dict | None = None, depth: int = 1):
    """gluon_mma_gemv's kernel for `spec` (int4, int4-asym or nf4, bfloat16 activations) with the plan decode uses;
    (compiled, weights per thread per loop step). variant: plain, split (split-K), interleave ([gate | up] rows
    interleaved), act (interleaved, with the activation in the epilogue) or rows (the rows mode: up to 8 activation
    rows)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from modelpress.formats.scheme import WeightScheme
    from modelpress.nn import gluon_mma_gemv, mma_ptx, triton_backend

    scheme = WeightScheme.parse(spec)
    nf4, affine = scheme.format == "nf4", scheme.qformat.affine
    config = plan or (triton_backend.MMA_NF4_CONFIG if nf4 else triton_backend.MMA_CONFIG)
    zero = 0 if affine else 8
    fragments = {"rows": 1, "rows16": 2}.get(variant, 0)
    constants = dict(MMA_ASM=mma_ptx.mma_asm(True, nf4, fragments), XSUM_ASM=mma_ptx.xsum_asm(True, fragments),
                     MMA_CONSTRAINTS=mma_ptx.mma_constraints(nf4, fragments),
                     XSUM_CONSTRAINTS=mma_ptx.xsum_constraints(fragments), FRAGMENTS=fragments,
                     CORRECTION=0.0 if nf4 else mma_ptx.MAGIC[True] + zero, AFFINE=affine,
                     GS=scheme.group_length(k), EVEN=True, RT=config["rows_per_thread"], CS=config["chunks_per_step"],
                     WR=config["warps_rows"], WK=config["warps_k"], PDL=True, XSUM=not nf4 or affine, NF4=nf4,
                     SPLIT_K=variant == "split", SPLITS=4 if variant == "split" else 1,
                     INTERLEAVE=variant in ("interleave", "act"), ACT=variant == "act", XL=x_mode == "laid",
                     DEPTH=depth)
    kernel = gluon_mma_gemv.gemv4_mma_kernel
    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp16", "offset_ptr": "*fp16", "table_ptr": "*i32",
                 "y_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32", "N": "i32", "chunks": "i32",
                 "chunks_per_split": "i32", "stride_sn": "i32", "stride_sg": "i32", "M": "i32"}
    for name in kernel.arg_names:
        signature.setdefault(name, "constexpr")
    aligned = ["x_ptr", "w_ptr", "scale_ptr", "offset_ptr", "table_ptr", "y_ptr", "ws_ptr", "lock_ptr", "N", "chunks",
               "chunks_per_split", "stride_sn"]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = GluonASTSource(kernel, signature, constants, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config["warps_rows"] * config["warps_k"]})
    return compiled, config["rows_per_thread"] * config["chunks_per_step"] * 32


def sass_of(cubin: bytes) -> str:
    from triton.backends.nvidia import compiler as nv

    tool = Path(nv.__file__).parent / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-c", "-hex", f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> str:
    """cuobjdump's "REG:.. STACK:.. SHARED:.." line of the kernel."""
    from triton.backends.nvidia import compiler as nv

    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:\d+.*", out)
    return found.group(0).strip() if found else "?"


def main_loop(sass: str) -> list[str]:
    """Opcodes of the largest basic block that ends in a branch back to its own label."""
    blocks: dict[str, list[str]] = {}
    label, current = None, []
    best: list[str] = []
    for line in sass.splitlines():
        m = re.match(r"^\.(L_x_\d+):", line.strip())
        if m:
            label, current = m.group(1), []
            blocks[label] = current
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*?);", line)
        if m and label is not None:
            current.append(m.group(2))
            if m.group(2).startswith("BRA") and label in m.group(3) and len(current) > len(best):
                best = list(current)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="int4/g128")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--kernel", default="gemv4_gluon_kernel")
    p.add_argument("--float32", action="store_true", help="the float32 inner product instead of HALF")
    p.add_argument("--dump", type=Path, default=None, help="write the whole SASS here")
    p.add_argument("--mma", action="store_true", help="the tensor-core GEMV (gluon_mma_gemv) with decode's plan")
    p.add_argument("--x", default="plain", choices=["plain", "laid"],
                   help="with --variant rows/rows16: x as stored or laid out in fragment order")
    p.add_argument("--depth", type=int, default=1, help="with --mma: loop steps of weights in flight (1 or 2)")
    p.add_argument("--plan", default=None, help="with --mma: RT,CS,WR,WK instead of decode's plan")
    p.add_argument("--variant", default="plain", choices=["plain", "split", "interleave", "act", "rows", "rows16"],
                   help="with --mma: split-K, [gate | up] rows interleaved, or interleaved with the activation")
    args = p.parse_args()
    if args.mma:
        plan = None
        if args.plan:
            rt, cs, wr, wk = (int(v) for v in args.plan.split(","))
            plan = dict(rows_per_thread=rt, chunks_per_step=cs, warps_rows=wr, warps_k=wk)
        compiled, weights_per_thread = compile_mma_gemv(args.spec, args.n, args.k, args.variant, args.x, plan,
                                                        args.depth)
        print(f"{args.spec} {args.n}x{args.k}, tensor-core GEMV: {weights_per_thread} weights per thread per loop "
              f"step; {resource_usage(compiled.asm['cubin'])}")
    else:
        compiled, config, launch = compile_gemv(args.spec, args.n, args.k, not args.float32, args.kernel)
        step = launch.constants["BKG"] * launch.constants["SUB"]
        threads = config.num_warps * 32
        weights_per_thread = config.BN * step / threads
        print(f"{args.spec} {args.n}x{args.k}: BN {config.BN}, step {step} columns, {threads} threads, "
              f"{weights_per_thread:.0f} weights per thread per loop step; {resource_usage(compiled.asm['cubin'])}")
    sass = sass_of(compiled.asm["cubin"])
    if args.dump:
        args.dump.write_text(sass)
    loop = main_loop(sass)
    counts = collections.Counter(op.split(".")[0] for op in loop)
    print(f"loop: {len(loop)} instructions, {len(loop) / weights_per_thread:.2f} per weight")
    print("  " + ", ".join(f"{op} {c}" for op, c in counts.most_common()))


if __name__ == "__main__":
    main()
