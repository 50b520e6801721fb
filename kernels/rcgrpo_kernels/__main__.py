"""`python -m rcgrpo_kernels`: which backends can run here, what `auto` picks, and every fallback."""
import os

import torch

from . import available_backends
from ._backends import _cpp_import_error, _triton_import_error, auto_fallbacks, triton_interpreter_enabled
from ._sdpa import SDPA_PRIORITY, sdpa_set_priority_supported
from .acd_attention import TRITON_AUTO_MODE, TRITON_MAX_HEAD_DIM


def main() -> None:
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
          f"TRITON_INTERPRET={'1' if triton_interpreter_enabled() else 'unset'}")
    print("backends:")
    for name, reason in available_backends().items():
        print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    print("backend='auto':")
    print(f"  CUDA tensors -> {'triton' if _triton_import_error() is None else 'torch'}")
    print(f"  CPU tensors  -> {'cpp' if _cpp_import_error() is None else 'torch'}")
    print("acd_attention mode='auto' on the Triton backend:")
    print(f"  -> {TRITON_AUTO_MODE!r} (an estimate, not yet measured on a GPU: "
          "benchmarks/gpu_check.sh results should set acd_attention.TRITON_AUTO_MODE)")
    priority = " > ".join(SDPA_PRIORITY)
    how = "set_priority=True" if sdpa_set_priority_supported() else "allowed set only (this torch lacks set_priority)"
    print(f"  mode='sdpa' runs torch SDPA with {priority} ({how})")
    print(f"  head dims 1..{TRITON_MAX_HEAD_DIM} run on Triton (zero-padded to a power of two >= 16)")
    if _cpp_import_error() is None:
        from . import cpp_ops

        cap = os.environ.get("RCGRPO_CPU_ISA", "") or "unset"
        print(f"C++ kernels ISA: {cpp_ops.cpu_isa()} (CPU supports {cpp_ops.cpu_isa_detected()}, RCGRPO_CPU_ISA={cap})")
    print("fallbacks of backend='auto' (each warns once per process, FallbackWarning):")
    print(f"  acd_attention, CUDA tensors with head_dim > {TRITON_MAX_HEAD_DIM} -> torch reference")
    for note in auto_fallbacks():
        print(f"  {note}")


if __name__ == "__main__":
    main()
