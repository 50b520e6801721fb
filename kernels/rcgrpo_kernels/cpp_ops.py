"""C++ (pybind11 + OpenMP) CPU backend of the ops: thin wrappers around `rcgrpo_kernels._C`.

Tensors cross as numpy views. `acd_attention`: float32 q, k, v cross without a copy in any layout
with unit stride in D (the extension takes their B, H, N strides, so the sequence-major
`[B, N, H, D].transpose(1, 2)` layout of diffusers needs no copy), and the output is written into
a tensor of q's layout; float16/bfloat16 are converted to float32 (a copy that keeps the layout),
and the result converted back. `region_sq_dists`: dense buffers (x and y are made contiguous, a copy
only for strided inputs, which the trainer does not produce), float32 (float64 kept). Inputs are
expected to be validated by the public ops; the extension re-checks sizes and raises ValueError on
inconsistent buffers. `num_threads=0` uses the OpenMP default. The ISA level of the kernels is
`cpu_isa()` (RCGRPO_CPU_ISA caps it, read once at import).
"""
from __future__ import annotations

import torch

from . import _C


def _check_cpu(t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"the C++ backend runs on CPU tensors only, got a {t.device.type} tensor")


def _buffer(t: torch.Tensor, dtype: torch.dtype):
    """Contiguous CPU numpy view of `t` in `dtype` (a copy only when dtype or layout differ)."""
    _check_cpu(t)
    return t.detach().to(dtype).contiguous().numpy(force=True)


def _unit_stride_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 with unit stride in the last dimension: no copy for float32 tensors that have
    it (any other strides are passed on); a dtype conversion keeps the layout."""
    _check_cpu(t)
    t = t.detach().to(torch.float32)
    if t.shape[-1] != 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def acd_attention_cpp(q, k, v, text_len, image_len, scale, text_weights, *, num_threads: int = 0):
    """q, k, v `[B, H, N, D]` → (out `[B, H, N, D]` in q.dtype and q's layout, mass `[B, image_len]` float32)."""
    f32 = torch.float32
    weights = None if text_weights is None else _buffer(text_weights, f32)
    q32, k32, v32 = (_unit_stride_view(t) for t in (q, k, v))
    out = torch.empty_like(q32)  # q's strides (a dense, non-overlapping layout is preserved)
    if out.shape[-1] != 1 and out.stride(-1) != 1:
        out = torch.empty(q32.shape, dtype=f32)
    _, mass = _C.acd_attention(
        q32.numpy(),
        k32.numpy(),
        v32.numpy(),
        int(text_len),
        int(image_len),
        float(scale),
        weights,
        int(num_threads),
        out.numpy(),
    )
    return out.to(q.dtype), torch.from_numpy(mass)


def cpu_isa() -> str:
    """ISA level the C++ kernels run: "avx512", "avx2" or "baseline"."""
    return _C.cpu_isa()


def cpu_isa_detected() -> str:
    """Highest ISA level this CPU supports."""
    return _C.cpu_isa_detected()


def _region_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def region_sq_dists_fwd_cpp(x, y, mask, *, num_threads: int = 0):
    """x `[T, G, D]`, y `[T, K, D]`, mask `[D]` → S `[T, K, G, 2]` (float32; float64 for float64 x)."""
    acc = _region_dtype(x)
    fwd = _C.region_sq_dists_fwd_f64 if acc == torch.float64 else _C.region_sq_dists_fwd_f32
    return torch.from_numpy(fwd(_buffer(x, acc), _buffer(y, acc), _buffer(mask, acc), int(num_threads)))


def region_sq_dists_bwd_cpp(grad, x, y, mask, *, num_threads: int = 0):
    """grad `[T, K, G, 2]` → (dx `[T, G, D]` in x.dtype, dy `[T, K, D]` in y.dtype)."""
    acc = _region_dtype(x)
    bwd = _C.region_sq_dists_bwd_f64 if acc == torch.float64 else _C.region_sq_dists_bwd_f32
    dx, dy = bwd(_buffer(grad, acc), _buffer(x, acc), _buffer(y, acc), _buffer(mask, acc), int(num_threads))
    return torch.from_numpy(dx).to(x.dtype), torch.from_numpy(dy).to(y.dtype)


__all__ = ["acd_attention_cpp", "cpu_isa", "cpu_isa_detected", "region_sq_dists_fwd_cpp", "region_sq_dists_bwd_cpp"]
