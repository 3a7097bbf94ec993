"""Native CPU matrix-vector kernels for decode-sized calls: cpu_gemv.c, compiled on first use for this machine
(with cpu_step.c, the whole decode step that inference/native_decode.py drives).

`native_matmul(x2, plan)` computes x2 (M, K) @ W^T for a packed weight of 4 or 8 bits straight from its stored
codes and scales (no prepared copy of the weight): in float32, the stored weight's exact product up to the order
of float32 additions, except that int4 and int4-asym multiply x rounded to bfloat16 where the CPU has AVX512_BF16
and 8-bit integer codes multiply x quantized to int16 in blocks of 32 (within 2^-16 of each block's largest)
where it has AVX512_VNNI (products="bfloat16", the default; or "int8": x quantized to int8 in blocks of 32 for those and 8-bit integer
formats, where the CPU has AVX512_VNNI; cpu_gemv.c says how). `plan_for(packed)` says whether and how a weight is
served.

Building: the C files are compiled with the system's C compiler (`cc`, or $CC) at -O3 -march=native into a shared
library under ~/.cache/modelpress/native (or $MODELPRESS_CACHE/native), named by a hash of the source, the
compiler, the flags and this CPU's feature flags, so a changed file or another machine builds its own; the
library is written to a temporary name and renamed, so concurrent first uses never load half a file. It is used
only where it compiled with AVX-512 or AVX2 + FMA + F16C (`isa()`); on other machines, or without a compiler, or
with MODELPRESS_CPU_NATIVE=0, `available()` is False and the CPU backend keeps PyTorch's kernels (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelpress.formats.packed import PackedWeight

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_gemv.c", "cpu_step.c"))   # compiled together
HEADER = Path(__file__).with_name("cpu_native.h")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-pthread")
SCALE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KINDS = {"int": 0, "fp8-e4m3": 1, "fp8-e5m2": 2}
FP8_UNITS = {"fp8-e4m3": 256.0, "fp8-e5m2": 1.0}   # see cpu_gemv.c: e4m3 widened through float16 reads as 2^-8 x
PRODUCTS = {"float32": 0, "bfloat16": 1, "int8": 2}   # cpu_native.h's MP_PRODUCTS_*


def cache_dir() -> Path:
    from modelpress.io.model import cache_dir as modelpress_cache   # the project's cache root ($MODELPRESS_CACHE)

    return modelpress_cache() / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    name = os.environ.get("CC", "cc")
    return shutil.which(name)


def build(extra_flags: tuple[str, ...] = (), directory: Path | None = None) -> Path:
    """Compile the library (cpu_gemv.c + cpu_step.c; if not already built for these sources, compiler, flags and
    CPU) and return its path. Raises RuntimeError with the compiler's message if it cannot."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, or $CC)")
    flags = FLAGS + tuple(extra_flags)
    sources = [path.read_bytes() for path in (*SOURCES, HEADER)]
    key = hashlib.sha256(b"\0".join([*sources, compiler.encode(), " ".join(flags).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"cpu_gemv-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            names = " + ".join(path.name for path in SOURCES)
            raise RuntimeError(f"{compiler} failed on {names}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Weight(ctypes.Structure):
    """cpu_gemv.c's mp_weight: a packed weight as the kernel reads it (addresses of the plan's own tensors)."""

    _fields_ = [("qdata", ctypes.c_void_p), ("q_row", ctypes.c_int64), ("table", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("s_n", ctypes.c_int64), ("s_g", ctypes.c_int64), ("o_n", ctypes.c_int64), ("o_g", ctypes.c_int64),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("bias", ctypes.c_float), ("unit", ctypes.c_float),
                ("bits", ctypes.c_int32), ("linear", ctypes.c_int32), ("kind", ctypes.c_int32),
                ("scale_type", ctypes.c_int32), ("offset_type", ctypes.c_int32)]


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.mp_isa.restype = ctypes.c_int
    lib.mp_isa.argtypes = []
    lib.mp_products.restype = ctypes.c_int
    lib.mp_products.argtypes = []
    lib.mp_gemv.restype = ctypes.c_int
    lib.mp_gemv.argtypes = [ctypes.POINTER(Weight), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    for name, restype, args in (("mp_forward", ctypes.c_int,
                                 [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]),
                                ("mp_forward_work", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64]),
                                ("mp_check", ctypes.c_int, [ctypes.c_void_p])):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, args
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels for this machine, or None (disabled, no compiler, or no vector unit they use)."""
    if os.environ.get("MODELPRESS_CPU_NATIVE", "1") == "0":
        return None
    try:
        lib = load(build())
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        log.warning("native CPU kernels unavailable (%s); PyTorch's CPU kernels serve decode", err)
        return None
    if lib.mp_isa() == 0:
        log.info("native CPU kernels built without AVX2/AVX-512; PyTorch's CPU kernels serve decode")
        return None
    return lib


def products_available(products: str, lib: ctypes.CDLL | None = None) -> bool:
    """Whether the build (`lib`, else library()) has `products` (PRODUCTS: float32 always; bfloat16 and int8 where
    the CPU has AVX512_BF16 / AVX512_VNNI)."""
    lib = lib or library()
    return lib is not None and (products == "float32" or bool(lib.mp_products() >> PRODUCTS[products] & 1))


def available() -> bool:
    return library() is not None


def isa() -> int:
    """512 (AVX-512), 513 (AVX-512 with bfloat16 products), 256 (AVX2 + FMA + F16C) or 0 (not available)."""
    lib = library()
    return 0 if lib is None else int(lib.mp_isa())


# ---- which weights are served, and how ----

@dataclass(frozen=True)
class NativePlan:
    """Everything about a packed weight's native call but x: the tensors are the packed weight's own, except
    `scale` for double-quantized scales (decoded once to float32) and `table` (the 16 levels of a 4-bit format)."""

    qdata: torch.Tensor
    format: str             # the format's name
    bits: int
    table: torch.Tensor | None
    linear: bool            # 4 bits: levels are code + bias (converted in registers, not looked up)
    kind: int
    bias: float
    unit: float
    scale: torch.Tensor
    offset: torch.Tensor | None
    group: int
    shape: tuple[int, int]
    input_perm: torch.Tensor | None
    weight: Weight = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]
    # ^ the addresses the kernel reads (set in __post_init__; the plan keeps their tensors alive)

    def __post_init__(self) -> None:
        n, k = self.shape
        s_n, s_g = _strides(self.scale)
        o_n, o_g = _strides(self.offset) if self.offset is not None else (0, 0)
        table = None if self.table is None else self.table.data_ptr()
        weight = Weight(self.qdata.data_ptr(), self.qdata.stride(0), table,
                        self.scale.data_ptr(), None if self.offset is None else self.offset.data_ptr(),
                        s_n, s_g, o_n, o_g, n, k, self.group, self.bias, self.unit, self.bits, int(self.linear),
                        self.kind, SCALE_TYPES[self.scale.dtype],
                        SCALE_TYPES[self.offset.dtype] if self.offset is not None else 0)
        object.__setattr__(self, "weight", weight)


@functools.cache
def _levels8(fmt_name: str) -> tuple[int, float, float] | None:
    """(kind, bias, unit) of an 8-bit format whose levels the C decode reproduces exactly, else None."""
    from modelpress.formats.base import get_format

    fmt = get_format(fmt_name)
    levels = fmt.levels.double()
    codes = torch.arange(256, dtype=torch.int64)
    if fmt_name in FP8_UNITS:
        kind, unit, bias = KINDS[fmt_name], FP8_UNITS[fmt_name], 0.0
        if fmt_name == "fp8-e5m2":
            half = codes << 8
        else:
            half = ((codes & 0x7F) << 7) | ((codes & 0x80) << 8)
        values = half.to(torch.int16).view(torch.float16).double() * unit
    else:
        kind, unit, bias = KINDS["int"], 1.0, float(levels[0])
        values = codes.double() + bias
    finite = torch.isfinite(levels)
    if not torch.equal(values[finite], levels[finite]):
        return None
    return kind, bias, unit


def group_fits(group: int, k: int) -> bool:
    """4 bits: groups the kernel spreads over its lanes (cpu_gemv.c): the whole row, a multiple of 128 codes, or
    8, 16, 32 or 64 codes (what both the AVX-512 and the AVX2 builds take)."""
    return group >= k or group % 128 == 0 or group in (8, 16, 32, 64)


def _param(t: torch.Tensor) -> bool:
    return t.dtype in SCALE_TYPES and t.dim() == 2


def plan_for(packed: PackedWeight) -> NativePlan | None:
    """How the native kernels serve `packed` (CPU tensors, 4 or 8 bits, scales the kernel reads), or None."""
    scheme = packed.scheme
    fmt = scheme.qformat
    n, k = packed.shape
    q = packed.qdata
    if q.device.type != "cpu" or q.dim() != 2 or q.stride(1) != 1 or fmt.bits not in (4, 8):
        return None
    if packed.scale_scale is not None:
        scale = packed.group_scales().contiguous()   # double quantization undone once
    else:
        scale = packed.scale
    if not _param(scale) or (packed.offset is not None and not _param(packed.offset)):
        return None
    group = k if scale.shape[1] == 1 else scheme.group_length(k)
    if scale.shape[1] != -(-k // group) or scale.shape[0] not in (1, n):
        return None
    table, linear, kind, bias, unit = None, False, 0, 0.0, 1.0
    if fmt.bits == 4:
        levels = fmt.levels.float()
        if levels.numel() != 16 or not torch.isfinite(levels).all() or not group_fits(group, k):
            return None
        table = levels.contiguous()
        linear = torch.equal(levels, torch.arange(16, dtype=torch.float32) + levels[0])
        bias = float(levels[0]) if linear else 0.0
    else:
        decode = _levels8(fmt.name)
        if decode is None:
            return None
        kind, bias, unit = decode
    perm = None if packed.input_perm is None else packed.input_perm.long()
    return NativePlan(q, fmt.name, fmt.bits, table, linear, kind, bias, unit, scale, packed.offset, group, (n, k), perm)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """Element strides (row, group) of a scale tensor, 0 along a dimension of one (shared value)."""
    return (0 if t.shape[0] == 1 else t.stride(0)), (0 if t.shape[1] == 1 else t.stride(1))


def native_matmul(x2: torch.Tensor, plan: NativePlan, lib: ctypes.CDLL | None = None,
                  products: str = "bfloat16") -> torch.Tensor:
    """(M, K) activations -> (M, N) float32 through the native kernel: `lib` (a `load`ed build), else library(),
    which must not be None. products (PRODUCTS): "bfloat16" lets linear 4-bit formats (int4, int4-asym) take
    bfloat16 products where the CPU has them (x rounded to bfloat16, as PyTorch's int4 kernel does; on AVX2 builds x
    quantized to int16 in blocks of 32 instead), and 8-bit integer formats x quantized to int16 in blocks of 32 where
    it has AVX512_VNNI (a finer rounding); "int8" also lets
    them and 8-bit integer formats take x quantized to int8 in blocks of 32 where the CPU has AVX512_VNNI (as
    llama.cpp's CPU matmuls do); "float32" keeps float32 products."""
    lib = lib or library()
    x = x2 if x2.dtype == torch.float32 else x2.float()
    if plan.input_perm is not None:
        x = x.index_select(1, plan.input_perm)
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.shape[0]
    y = torch.empty((m, plan.shape[0]), dtype=torch.float32)
    status = lib.mp_gemv(ctypes.byref(plan.weight), x.data_ptr(), m, y.data_ptr(), PRODUCTS[products])
    if status == -1:
        raise MemoryError("native CPU kernel: no scratch memory")
    if status != 0:
        raise ValueError(f"native CPU kernel: groups of {plan.group} columns in rows of {plan.shape[1]} are not served")
    return y
