"""Backend discovery and dispatch for the ops of `rcgrpo_kernels`.

Three backends per op: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpp"
(CPU tensors, needs the compiled `rcgrpo_kernels._C`), "torch" (reference, any device).

When `backend="auto"` has to take a slower path than the usual one (CUDA tensors without triton,
CPU tensors without the C++ extension, a head dim the Triton kernels do not take), it warns once
per reason (`warn_fallback`); `python -m rcgrpo_kernels` lists the fallbacks that apply here.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("triton", "cpp", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The import probes run once per process; their results live in a plain dict, which torch.compile
# reads as constants (once probed eagerly, the public ops trace without touching importlib, so a
# function calling them compiles with fullgraph=True).
_PROBES: dict[str, str | None] = {}


def _triton_import_error() -> str | None:
    if "triton" not in _PROBES:
        _PROBES["triton"] = _probe_triton()
    return _PROBES["triton"]


def _probe_triton() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"triton does not import ({type(exc).__name__}: {exc}); install rcgrpo[kernels]"
    return None


def _cpp_import_error() -> str | None:
    if "cpp" not in _PROBES:
        _PROBES["cpp"] = _probe_cpp()
    return _PROBES["cpp"]


def _probe_cpp() -> str | None:
    try:
        importlib.import_module("rcgrpo_kernels._C")
    except Exception as exc:  # noqa: BLE001
        if "RCGRPO_CPU_ISA" in str(exc):  # built, but the environment asks for an unknown ISA
            return f"the C++ extension rcgrpo_kernels._C does not load: {exc}"
        return (
            f"the C++ extension rcgrpo_kernels._C is not built ({type(exc).__name__}: {exc}); "
            "reinstall with a C++17 compiler and without RCGRPO_NO_EXT"
        )
    return None


# --------------------------------------------------------------------------------------------
# Fallback warnings: once per reason, and a record for `python -m rcgrpo_kernels`.
# --------------------------------------------------------------------------------------------
class FallbackWarning(UserWarning):
    """`backend="auto"` (or `mode="auto"`) took a slower path than usual; the message says why."""


_WARNED: dict[str, str] = {}


def warn_fallback(key: str, message: str) -> None:
    """Warn `message` the first time `key` is seen in this process (not while torch.compile traces)."""
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED[key] = message
    warnings.warn(f"rcgrpo_kernels: {message}", FallbackWarning, stacklevel=3)


def fallbacks_seen() -> dict[str, str]:
    """{reason key: message} of the fallback warnings issued so far in this process."""
    return dict(_WARNED)


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
        if device.type == "cuda":
            err = _triton_import_error()
            if err is None:
                return "triton"
            warn_fallback("cuda-no-triton", f"CUDA tensors use the slow torch reference backend: {err}")
            return "torch"
        if device.type == "cpu":
            err = _cpp_import_error()
            if err is None:
                return "cpp"
            warn_fallback("cpu-no-cpp", f"CPU tensors use the slower torch reference backend: {err}")
        return "torch"
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run: {reason}")
    return backend


def available_backends() -> dict[str, str | None]:
    """{backend: None if it can run here, else the reason it cannot}."""
    return {name: backend_unavailable_reason(name) for name in BACKENDS}


def auto_fallbacks() -> list[str]:
    """The cases where `backend="auto"` leaves the usual backend on this machine (each warns once)."""
    notes = []
    err = _triton_import_error()
    if err is not None:
        notes.append(f"CUDA tensors -> torch reference (both ops): {err}")
    err = _cpp_import_error()
    if err is not None:
        notes.append(f"CPU tensors -> torch reference (both ops): {err}")
    return notes
