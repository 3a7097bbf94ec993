"""Compile every Triton and Gluon kernel modelpress launches for another GPU architecture, with no such GPU.

    python tests/nn/arch_compile.py 8.0 [8.6 8.9 9.0 ...]    # exit status 1 if any kernel fails to compile

The kernels' PTX may use instructions a GPU lacks (griddepcontrol needs Hopper, max.xorsign.abs 8.6, fp8
products 8.9); ptxas refuses them only when the kernel is compiled for that GPU, i.e. at a user's first call.
This script makes every launch the dispatch code would make on a GPU of the given compute capability compile
for it instead of running: Triton's driver reports that target, a launch compiles and returns, tensors are CPU
tensors that claim to be CUDA tensors, and triton_backend is told the capability. Each case goes through the
public entry points (QuantLinear's matmul at M = 1, 16 and 256, the decode-time norms, rotary embedding,
activation, KV writes and split-cache attention, the dynamic int8 and fp8 layers), so a capability gate missing
in the dispatch shows up as a failure here. Needs Triton (its bundled ptxas), not a GPU or a CUDA driver.
Run in a process of its own: it replaces Triton's active driver and patches torch.Tensor.is_cuda.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
COMPILED: list[str] = []  # the kernels each case launched (compiled), for the report


def _install(cap: tuple[int, int]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit
    from triton.runtime.driver import driver

    class OfflineDriver:  # what JITFunction.run asks of the driver before it compiles
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", cap[0] * 10 + cap[1], 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(OfflineDriver())
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        COMPILED.append(self.fn.__name__)
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    jit.JITFunction.run = compile_only  # Gluon kernels are JITFunctions too
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.get_device_capability = lambda device=None: cap
    torch.cuda.get_device_properties = lambda device=None: type("Props", (), {"multi_processor_count": 132})()
    torch.cuda.current_device = lambda: 0
    # cuBLAS's fp8 GEMM (the FP8 layers from 65 rows on 8.9+) is a library call, nothing to compile: an empty result
    torch._scaled_mm = lambda a, b, out_dtype=None, **kwargs: torch.empty(a.shape[0], b.shape[1], dtype=out_dtype)
    from modelpress.nn import triton_backend

    triton_backend.device_capability = lambda device: cap
    triton_backend._direct_launch = lambda *args, **kwargs: (_ for _ in ()).throw(AttributeError)  # no raw launch
    del triton


def _cases(cap: tuple[int, int]):
    """(name, thunk) for each launch to compile on a GPU of capability `cap`."""
    from modelpress.formats import WeightScheme, quantize_weight
    from modelpress.nn import dynamic, dynamic_fp8, triton_act, triton_attention, triton_kv, triton_norm, triton_rope
    from modelpress.nn.triton_backend import prepared_linear, quantized_matmul

    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.bfloat16, torch.float16]  # bfloat16 too on the T4: emulated by Triton, not refused
    n, k = 256, 512
    weight = torch.randn(n, k, generator=gen)
    for spec in ["int4/g128", "int4-asym/g128", "nf4/g64", "int8/channel", "int8-asym/g128", "fp8-e4m3/channel",
                 "fp8-e5m2/g64"]:
        packed = quantize_weight(weight, WeightScheme.parse(spec))
        for dtype in dtypes:
            for m in (1, 16, 256):
                x = torch.randn(m, k, generator=gen).to(dtype)
                yield f"{spec} matmul M={m} {dtype}", lambda x=x, p=packed: quantized_matmul(x, p, None)
            x = torch.randn(1, k, generator=gen).to(dtype)
            yield f"{spec} prepared M=1 {dtype}", lambda x=x, p=packed: prepared_linear(x, p, None)
    from modelpress.nn import triton_backend
    from modelpress.nn.mma_ptx import fragment_order, interleave_rows, mma_layout

    wide = torch.randn(6400, k, generator=gen)  # rows enough for the tensor-core GEMV's plan (3 tiles per SM)
    triton_backend.MMA_FORMATS = ("int4", "int4-asym", "nf4")  # every format the kernel reads
    triton_backend.MMA_SPLIT_K = True  # and its split-K launches
    for spec in ["int4/g128", "int4-asym/g128", "nf4/g64"]:  # from 8.0, decode re-lays 4-bit codes (tensor-core GEMV)
        packed = quantize_weight(wide, WeightScheme.parse(spec))
        served = triton_backend.mma_supported(packed)

        def planned(spec=spec, served=served):  # mma.sync's m16n8k16: from 8.0 on, and only there
            if served != (cap >= triton_backend.MMA_CAPABILITY):
                raise AssertionError(f"{spec}: the tensor-core GEMV is {'' if served else 'not '}planned for {cap}")

        yield f"{spec} re-laid where mma.sync serves it", planned
        if not served:
            continue
        words = mma_layout(packed.qdata, 6400, k, triton_backend.mma_order(packed))
        for dtype in dtypes:
            for m in (1, 16):
                x = torch.randn(m, k, generator=gen).to(dtype)
                yield f"{spec} re-laid M={m} {dtype}", lambda x=x, p=packed, w=words: \
                    triton_backend.prepared_mma_linear(x, w, p, None)(x)
            x = torch.randn(4, k, generator=gen).to(dtype)  # the rows mode reading x's copy in fragment order
            x.mma_laid = fragment_order(x)
            yield f"{spec} re-laid M=4 laid {dtype}", lambda x=x, p=packed, w=words: \
                triton_backend.prepared_mma_linear(x, w, p, None, laid=True)(x)
        if spec == "int4-asym/g128":
            continue
        rows = interleave_rows(6400)  # as a gated MLP's [gate | up]: the activation in the epilogue
        gated = mma_layout(packed.qdata[rows], 6400, k, triton_backend.mma_order(packed))
        x = torch.randn(1, k, generator=gen).to(dtypes[0])
        yield f"{spec} re-laid [gate | up], activation, M=1", lambda x=x, p=packed, w=gated: \
            triton_backend.prepared_mma_linear(x, w, p, None, interleave=True, act=True)(x)
        x = torch.randn(16, k, generator=gen).to(dtypes[0])
        yield f"{spec} re-laid [gate | up], M=16", lambda x=x, p=packed, w=gated: \
            triton_backend.prepared_mma_linear(x, w, p, None, interleave=True)(x)
    short = torch.randn(1024, 4096, generator=gen)  # too few row tiles to fill the GPU: K split across programs
    for spec in ["int4/g128", "nf4/g64"]:
        packed = quantize_weight(short, WeightScheme.parse(spec))
        if not triton_backend.mma_supported(packed):
            continue
        if triton_backend.mma_plan(1024, 4096, spec.startswith("nf4"), 132)["split"] < 2:
            raise AssertionError(f"{spec}: a 1024-row weight is planned without split-K")
        words = mma_layout(packed.qdata, 1024, 4096, triton_backend.mma_order(packed))
        x = torch.randn(1, 4096, generator=gen).to(dtypes[0])
        yield f"{spec} re-laid, split K, M=1", lambda x=x, p=packed, w=words: \
            triton_backend.prepared_mma_linear(x, w, p, None)(x)
    tall = torch.randn(5376, 2048, generator=gen)  # rows enough for the GEMV plan without split-K (a cp.async ring)
    for spec in ["int4/g128", "nf4/g64"]:
        packed = quantize_weight(tall, WeightScheme.parse(spec))
        x = torch.randn(1, 2048, generator=gen).to(dtypes[0])
        yield f"{spec} matmul M=1 5376x2048", lambda x=x, p=packed: quantized_matmul(x, p, None)
    for dtype in dtypes + [torch.float32]:
        x = torch.randn(1, 1, 4096, generator=gen).to(dtype)
        w = torch.randn(4096, generator=gen).to(dtype)
        yield f"rms_norm {dtype}", lambda x=x, w=w: triton_norm.rms_norm(x, w, 1e-5, False)
        yield f"rms_norm gemma {dtype}", lambda x=x, w=w: triton_norm.rms_norm(x, w, 1e-5, True)
        yield f"add_rms_norm {dtype}", lambda x=x, w=w: triton_norm.add_rms_norm(x, x.clone(), w, 1e-5)
        rows = torch.randn(1, 6, 4096, generator=gen).to(dtype)  # 6 rows: their copy in fragment order beside them
        yield f"rms_norm laid {dtype}", lambda x=rows, w=w: triton_norm.rms_norm(x, w, 1e-5, False, laid=True)
        yield f"add_rms_norm laid {dtype}", lambda x=rows, w=w: triton_norm.add_rms_norm(x, x.clone(), w, 1e-5,
                                                                                        laid=True)
        q, kk = torch.randn(1, 32, 1, 128).to(dtype), torch.randn(1, 8, 1, 128).to(dtype)
        cos, sin = torch.randn(1, 1, 128).to(dtype), torch.randn(1, 1, 128).to(dtype)
        yield f"rotary {dtype}", lambda q=q, kk=kk, c=cos, s=sin: triton_rope.rotary(q, kk, c, s)
        h = torch.randn(1, 1, 2 * 1024).to(dtype)
        yield f"silu_mul {dtype}", lambda h=h: triton_act.silu_mul(h)
        keys = torch.zeros(1, 8, 64, 128, dtype=dtype)
        yield f"write_kv {dtype}", lambda keys=keys, kk=kk: triton_kv.write_kv(
            keys, keys.clone(), torch.tensor([3]), kk, kk.clone())
        codes8, scales8 = torch.zeros(1, 8, 64, 128, dtype=torch.uint8), torch.zeros(1, 8, 64, 1, dtype=torch.half)
        yield f"write_kv_int8 {dtype}", lambda c=codes8, s=scales8, kk=kk: triton_kv.write_kv_int8(
            c, s, c.clone(), s.clone(), torch.tensor([3]), kk, kk.clone())
        cache = torch.randn(1, 8, 640, 128).to(dtype)
        yield f"decode_attention GQA {dtype}", lambda q=q, c=cache: triton_attention.decode_attention(
            q, c, c.clone(), None, 0.088)
        q5 = torch.randn(1, 8, 5, 128).to(dtype)
        mask = torch.zeros(1, 1, 5, 640, dtype=dtype)
        yield f"decode_attention 5 tokens {dtype}", lambda q=q5, c=cache, m=mask: triton_attention.decode_attention(
            q, c, c.clone(), m, 0.088)
        codes, scales = torch.randint(0, 256, (1, 8, 640, 128), dtype=torch.uint8), torch.rand(1, 8, 640, 1).half()
        yield f"decode_attention int8 codes decoded {dtype}", lambda q=q, c=codes, s=scales: _vector_rows(
            lambda: triton_attention.decode_attention(q, c, c.clone(), None, 0.088, key_scale=s, value_scale=s.clone()),
            fold=False, vector=False)
        yield f"decode_attention int8 codes, scales folded {dtype}", lambda q=q, c=codes, s=scales: _vector_rows(
            lambda: triton_attention.decode_attention(q, c, c.clone(), None, 0.088, key_scale=s, value_scale=s.clone()),
            fold=True, vector=False)
        q8 = torch.randn(1, 8, 1, 128).to(dtype)  # one query row a key/value head: the VECTOR_ROWS variant
        yield f"decode_attention one row {dtype}", lambda q=q8, c=cache: _vector_rows(
            lambda: triton_attention.decode_attention(q, c, c.clone(), None, 0.088))
        yield f"decode_attention one row, codes decoded {dtype}", lambda q=q8, c=codes, s=scales: _vector_rows(
            lambda: triton_attention.decode_attention(q, c, c.clone(), None, 0.088, key_scale=s, value_scale=s.clone()))
        yield f"decode_attention one row, codes, scales folded {dtype}", lambda q=q8, c=codes, s=scales: _vector_rows(
            lambda: triton_attention.decode_attention(q, c, c.clone(), None, 0.088, key_scale=s, value_scale=s.clone()),
            fold=True)
    int8 = quantize_weight(weight, WeightScheme.parse("int8/channel"))
    fp8 = quantize_weight(weight, WeightScheme.parse("fp8-e4m3/channel"))
    for dtype in dtypes:
        for m in (1, 16, 256):
            x = torch.randn(m, k, generator=gen).to(dtype)
            yield f"dynamic int8 M={m} {dtype}", lambda x=x: dynamic.dynamic_int8_linear(x, int8, None)
            yield f"dynamic fp8 M={m} {dtype}", lambda x=x: dynamic_fp8.dynamic_fp8_linear(x, fp8, None)


def _vector_rows(run, fold: bool = False, vector: bool = True):
    """run() with triton_attention's one-row kernels taken wherever a key/value head has one query row (never, if
    not `vector`) and FOLD_CODE_SCALES set to `fold`."""
    from modelpress.nn import triton_attention

    names = ("VECTOR_ROWS", "VECTOR_MIN_WAVES", "FOLD_CODE_SCALES")
    before = [getattr(triton_attention, name) for name in names]
    for name, value in zip(names, (vector, 0.0, fold)):
        setattr(triton_attention, name, value)
    try:
        return run()
    finally:
        for name, value in zip(names, before):
            setattr(triton_attention, name, value)


def check(cap: tuple[int, int], verbose: bool = False) -> list[str]:
    """Names (with the compiler's first error line) of the launches that fail to compile for `cap`."""
    _install(cap)
    failures = []
    for name, thunk in _cases(cap):
        COMPILED.clear()
        try:
            thunk()
            if verbose:
                print(f"  {name}: {', '.join(COMPILED) or 'no kernel (served elsewhere)'}")
        except Exception as err:  # noqa: BLE001  (what fails, and how, is the report)
            lines = [line.strip() for line in str(err).splitlines() if "error" in line.lower()] or [
                traceback.format_exception_only(err)[-1].strip()]
            failures.append(f"{name}: {lines[0][:300]}")
    return failures


def main() -> int:
    verbose = "-v" in sys.argv
    args = [arg for arg in sys.argv[1:] if arg != "-v"]
    if len(args) != 1:  # one architecture per process: Triton caches the target per device
        import subprocess

        codes = [subprocess.call([sys.executable, __file__, arch, *(["-v"] if verbose else [])])
                 for arch in args or ["8.0"]]
        return max(codes)
    major, minor = (int(part) for part in args[0].split("."))
    failures = check((major, minor), verbose)
    print(f"sm_{major}{minor}: {'every kernel compiles' if not failures else f'{len(failures)} launches fail'}")
    for line in failures:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
