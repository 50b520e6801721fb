"""Triton backend of `region_sq_dists` (SPEC §8), forward and backward.

Shapes: x `[T, G, D]` candidates, y `[T, K, D]` anchors, mask `[D]`, S and dS `[T, K, G, 2]`.

Forward: grid (D-chunks, T). A program walks its D-chunk in BLOCK_D tiles, holding the tile of all
candidates of a candidate block and all anchors of an anchor block, and keeps per-(k, i, d-lane)
in/out accumulators in registers; it reduces them over d once and writes a partial
`[T, n_chunks, K, G, 2]`, which `torch.sum` reduces over chunks (deterministic, no atomics).
With G ≤ BLOCK_G and K ≤ BLOCK_K (the usual case) x and y are read exactly once.

Backward: grid (D-tiles, T). A program loads the x tile `[BLOCK_G, BLOCK_D]` once, then for each
anchor k loads y[t, k] and dS[t, k] and forms w = dS_out + (dS_in − dS_out)·M; dx accumulates in
registers and dy[t, k] is reduced over candidates in registers: each of dx, dy is written once.
With G > BLOCK_G, dy gets one fp32 partial per candidate block, summed by torch.

Accumulation is float32 for fp32/fp16/bf16 inputs and float64 for float64 inputs, in the kernels
(S is float64 then, matching `accumulation_dtype`). No `[T, K, G, D]` tensor is built.

Launch configurations: on CUDA the block sizes come from a heuristic of the shape
(`_gpu_fwd_blocks`, `_gpu_bwd_blocks`); `gpu_fwd_configs()` / `gpu_bwd_configs()` list every block
configuration it can produce, so tests run each of them under TRITON_INTERPRET=1 (the entry points
take an explicit `config=`). Under the interpreter the default is one small fixed configuration.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._backends import triton_interpreter_enabled

__all__ = ["gpu_bwd_configs", "gpu_fwd_configs", "region_sq_dists_fwd_triton", "region_sq_dists_bwd_triton"]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _region_sq_dists_fwd_kernel(
    x_ptr, y_ptr, m_ptr, part_ptr,
    G, K, D, n_chunks, tiles_per_chunk,
    stride_xt, stride_xg, stride_yt, stride_yk,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """part[t, chunk, k, i, :] = (Σ_d M (x_i − y_k)², Σ_d (1 − M)(x_i − y_k)²) over the chunk's d."""
    chunk = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    x_base = x_ptr + t * stride_xt
    y_base = y_ptr + t * stride_yt
    part_base = part_ptr + (t * n_chunks + chunk) * K * G * 2
    d_start = chunk.to(tl.int64) * tiles_per_chunk * BLOCK_D
    offs_d0 = tl.arange(0, BLOCK_D)

    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        for g0 in range(0, G, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            g_ok = offs_g < G
            acc_in = tl.zeros([BLOCK_K, BLOCK_G, BLOCK_D], dtype=ACC)
            acc_out = tl.zeros([BLOCK_K, BLOCK_G, BLOCK_D], dtype=ACC)
            for tile in range(tiles_per_chunk):
                offs_d = d_start + tile * BLOCK_D + offs_d0
                d_ok = offs_d < D
                # Padded rows and the d tail load as 0 in both x and y, so they add nothing.
                xv = tl.load(
                    x_base + offs_g[:, None] * stride_xg + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0,
                ).to(ACC)
                yv = tl.load(
                    y_base + offs_k[:, None] * stride_yk + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0,
                ).to(ACC)
                m_in = tl.load(m_ptr + offs_d, mask=d_ok, other=0.0).to(ACC)
                m_out = 1.0 - m_in
                diff = xv[None, :, :] - yv[:, None, :]
                sq = diff * diff
                acc_in += sq * m_in[None, None, :]
                acc_out += sq * m_out[None, None, :]
            ptrs = part_base + (offs_k[:, None] * G + offs_g[None, :]) * 2
            ok = k_ok[:, None] & g_ok[None, :]
            tl.store(ptrs, tl.sum(acc_in, axis=2), mask=ok)
            tl.store(ptrs + 1, tl.sum(acc_out, axis=2), mask=ok)


@triton.jit
def _region_sq_dists_bwd_kernel(
    ds_ptr, x_ptr, y_ptr, m_ptr, dx_ptr, dy_ptr,
    G, K, D,
    stride_xt, stride_xg, stride_yt, stride_yk,
    stride_dxt, stride_dxg, stride_dyt, stride_dyb, stride_dyk,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """dx[t, i, d] = 2 Σ_k (x_i − y_k) w_ki, dy[t, (block), k, d] = −2 Σ_i (x_i − y_k) w_ki on one d tile,
    w_ki = dS[t,k,i,1] + (dS[t,k,i,0] − dS[t,k,i,1]) M_d. dy_ptr is dy itself when one candidate block
    covers G, else an fp32 partial [T, n_gblocks, K, D]."""
    pid_d = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m = tl.load(m_ptr + offs_d, mask=d_ok, other=0.0).to(ACC)
    x_base = x_ptr + t * stride_xt
    y_base = y_ptr + t * stride_yt
    ds_base = ds_ptr + t * K * G * 2

    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        tile_ok = g_ok[:, None] & d_ok[None, :]
        xv = tl.load(x_base + offs_g[:, None] * stride_xg + offs_d[None, :], mask=tile_ok, other=0.0).to(ACC)
        dx_acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
        dy_base = dy_ptr + t * stride_dyt + (g0 // BLOCK_G) * stride_dyb
        for k in range(K):
            yk = tl.load(y_base + k * stride_yk + offs_d, mask=d_ok, other=0.0).to(ACC)
            # Padded candidates get zero weights, so they add nothing to dy.
            g_out = tl.load(ds_base + (k * G + offs_g) * 2 + 1, mask=g_ok, other=0.0).to(ACC)
            g_in = tl.load(ds_base + (k * G + offs_g) * 2, mask=g_ok, other=0.0).to(ACC)
            w = g_out[:, None] + (g_in - g_out)[:, None] * m[None, :]
            p = (xv - yk[None, :]) * w
            dx_acc += p
            dyk = -2.0 * tl.sum(p, axis=0)
            tl.store(dy_base + k * stride_dyk + offs_d, dyk.to(dy_ptr.dtype.element_ty), mask=d_ok)
        dx = 2.0 * dx_acc
        tl.store(
            dx_ptr + t * stride_dxt + offs_g[:, None] * stride_dxg + offs_d[None, :],
            dx.to(dx_ptr.dtype.element_ty), mask=tile_ok,
        )


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
_MAX_GRID_DIM1 = 65535
# Under TRITON_INTERPRET=1 every tile iteration costs milliseconds: one fixed modest config, and
# small candidate blocks so that modest test shapes exercise the multi-block paths.
_INTERP_FWD_BLOCK_D, _INTERP_FWD_TILES, _INTERP_BWD_BLOCK_D, _INTERP_BWD_MAX_BLOCK_G = 128, 2, 128, 8


_GPU_LANES = 32 * 4  # one d-lane per thread at 4 warps
_GPU_MAX_BLOCK_K = 8
_GPU_MAX_BWD_BLOCK_G = 32


def _gpu_fwd_blocks(group: int, anchors: int, dim: int, wide_acc: bool) -> dict:
    """GPU forward blocks: at most 64 (k, i) pairs per block (32 for float64) so that the two
    accumulators take ~128 32-bit registers per thread at 1 d-lane per thread."""
    max_pairs = 32 if wide_acc else 64
    block_k = min(triton.next_power_of_2(anchors), _GPU_MAX_BLOCK_K)
    block_g = min(triton.next_power_of_2(group), max(1, max_pairs // block_k))
    block_d = _GPU_LANES * max(1, max_pairs // (block_k * block_g))
    block_d = min(block_d, max(_GPU_LANES, triton.next_power_of_2(dim)))
    return dict(BLOCK_K=block_k, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=4)


def _gpu_fwd_tiles(steps: int, dim: int, block_d: int) -> int:
    """Tiles per chunk, so that the grid has >= ~1024 programs (memory-bound; H100 has 132 SMs)."""
    n_tiles = triton.cdiv(dim, block_d)
    want_chunks = triton.cdiv(1024, steps)
    return max(1, min(32, n_tiles // want_chunks))


def _fwd_config(steps: int, group: int, anchors: int, dim: int, wide_acc: bool, interpret: bool) -> dict:
    """Blocks, tiles per chunk and chunk count of the forward."""
    if interpret:
        blocks = _gpu_fwd_blocks(group, anchors, dim, wide_acc)
        blocks.update(BLOCK_D=_INTERP_FWD_BLOCK_D)
        tiles = _INTERP_FWD_TILES
    else:
        blocks = _gpu_fwd_blocks(group, anchors, dim, wide_acc)
        tiles = _gpu_fwd_tiles(steps, dim, blocks["BLOCK_D"])
    return dict(blocks, tiles=tiles)


def _gpu_bwd_blocks(group: int, dim: int) -> dict:
    """GPU backward blocks: candidate blocks up to 32 rows, a [BLOCK_G, BLOCK_D] tile of ~4096
    elements (x, dx in registers: ~32 fp32 each per thread at 4 warps)."""
    block_g = min(triton.next_power_of_2(group), _GPU_MAX_BWD_BLOCK_G)
    block_d = max(128, min(1024, 4096 // block_g))
    block_d = min(block_d, max(128, triton.next_power_of_2(dim)))
    return dict(BLOCK_G=block_g, BLOCK_D=block_d, num_warps=4)


def _bwd_config(group: int, dim: int, interpret: bool) -> dict:
    if interpret:
        block_g = min(triton.next_power_of_2(group), _INTERP_BWD_MAX_BLOCK_G)
        return dict(BLOCK_G=block_g, BLOCK_D=_INTERP_BWD_BLOCK_D, num_warps=4)
    return _gpu_bwd_blocks(group, dim)


def gpu_fwd_configs() -> list[dict]:
    """Every forward block configuration the GPU heuristic can produce (any T, G, K and a D large
    enough not to cap BLOCK_D), for float32-accumulated and float64 inputs: each a dict of
    BLOCK_K, BLOCK_G, BLOCK_D, num_warps and `wide_acc` (True: float64 inputs)."""
    found = []
    for wide_acc in (False, True):
        for anchors in (1, 2, 4, 8):
            for group in (1, 2, 4, 8, 16, 32, 64):
                cfg = dict(_gpu_fwd_blocks(group, anchors, 1 << 20, wide_acc), wide_acc=wide_acc)
                if cfg not in found:
                    found.append(cfg)
    return found


def gpu_bwd_configs() -> list[dict]:
    """Every backward block configuration of the GPU heuristic (BLOCK_G, BLOCK_D, num_warps)."""
    found = []
    for group in (1, 2, 4, 8, 16, 32):
        cfg = _gpu_bwd_blocks(group, 1 << 20)
        if cfg not in found:
            found.append(cfg)
    return found


def _acc(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def _store_dtype(dtype: torch.dtype, acc: torch.dtype, interpret: bool) -> torch.dtype:
    """dtype the backward kernel writes dx/dy in. The interpreter casts fp32 -> bf16 by truncation
    (GPUs round to nearest even), so under it bf16 results are written in fp32 and cast by torch."""
    return acc if interpret and dtype == torch.bfloat16 else dtype


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_steps(steps: int) -> None:
    if steps > _MAX_GRID_DIM1:
        raise ValueError(f"region_sq_dists: Triton backend supports T <= {_MAX_GRID_DIM1}, got {steps}")


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def region_sq_dists_fwd_triton(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *,
                               config: dict | None = None) -> torch.Tensor:
    """x [T, G, D], y [T, K, D], mask [D] -> S [T, K, G, 2] (float32; float64 for float64 inputs).
    config: explicit BLOCK_K, BLOCK_G, BLOCK_D, tiles, num_warps (default: the heuristic)."""
    steps, group, dim = x.shape
    anchors = y.shape[1]
    _check_steps(steps)
    x, y, mask = _unit_last_stride(x), _unit_last_stride(y), mask.contiguous()
    acc_tl, acc_torch = _acc(x)
    if config is None:
        config = _fwd_config(steps, group, anchors, dim, acc_torch == torch.float64, triton_interpreter_enabled())
    cfg = config
    n_chunks = triton.cdiv(dim, cfg["BLOCK_D"] * cfg["tiles"])
    partial = torch.empty(steps, n_chunks, anchors, group, 2, dtype=acc_torch, device=x.device)
    with _device_ctx(x):
        _region_sq_dists_fwd_kernel[(n_chunks, steps)](
            x, y, mask, partial,
            group, anchors, dim, n_chunks, cfg["tiles"],
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            BLOCK_K=cfg["BLOCK_K"], BLOCK_G=cfg["BLOCK_G"], BLOCK_D=cfg["BLOCK_D"], ACC=acc_tl,
            num_warps=cfg["num_warps"],
        )
    if n_chunks == 1:
        return partial[:, 0]
    return partial.sum(dim=1)


def region_sq_dists_bwd_triton(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS [T, K, G, 2], x [T, G, D], y [T, K, D], mask [D] -> (dx [T, G, D] in x.dtype, dy [T, K, D] in y.dtype).
    config: explicit BLOCK_G, BLOCK_D, num_warps (default: the heuristic)."""
    steps, group, dim = x.shape
    anchors = y.shape[1]
    _check_steps(steps)
    x, y, mask, grad = _unit_last_stride(x), _unit_last_stride(y), mask.contiguous(), grad.contiguous()
    acc_tl, acc_torch = _acc(x)
    interpret = triton_interpreter_enabled()
    cfg = _bwd_config(group, dim, interpret) if config is None else config
    n_gblocks = triton.cdiv(group, cfg["BLOCK_G"])
    dx = torch.empty((steps, group, dim), dtype=_store_dtype(x.dtype, acc_torch, interpret), device=x.device)
    if n_gblocks == 1:
        dy = torch.empty((steps, anchors, dim), dtype=_store_dtype(y.dtype, acc_torch, interpret), device=y.device)
        dy_target, dy_strides = dy, (dy.stride(0), 0, dy.stride(1))
    else:
        dy_target = torch.empty((steps, n_gblocks, anchors, dim), dtype=acc_torch, device=y.device)
        dy_strides = (dy_target.stride(0), dy_target.stride(1), dy_target.stride(2))
    grid = (triton.cdiv(dim, cfg["BLOCK_D"]), steps)
    with _device_ctx(x):
        _region_sq_dists_bwd_kernel[grid](
            grad, x, y, mask, dx, dy_target,
            group, anchors, dim,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            dx.stride(0), dx.stride(1), *dy_strides,
            BLOCK_G=cfg["BLOCK_G"], BLOCK_D=cfg["BLOCK_D"], ACC=acc_tl,
            num_warps=cfg["num_warps"],
        )
    if n_gblocks > 1:
        dy = dy_target.sum(dim=1)
    return dx.to(x.dtype), dy.to(y.dtype)
