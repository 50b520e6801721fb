"""The C++ kernels at every ISA level: AVX-512, AVX2 (x86-64-v3) and the SSE2 baseline.

The extension holds all three and picks one at import from the CPU's features, capped by
RCGRPO_CPU_ISA. A CI machine usually runs only its best level; here tests/test_cpp_backend.py (all
its float64 references, odd shapes, dtypes, layouts, thread counts and buffer checks) runs again in
a subprocess for each lower level, so that every code path executes and matches the references.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_backend

pytestmark = requires_backend("cpp")

HERE = Path(__file__).resolve().parent
LEVELS = ["baseline", "avx2", "avx512"]


def _detected() -> str:
    from rcgrpo_kernels import _C

    return _C.cpu_isa_detected()


def _env(**extra):
    env = dict(os.environ)
    env.pop("RCGRPO_CPU_ISA", None)
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("level", ["avx2", "baseline"])
def test_cpp_backend_suite_passes_at_a_capped_isa(level):
    if LEVELS.index(_detected()) < LEVELS.index(level):
        pytest.skip(f"this CPU supports only {_detected()}, so RCGRPO_CPU_ISA={level} cannot be exercised")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(HERE / "test_cpp_backend.py"),
           "-k", "not without_extension"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(HERE.parent),
                          env=_env(RCGRPO_CPU_ISA=level))
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert "PASSED tests/test_cpp_backend.py::test_cpu_isa_matches_environment" in proc.stdout, tail
    assert " failed" not in proc.stdout.splitlines()[-1], tail


def test_isa_cap_is_reported_and_an_unknown_value_is_refused():
    code = ("import rcgrpo_kernels._C as C, rcgrpo_kernels.cpp_ops as ops; "
            "print(C.cpu_isa(), C.cpu_isa_detected(), ops.cpu_isa())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(RCGRPO_CPU_ISA="BASELINE"))  # case-insensitive
    assert proc.returncode == 0, proc.stderr
    used, detected, again = proc.stdout.split()
    assert used == again == "baseline" and detected == _detected()

    code = "import rcgrpo_kernels as rk; print(rk.available_backends()['cpp'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(RCGRPO_CPU_ISA="avx1024"))
    assert proc.returncode == 0, proc.stderr
    assert "does not load: RCGRPO_CPU_ISA must be one of avx512, avx2, baseline" in proc.stdout
    assert "'avx1024'" in proc.stdout
