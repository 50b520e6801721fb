"""Triton backend of `acd_attention`: attention output plus the text→image attention mass.

Shapes: q, k, v, out `[B, H, N, D]`; text queries are rows `[0, T)`, image keys `[T, T + I)`.

    mode="fused": `_acd_fwd_kernel`, a flash-style forward over (query tiles, B·H) that streams
                  K/V and, for query tiles holding text rows, also keeps the log-sum-exp over the
                  image keys only → lse_img `[B, H, T]` (log2 units).
    mode="sdpa":  out from torch SDPA; `_image_lse_kernel` computes lse_img over text tiles × image
                  keys only.
    both:         `_acd_mass_kernel` over (image-key tiles, B) recomputes the text×image logits and
                  sums exp(s − lse_img)·w over text rows and heads into mass `[B, I]` fp32, without
                  atomics (deterministic).

Logits are kept in log2 units (`qk_scale = scale·log2(e)`) so the kernels use `exp2`. Nothing of
size N×N or T×I×H is allocated; the only scratch is lse_img.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._backends import triton_interpreter_enabled

_LOG2E = 1.4426950408889634
_HEAD_DIMS = (16, 32, 64, 128, 256)
# Shared memory budget assumed by the config pruning (H100: 227 KiB per block, minus headroom for
# the layout conversions Triton adds).
_SMEM_BUDGET = 180 * 1024


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Under the interpreter autotuning would run every config at ~5 ms per tile iteration: use one
# tiny config there (it also makes the tests exercise the masked tails). Chosen at import time.
if triton_interpreter_enabled():
    _FWD_CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_N=16)]
    _LSE_CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_N=16)]
    _MASS_CONFIGS = [_cfg(1, 1, BLOCK_U=16, BLOCK_V=16)]
else:
    # Hopper wgmma wants ≥ 64 query rows per warpgroup; BLOCK_M=64 with 4 warps fits D=256.
    _FWD_CONFIGS = [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=64, BLOCK_N=32),
        _cfg(4, 2, BLOCK_M=64, BLOCK_N=16),  # fp32 with D=256
    ]
    _LSE_CONFIGS = [
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=128),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=32, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=32, BLOCK_N=32),
    ]
    _MASS_CONFIGS = [
        _cfg(4, 3, BLOCK_U=64, BLOCK_V=64),
        _cfg(4, 3, BLOCK_U=32, BLOCK_V=64),
        _cfg(8, 3, BLOCK_U=128, BLOCK_V=64),
        _cfg(4, 3, BLOCK_U=64, BLOCK_V=128),
        _cfg(4, 2, BLOCK_U=32, BLOCK_V=32),
    ]


def _prune(resident: str, streamed: str, n_streamed: int, acc: bool):
    """Drop configs whose pipelined tiles would not fit in shared memory, or (acc) whose fp32
    `resident × D` accumulator needs over 128 registers a thread. Configs streaming tiles of
    fewer than 32 rows are only a fallback; the smallest config is the last resort."""

    def prune(configs, named_args, **kwargs):
        head_dim = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs["HEAD_DIM"]
        elt = named_args["Q"].element_size()
        copies = 2 if elt == 4 else 1  # 3xTF32 dots keep a second copy of the resident tile

        def smem(c):
            kw = c.kwargs
            return elt * head_dim * (copies * kw[resident] + max(c.num_stages, 1) * n_streamed * kw[streamed])

        def acc_regs(c):
            return c.kwargs[resident] * head_dim // (32 * c.num_warps) if acc else 0

        fits = [c for c in configs if smem(c) <= _SMEM_BUDGET and acc_regs(c) <= 128]
        wide = [c for c in fits if c.kwargs[streamed] >= 32]
        return wide or fits or [min(configs, key=smem)]

    return prune


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies raw bits for bf16 operands: upcast there (exact for 16-bit inputs).
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attn_tile(
    acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, start_n, hi, qk_scale, offs_n, offs_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_OUT: tl.constexpr, TRACK: tl.constexpr, MASKED: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key tile [start_n, start_n + BLOCK_N) ∩ [.., hi): online-softmax update of (acc, m_i,
    l_i) when ACC_OUT, of the image-only (m_img, l_img) when TRACK. m/l are in log2 units."""
    cols = start_n + offs_n
    k_ptrs = K + cols[:, None] * stride_kn + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < hi, other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
    if MASKED:
        qk = tl.where(cols[None, :] < hi, qk, float("-inf"))
    # qk_scale > 0, so max(qk)·qk_scale is the max of the scaled logits.
    if TRACK:
        m_img_new = tl.maximum(m_img, tl.max(qk, 1) * qk_scale)
        p_img = tl.exp2(qk * qk_scale - m_img_new[:, None])
        l_img = l_img * tl.exp2(m_img - m_img_new) + tl.sum(p_img, 1)
        m_img = m_img_new
    if ACC_OUT:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            v = tl.load(v_ptrs, mask=cols[:, None] < hi, other=0.0)
        else:
            v = tl.load(v_ptrs)
        # p is rounded to v's dtype as on the GPU path, also under the interpreter.
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32, PRECISION)
        m_i = m_new
    return acc, m_i, l_i, m_img, l_img


@triton.jit
def _attn_range(
    acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, lo, hi, qk_scale, offs_n, offs_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_OUT: tl.constexpr, TRACK: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Keys [lo, hi): unmasked full tiles, then one masked tail tile."""
    hi_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, hi_full, BLOCK_N):
        acc, m_i, l_i, m_img, l_img = _attn_tile(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, start_n, hi, qk_scale,
            offs_n, offs_d, BLOCK_M, BLOCK_N, ACC_OUT, TRACK, False, DOT_FP32, PRECISION,
        )
    if hi_full < hi:
        acc, m_i, l_i, m_img, l_img = _attn_tile(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, hi_full, hi, qk_scale,
            offs_n, offs_d, BLOCK_M, BLOCK_N, ACC_OUT, TRACK, True, DOT_FP32, PRECISION,
        )
    return acc, m_i, l_i, m_img, l_img


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=["N_CTX", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 2, True)})
@triton.jit
def _acd_fwd_kernel(
    Q, K, V, Out, LseImg,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    H, N_CTX, text_len, image_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B·H). Out `[B, H, N, D]`; LseImg `[B, H, T]` (log2 units) for the
    text rows: log2 Σ_{u ∈ image} 2^(s(v,u)·log2 e)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_CTX
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_img = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_img = tl.zeros([BLOCK_M], dtype=tl.float32)
    image_end = text_len + image_len

    # Keys in three ranges: text [0, T), image [T, T+I), the rest [T+I, N).
    acc, m_i, l_i, m_img, l_img = _attn_range(
        acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, 0, text_len, qk_scale,
        offs_n, offs_d, BLOCK_M, BLOCK_N, True, False, DOT_FP32, PRECISION,
    )
    if start_m < text_len:
        acc, m_i, l_i, m_img, l_img = _attn_range(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, text_len, image_end, qk_scale,
            offs_n, offs_d, BLOCK_M, BLOCK_N, True, True, DOT_FP32, PRECISION,
        )
    else:
        acc, m_i, l_i, m_img, l_img = _attn_range(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, text_len, image_end, qk_scale,
            offs_n, offs_d, BLOCK_M, BLOCK_N, True, False, DOT_FP32, PRECISION,
        )
    acc, m_i, l_i, m_img, l_img = _attn_range(
        acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, image_end, N_CTX, qk_scale,
        offs_n, offs_d, BLOCK_M, BLOCK_N, True, False, DOT_FP32, PRECISION,
    )

    out = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if start_m < text_len:
        tl.store(LseImg + b * stride_lb + h * stride_lh + offs_m, m_img + tl.log2(l_img), mask=offs_m < text_len)


@triton.autotune(configs=_LSE_CONFIGS, key=["text_len", "image_len", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 1, False)})
@triton.jit
def _image_lse_kernel(
    Q, K, LseImg,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    H, text_len, image_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), B·H). LseImg `[B, H, T]` (log2 units) from the text×image block."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < text_len
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    # The output accumulator and full-row statistics are dead here (ACC_OUT=False).
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_img = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_img = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i, m_img, l_img = _attn_range(
        acc, m_i, l_i, m_img, l_img, q, K, K, stride_kn, stride_kn,
        text_len, text_len + image_len, qk_scale, offs_n, offs_d,
        BLOCK_M, BLOCK_N, False, True, DOT_FP32, PRECISION,
    )
    tl.store(LseImg + b * stride_lb + h * stride_lh + offs_m, m_img + tl.log2(l_img), mask=row_ok)


@triton.autotune(configs=_MASS_CONFIGS, key=["text_len", "image_len", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_U", "BLOCK_V", 1, False)})
@triton.jit
def _acd_mass_kernel(
    Q, K, LseImg, W, Mass,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_wb, stride_mb,
    H, text_len, image_len, qk_scale, inv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(I, BLOCK_U), B). Mass `[B, I]`: (1/H) Σ_h Σ_v w_v 2^(s_h(v,u)·log2 e − LseImg[b,h,v]).
    Each program owns BLOCK_U image keys and loops over all heads and text tiles (no atomics)."""
    pid_u = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_u < image_len
    Q += b * stride_qb
    K += b * stride_kb + text_len * stride_kn
    LseImg += b * stride_lb

    total = tl.zeros([BLOCK_U], dtype=tl.float32)
    for h in range(0, H):
        k = tl.load(K + h * stride_kh + offs_u[:, None] * stride_kn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        kt = tl.trans(k)
        for v0 in range(0, text_len, BLOCK_V):
            rows = v0 + offs_v
            row_ok = rows < text_len
            q = tl.load(Q + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            # +inf for the padded rows makes their terms exactly 0.
            lse = tl.load(LseImg + h * stride_lh + rows, mask=row_ok, other=float("inf"))
            s = _dot(q, kt, tl.zeros([BLOCK_V, BLOCK_U], dtype=tl.float32), DOT_FP32, PRECISION)
            p = tl.exp2(s * qk_scale - lse[:, None])
            if HAS_WEIGHTS:
                w = tl.load(W + b * stride_wb + rows, mask=row_ok, other=0.0)
                p = p * w[:, None]
            total += tl.sum(p, 0)
    tl.store(Mass + b * stride_mb + offs_u, total * inv_heads, mask=key_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _check_head_dim(head_dim: int) -> None:
    if head_dim not in _HEAD_DIMS:
        raise ValueError(
            f"acd_attention: the Triton backend needs head_dim to be a power of two in 16..256, "
            f"got head_dim={head_dim}; use backend=\"torch\" or backend=\"cpp\" for this head_dim"
        )


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, PRECISION): upcast under the interpreter (which computes exact fp32 dots). fp32
    inputs on the GPU use 3xTF32 (about fp32 accuracy on tensor cores; "ieee" dots spill)."""
    if triton_interpreter_enabled():
        return True, "ieee"
    return False, ("tf32x3" if dtype == torch.float32 else "tf32")


def _launch_fused(q, k, v, out, lse_img, text_len, image_len, qk_scale):
    batch, heads, seq, head_dim = q.shape
    dot_fp32, precision = _dot_flags(q.dtype)
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _acd_fwd_kernel[grid](
        q, k, v, out, lse_img,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse_img.stride(0), lse_img.stride(1),
        heads, seq, text_len, image_len, qk_scale,
        HEAD_DIM=head_dim, DOT_FP32=dot_fp32, PRECISION=precision,
    )


def _launch_image_lse(q, k, lse_img, text_len, image_len, qk_scale):
    batch, heads, _, head_dim = q.shape
    dot_fp32, precision = _dot_flags(q.dtype)
    grid = lambda meta: (triton.cdiv(text_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _image_lse_kernel[grid](
        q, k, lse_img,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse_img.stride(0), lse_img.stride(1),
        heads, text_len, image_len, qk_scale,
        HEAD_DIM=head_dim, DOT_FP32=dot_fp32, PRECISION=precision,
    )


def _launch_mass(q, k, lse_img, weights, mass, text_len, image_len, qk_scale):
    batch, heads, _, head_dim = q.shape
    dot_fp32, precision = _dot_flags(q.dtype)
    has_weights = weights is not None
    w = weights if has_weights else mass  # placeholder pointer, never read
    grid = lambda meta: (triton.cdiv(image_len, meta["BLOCK_U"]), batch)  # noqa: E731
    _acd_mass_kernel[grid](
        q, k, lse_img, w, mass,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse_img.stride(0), lse_img.stride(1),
        w.stride(0), mass.stride(0),
        heads, text_len, image_len, qk_scale, 1.0 / heads,
        HEAD_DIM=head_dim, HAS_WEIGHTS=has_weights, DOT_FP32=dot_fp32, PRECISION=precision,
    )


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def acd_attention_triton(q, k, v, text_len, image_len, scale, text_weights=None, *, mode="fused"):
    """Attention output and text→image mass with Triton kernels.

    Args:
        q, k, v: `[B, H, N, D]` fp32/fp16/bf16 (validated by the caller), D a power of two in 16..256.
        text_len, image_len: text rows `[0, T)`, image keys `[T, T + I)`, T + I ≤ N.
        scale: positive logit scale.
        text_weights: `[B, T]` or None.
        mode: "fused" or "sdpa".
    Returns:
        out `[B, H, N, D]` in q's dtype, mass `[B, I]` fp32.
    """
    if mode not in ("fused", "sdpa"):
        raise ValueError(f"acd_attention: mode must be 'fused' or 'sdpa', got {mode!r}")
    batch, heads, seq, head_dim = q.shape
    _check_head_dim(head_dim)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"acd_attention: scale must be a finite positive number, got {scale!r}")
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    qk_scale = float(scale) * _LOG2E
    weights = None
    if text_weights is not None:
        weights = text_weights.to(device=q.device, dtype=torch.float32)
        weights = _unit_last_stride(weights)

    lse_img = torch.empty(batch, heads, text_len, device=q.device, dtype=torch.float32)
    mass = torch.empty(batch, image_len, device=q.device, dtype=torch.float32)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if mode == "fused":
            out = torch.empty_like(q)
            _launch_fused(q, k, v, out, lse_img, text_len, image_len, qk_scale)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=float(scale))
            _launch_image_lse(q, k, lse_img, text_len, image_len, qk_scale)
        _launch_mass(q, k, lse_img, weights, mass, text_len, image_len, qk_scale)
    return out, mass


__all__ = ["acd_attention_triton"]
