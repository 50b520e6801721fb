"""Backend discovery and dispatch for the ops of `rcgrpo_kernels`.

Three backends per op: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpp"
(CPU tensors, needs the compiled `rcgrpo_kernels._C`), "torch" (reference, any device).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("triton", "cpp", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"triton does not import ({type(exc).__name__}: {exc}); install rcgrpo[kernels]"
    return None


@functools.lru_cache(maxsize=None)
def _cpp_import_error() -> str | None:
    try:
        importlib.import_module("rcgrpo_kernels._C")
    except Exception as exc:  # noqa: BLE001
        return (
            f"the C++ extension rcgrpo_kernels._C is not built ({type(exc).__name__}: {exc}); "
            "reinstall with a C++17 compiler and without RCGRPO_NO_EXT"
        )
    return None


def backend_unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """Why `backend` cannot run on tensors of `device` (None: in general), or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device is None:
            if torch.cuda.is_available() or triton_interpreter_enabled():
                return None
            return "no CUDA device, and TRITON_INTERPRET=1 is not set for CPU tensors"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreter_enabled():
                return None
            return "the tensors are on the CPU; Triton runs them only under TRITON_INTERPRET=1"
        return f"Triton does not run on {device.type} tensors"
    if backend == "cpp":
        err = _cpp_import_error()
        if err:
            return err
        if device is not None and device.type != "cpu":
            return f"the C++ backend runs on CPU tensors only, got {device.type} tensors"
        return None
    raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Map "auto" to a concrete backend for `device`; check an explicit choice can run."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"{op}: backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_import_error() is None:
            return "triton"
        if device.type == "cpu" and _cpp_import_error() is None:
            return "cpp"
        return "torch"
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run: {reason}")
    return backend


def available_backends() -> dict[str, str | None]:
    """{backend: None if it can run here, else the reason it cannot}."""
    return {name: backend_unavailable_reason(name) for name in BACKENDS}
