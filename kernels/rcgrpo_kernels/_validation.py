"""Input checks shared by the ops: every error names the input and what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_finite(name: str, t: torch.Tensor, *, op: str) -> None:
    """Reject NaN/inf. Skipped for CUDA tensors, where the check would force a host sync per call.

    Also skipped while torch.compile traces (a data-dependent branch would break the graph).
    Uses two allocation-free reductions (NaN propagates through max/min; ±inf shows in one of them)
    instead of materializing `isfinite(t)`.
    """
    if t.device.type == "cuda" or t.numel() == 0 or torch.compiler.is_compiling():
        return
    extremes = torch.stack([t.amax(), t.amin()])
    if not bool(torch.isfinite(extremes).all()):
        raise ValueError(f"{op}: {name} contains NaN or inf values")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {desc}")


def check_scale(scale, *, op: str) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: scale must be a finite positive number, got {scale!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: scale must be a finite positive number, got {scale!r}")
    return value
