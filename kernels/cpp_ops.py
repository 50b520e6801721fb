"""C++ (pybind11 + OpenMP) CPU backend of the ops: thin wrappers around `rcgrpo_kernels._C`.

Tensors cross as contiguous numpy buffers: float32 CPU tensors without a copy, float16/bfloat16
converted to float32 here (float64 kept for region_sq_dists), results converted back to the
input dtype. Inputs are expected to be validated by the public ops; the extension re-checks sizes
and raises ValueError on inconsistent buffers. `num_threads=0` uses the OpenMP default.
"""
from __future__ import annotations

import torch

from . import _C


def _buffer(t: torch.Tensor, dtype: torch.dtype):
    """Contiguous CPU numpy view of `t` in `dtype` (a copy only when dtype or layout differ)."""
    if t.device.type != "cpu":
        raise ValueError(f"the C++ backend runs on CPU tensors only, got a {t.device.type} tensor")
    return t.detach().to(dtype).contiguous().numpy(force=True)


def acd_attention_cpp(q, k, v, text_len, image_len, scale, text_weights, *, num_threads: int = 0):
    """q, k, v `[B, H, N, D]` → (out `[B, H, N, D]` in q.dtype, mass `[B, image_len]` float32)."""
    f32 = torch.float32
    weights = None if text_weights is None else _buffer(text_weights, f32)
    out, mass = _C.acd_attention(
        _buffer(q, f32),
        _buffer(k, f32),
        _buffer(v, f32),
        int(text_len),
        int(image_len),
        float(scale),
        weights,
        int(num_threads),
    )
    return torch.from_numpy(out).to(q.dtype), torch.from_numpy(mass)


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


__all__ = ["acd_attention_cpp", "region_sq_dists_fwd_cpp", "region_sq_dists_bwd_cpp"]
