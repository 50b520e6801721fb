"""`region_sq_dists`: masked squared distances of every candidate to every anchor (SPEC §5, §8).

    S[t,k,i,0] = Σ_d M_d (x[t,i,d] − y[t,k,d])²        (inside the edit region)
    S[t,k,i,1] = Σ_d (1 − M_d)(x[t,i,d] − y[t,k,d])²   (background)

x `[T, G, D]` candidates, y `[T, K, D]` anchors, M `[D]` in [0, 1]. S `[T, K, G, 2]` float32
(float64 when x is float64, so float64 gradchecks are meaningful).
Differentiable in x and y; the backward takes dS `[T, K, G, 2]`:

    dx[t,i,d] =  Σ_k 2 (x − y_k)_d · (dS[t,k,i,0] M_d + dS[t,k,i,1] (1 − M_d))
    dy[t,k,d] = −Σ_i 2 (x_i − y)_d · (dS[t,k,i,0] M_d + dS[t,k,i,1] (1 − M_d))

This file holds the public op, checks, dispatch, `torch.library` registration with autograd, and
the torch reference (a loop over anchors, so no `[T, K, G, D]` tensor is ever built).
"""
from __future__ import annotations

import torch

from ._backends import resolve_backend
from ._validation import check_finite, check_same_device, check_tensor

OP = "region_sq_dists"


def region_sq_dists(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Region sums of squared differences, `[T, K, G, 2]` float32 (see module docstring)."""
    _validate(x, y, mask)
    backend = resolve_backend(backend, x.device, OP)
    return torch.ops.rcgrpo.region_sq_dists(x, y, mask, backend)


def _validate(x, y, mask) -> None:
    check_tensor("x", x, ndim=3, op=OP)
    check_tensor("y", y, ndim=3, op=OP)
    check_tensor("mask", mask, ndim=1, op=OP)
    check_same_device(OP, x=x, y=y, mask=mask)
    steps, group, dim = x.shape
    if y.dtype != x.dtype:
        raise ValueError(f"{OP}: x and y must share a dtype, got x {x.dtype}, y {y.dtype}")
    if y.shape[0] != steps or y.shape[2] != dim:
        raise ValueError(
            f"{OP}: y must have shape [T, K, D] = [{steps}, K, {dim}] to match x {tuple(x.shape)}, "
            f"got {tuple(y.shape)}"
        )
    if min(steps, group, dim, y.shape[1]) < 1:
        raise ValueError(f"{OP}: x and y must be non-empty, got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if mask.shape[0] != dim:
        raise ValueError(f"{OP}: mask must have shape [D] = [{dim}], got {tuple(mask.shape)}")
    if mask.requires_grad:
        raise ValueError(f"{OP}: mask must not require grad (the op is not differentiable in the mask)")
    for name, t in (("x", x), ("y", y), ("mask", mask)):
        check_finite(name, t, op=OP)
    if mask.device.type != "cuda" and not torch.compiler.is_compiling() and bool(((mask < 0) | (mask > 1)).any()):
        raise ValueError(f"{OP}: mask values must lie in [0, 1]")


# --------------------------------------------------------------------------------------------
# torch reference backend (fp32 accumulation; one anchor at a time).
# --------------------------------------------------------------------------------------------
def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/single inputs, float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def region_sq_dists_fwd_torch(x, y, mask):
    acc = accumulation_dtype(x)
    m = mask.to(acc)
    steps, anchors = x.shape[0], y.shape[1]
    out = torch.empty(steps, anchors, x.shape[1], 2, dtype=acc, device=x.device)
    xf = x.to(acc)
    for k in range(anchors):
        sq = (xf - y[:, k : k + 1].to(acc)).square()  # [T, G, D]
        inside = sq @ m
        out[:, k, :, 0] = inside
        out[:, k, :, 1] = sq.sum(-1) - inside
    return out


def region_sq_dists_bwd_torch(grad, x, y, mask):
    acc = accumulation_dtype(x)
    m = mask.to(acc)
    xf = x.to(acc)
    grad = grad.to(acc)
    dx = torch.zeros_like(xf)
    dy = torch.empty(y.shape, dtype=acc, device=y.device)
    for k in range(y.shape[1]):
        diff = xf - y[:, k : k + 1].to(acc)  # [T, G, D]
        g_in, g_out = grad[:, k, :, 0, None], grad[:, k, :, 1, None]  # [T, G, 1]
        weighted = 2.0 * diff * (g_out + (g_in - g_out) * m)
        dx += weighted
        dy[:, k] = -weighted.sum(1)
    return dx.to(x.dtype), dy.to(y.dtype)


def _forward(x, y, mask, backend):
    if backend == "torch":
        return region_sq_dists_fwd_torch(x, y, mask)
    if backend == "triton":
        from .triton_region_sq_dists import region_sq_dists_fwd_triton

        return region_sq_dists_fwd_triton(x, y, mask)
    if backend == "cpp":
        from .cpp_ops import region_sq_dists_fwd_cpp

        return region_sq_dists_fwd_cpp(x, y, mask)
    raise ValueError(f"{OP}: unknown backend {backend!r}")


def _backward(grad, x, y, mask, backend):
    if backend == "torch":
        return region_sq_dists_bwd_torch(grad, x, y, mask)
    if backend == "triton":
        from .triton_region_sq_dists import region_sq_dists_bwd_triton

        return region_sq_dists_bwd_triton(grad, x, y, mask)
    if backend == "cpp":
        from .cpp_ops import region_sq_dists_bwd_cpp

        return region_sq_dists_bwd_cpp(grad, x, y, mask)
    raise ValueError(f"{OP}: unknown backend {backend!r}")


@torch.library.custom_op("rcgrpo::region_sq_dists", mutates_args=())
def _region_sq_dists_op(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    return _forward(x, y, mask, backend)


@_region_sq_dists_op.register_fake
def _(x, y, mask, backend):
    return x.new_empty((x.shape[0], y.shape[1], x.shape[1], 2), dtype=accumulation_dtype(x))


@torch.library.custom_op("rcgrpo::region_sq_dists_backward", mutates_args=())
def _region_sq_dists_backward_op(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad.contiguous(), x, y, mask, backend)


@_region_sq_dists_backward_op.register_fake
def _(grad, x, y, mask, backend):
    return torch.empty_like(x), torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, y, mask, backend = inputs
    ctx.save_for_backward(x, y, mask)
    ctx.backend = backend


def _backward_rule(ctx, grad):
    x, y, mask = ctx.saved_tensors
    dx, dy = torch.ops.rcgrpo.region_sq_dists_backward(grad, x, y, mask, ctx.backend)
    return (
        dx if ctx.needs_input_grad[0] else None,
        dy if ctx.needs_input_grad[1] else None,
        None,
        None,
    )


_region_sq_dists_op.register_autograd(_backward_rule, setup_context=_setup_context)


def region_sq_dists_bytes(steps: int, group: int, anchors: int, dim: int, itemsize: int, backward: bool = False) -> int:
    """Minimum bytes moved by the forward (reads of x, y, mask), or, with `backward=True`, by forward
    plus backward together (the backward re-reads x, y, mask and writes dx, dy)."""
    forward = steps * (group + anchors) * dim * itemsize + dim * 4
    if not backward:
        return forward
    return 2 * forward + steps * (group + anchors) * dim * itemsize


__all__ = ["region_sq_dists", "region_sq_dists_fwd_torch", "region_sq_dists_bwd_torch", "region_sq_dists_bytes"]
