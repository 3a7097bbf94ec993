"""Every Triton/Gluon kernel compiles for the GPUs users bring, as the dispatch would launch it there.

tests/nn/arch_compile.py compiles each launch for a target without running it (Triton's bundled ptxas; no GPU
needed), in a process of its own per architecture. A kernel with an instruction the target lacks (PDL's
griddepcontrol before Hopper, max.xorsign.abs before 8.6, fp8 conversions before 8.9) fails here instead of at a
user's first call. Skipped where Triton is not installed (the CPU-only CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = Path(__file__).with_name("arch_compile.py")
# T4 (7.5), A100 (8.0), A10 / RTX 3090 (8.6), L4 / RTX 4090 (8.9), H100 / H200 (9.0)
ARCHITECTURES = ["7.5", "8.0", "8.6", "8.9", "9.0"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_kernel_compiles_for(arch):
    result = subprocess.run([sys.executable, str(CHECK), arch], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "every kernel compiles" in result.stdout
