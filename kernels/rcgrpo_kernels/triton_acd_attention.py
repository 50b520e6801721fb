"""Triton backend of `acd_attention`: attention output plus the text→image attention mass.

Shapes: q, k, v, out `[B, H, N, D]`; text queries are rows `[0, T)`, image keys `[T, T + I)`.

    mode="fused": `_acd_fwd_kernel`, a flash-style forward over (query tiles, B·H) that streams
                  K/V and, for query tiles holding text rows, also keeps the log-sum-exp over the
                  image keys only → lse_img `[B, H, T]` (log2 units).
    mode="sdpa":  out from torch SDPA; `_image_lse_kernel` computes lse_img over text tiles × image
                  keys only.
    both:         `_acd_mass_kernel` over (image-key tiles, B, head splits) recomputes the
                  text×image logits and sums exp(s − lse_img)·w over text rows and the heads of its
                  split into partial masses `[B, splits, I]`, reduced over the splits by one
                  fixed-order `torch.sum` (no atomics: deterministic). Splitting the heads fills the
                  GPU at B=1 (cdiv(4096, 64) = 64 tiles for 132 SMs without it).

Logits are kept in log2 units (`qk_scale = scale·log2(e)`) so the kernels use `exp2`. Nothing of
size N×N or T×I×H is allocated; the scratch is lse_img `[B, H, T]` and the partial masses.

Head dims: any D ≤ 256. The kernels work on HEAD_DIM = the next power of two ≥ max(D, 16) and load
q/k/v with a mask on D (zeros beyond D): exact, since zero columns change neither q·k nor the kept
output columns. Strides: any, with unit stride in D (no copy for diffusers' sequence-major layout).

Configs: `GPU_*_CONFIGS` are the autotune lists of the CUDA path. Under TRITON_INTERPRET=1 the
launchers call the kernels' underlying jit functions (`kernel.fn`) with one small
`INTERPRETER_*_CONFIG` instead (autotuning there would run every config at ~5 ms per tile
iteration); tests run every GPU config the same way, with explicit meta-parameters.
The interpreter casts fp32 → bf16 by truncation where GPUs round to nearest even: with bf16 inputs
under the interpreter the kernels round in fp32 first (EMULATE_RNE), so the stored probabilities
and outputs match what a GPU stores.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from ._backends import triton_interpreter_enabled
from ._sdpa import sdpa_prioritized

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Shared memory budget assumed by the config pruning (H100: 227 KiB per block, minus headroom for
# the layout conversions Triton adds).
_SMEM_BUDGET = 180 * 1024


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Hopper wgmma wants ≥ 64 query rows per warpgroup; BLOCK_M=64 with 4 warps fits D=256.
GPU_FWD_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=64),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    _cfg(4, 2, BLOCK_M=64, BLOCK_N=32),
    _cfg(4, 2, BLOCK_M=64, BLOCK_N=16),  # fp32 with D=256
]
GPU_LSE_CONFIGS = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=128),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=64),
    _cfg(4, 2, BLOCK_M=32, BLOCK_N=32),
]
GPU_MASS_CONFIGS = [
    _cfg(4, 3, BLOCK_U=64, BLOCK_V=64),
    _cfg(4, 3, BLOCK_U=32, BLOCK_V=64),
    _cfg(8, 3, BLOCK_U=128, BLOCK_V=64),
    _cfg(4, 3, BLOCK_U=64, BLOCK_V=128),
    _cfg(4, 2, BLOCK_U=32, BLOCK_V=32),
]
# One tiny config per kernel under the interpreter (it also makes small tests exercise the masked
# tails and several tiles).
INTERPRETER_FWD_CONFIG = _cfg(1, 1, BLOCK_M=16, BLOCK_N=16)
INTERPRETER_LSE_CONFIG = _cfg(1, 1, BLOCK_M=16, BLOCK_N=16)
INTERPRETER_MASS_CONFIG = _cfg(1, 1, BLOCK_U=16, BLOCK_V=16)

# Head-split heuristic of the mass kernel: aim at >= _MASS_PROGRAMS_PER_SM programs per SM,
# counting image tiles of _MASS_SPLIT_BLOCK_U keys (the typical autotuned BLOCK_U; the split count
# must be fixed before the launch, to size the partial buffer). The interpreter pretends to have
# _INTERPRETER_SM_COUNT SMs so that small test shapes split their heads too.
_MASS_SPLIT_BLOCK_U = 64
_MASS_PROGRAMS_PER_SM = 2
_INTERPRETER_SM_COUNT = 2


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
def _round_to_bf16(x):
    """fp32 → the nearest bf16 value (ties to even), still in fp32: a later truncating cast to bf16
    (the interpreter's) is then exact. For finite x; overflow rounds to ±inf as on a GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies raw bits for bf16 operands: upcast there (exact for 16-bit inputs).
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(ptrs, rows, hi, offs_d, head_dim, MASKED: tl.constexpr, PAD_D: tl.constexpr):
    """Tile of rows `rows` (< hi when MASKED) and head-dim columns offs_d (< head_dim when PAD_D);
    masked-out elements load as 0."""
    if MASKED:
        if PAD_D:
            return tl.load(ptrs, mask=(rows[:, None] < hi) & (offs_d[None, :] < head_dim), other=0.0)
        else:
            return tl.load(ptrs, mask=rows[:, None] < hi, other=0.0)
    else:
        if PAD_D:
            return tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _attn_tile(
    acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, start_n, hi, qk_scale, offs_n, offs_d,
    head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_OUT: tl.constexpr, TRACK: tl.constexpr, MASKED: tl.constexpr,
    PAD_D: tl.constexpr, EMULATE_RNE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key tile [start_n, start_n + BLOCK_N) ∩ [.., hi): online-softmax update of (acc, m_i,
    l_i) when ACC_OUT, of the image-only (m_img, l_img) when TRACK. m/l are in log2 units."""
    cols = start_n + offs_n
    k = _load_rows(K + cols[:, None] * stride_kn + offs_d[None, :], cols, hi, offs_d, head_dim, MASKED, PAD_D)
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
        v = _load_rows(V + cols[:, None] * stride_vn + offs_d[None, :], cols, hi, offs_d, head_dim, MASKED, PAD_D)
        # p is rounded to v's dtype as on the GPU path, also under the interpreter (to nearest).
        if EMULATE_RNE:
            p = _round_to_bf16(p)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32, PRECISION)
        m_i = m_new
    return acc, m_i, l_i, m_img, l_img


@triton.jit
def _attn_range(
    acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, lo, hi, qk_scale, offs_n, offs_d,
    head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_OUT: tl.constexpr, TRACK: tl.constexpr,
    PAD_D: tl.constexpr, EMULATE_RNE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Keys [lo, hi): unmasked full tiles, then one masked tail tile."""
    hi_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, hi_full, BLOCK_N):
        acc, m_i, l_i, m_img, l_img = _attn_tile(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, start_n, hi, qk_scale,
            offs_n, offs_d, head_dim, BLOCK_M, BLOCK_N, ACC_OUT, TRACK, False,
            PAD_D, EMULATE_RNE, DOT_FP32, PRECISION,
        )
    if hi_full < hi:
        acc, m_i, l_i, m_img, l_img = _attn_tile(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, hi_full, hi, qk_scale,
            offs_n, offs_d, head_dim, BLOCK_M, BLOCK_N, ACC_OUT, TRACK, True,
            PAD_D, EMULATE_RNE, DOT_FP32, PRECISION,
        )
    return acc, m_i, l_i, m_img, l_img


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=GPU_FWD_CONFIGS, key=["N_CTX", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 2, True)})
@triton.jit
def _acd_fwd_kernel(
    Q, K, V, Out, LseImg,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    H, N_CTX, text_len, image_len, qk_scale, head_dim,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAD_D: tl.constexpr, EMULATE_RNE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B·H). Out `[B, H, N, D]`; LseImg `[B, H, T]` (log2 units) for the
    text rows: log2 Σ_{u ∈ image} 2^(s(v,u)·log2 e). HEAD_DIM: head_dim padded to a power of two."""
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
    q = _load_rows(Q + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, N_CTX, offs_d, head_dim, True, PAD_D)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_img = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_img = tl.zeros([BLOCK_M], dtype=tl.float32)
    image_end = text_len + image_len

    # Keys in three ranges: text [0, T), image [T, T+I), the rest [T+I, N).
    acc, m_i, l_i, m_img, l_img = _attn_range(
        acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, 0, text_len, qk_scale,
        offs_n, offs_d, head_dim, BLOCK_M, BLOCK_N, True, False, PAD_D, EMULATE_RNE, DOT_FP32, PRECISION,
    )
    if start_m < text_len:
        acc, m_i, l_i, m_img, l_img = _attn_range(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, text_len, image_end, qk_scale,
            offs_n, offs_d, head_dim, BLOCK_M, BLOCK_N, True, True, PAD_D, EMULATE_RNE, DOT_FP32, PRECISION,
        )
    else:
        acc, m_i, l_i, m_img, l_img = _attn_range(
            acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, text_len, image_end, qk_scale,
            offs_n, offs_d, head_dim, BLOCK_M, BLOCK_N, True, False, PAD_D, EMULATE_RNE, DOT_FP32, PRECISION,
        )
    acc, m_i, l_i, m_img, l_img = _attn_range(
        acc, m_i, l_i, m_img, l_img, q, K, V, stride_kn, stride_vn, image_end, N_CTX, qk_scale,
        offs_n, offs_d, head_dim, BLOCK_M, BLOCK_N, True, False, PAD_D, EMULATE_RNE, DOT_FP32, PRECISION,
    )

    out = acc / l_i[:, None]
    if EMULATE_RNE:
        out = _round_to_bf16(out)
    out_ptrs = Out + offs_m[:, None] * stride_on + offs_d[None, :]
    if PAD_D:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N_CTX) & (offs_d[None, :] < head_dim))
    else:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_CTX)
    if start_m < text_len:
        tl.store(LseImg + b * stride_lb + h * stride_lh + offs_m, m_img + tl.log2(l_img), mask=offs_m < text_len)


@triton.autotune(configs=GPU_LSE_CONFIGS, key=["text_len", "image_len", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 1, False)})
@triton.jit
def _image_lse_kernel(
    Q, K, LseImg,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    H, text_len, image_len, qk_scale, head_dim,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAD_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
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
    q = _load_rows(Q + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, text_len, offs_d, head_dim, True, PAD_D)

    # The output accumulator and full-row statistics are dead here (ACC_OUT=False).
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_img = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_img = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i, m_img, l_img = _attn_range(
        acc, m_i, l_i, m_img, l_img, q, K, K, stride_kn, stride_kn,
        text_len, text_len + image_len, qk_scale, offs_n, offs_d, head_dim,
        BLOCK_M, BLOCK_N, False, True, PAD_D, False, DOT_FP32, PRECISION,
    )
    tl.store(LseImg + b * stride_lb + h * stride_lh + offs_m, m_img + tl.log2(l_img), mask=row_ok)


@triton.autotune(configs=GPU_MASS_CONFIGS, key=["text_len", "image_len", "heads_per_split", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_U", "BLOCK_V", 1, False)})
@triton.jit
def _acd_mass_kernel(
    Q, K, LseImg, W, Mass,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_wb, stride_mb, stride_ms,
    H, heads_per_split, text_len, image_len, qk_scale, inv_heads, head_dim,
    HEAD_DIM: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, PAD_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(I, BLOCK_U), B, splits). Mass `[B, splits, I]`: the partial
    (1/H) Σ_{h in split} Σ_v w_v 2^(s_h(v,u)·log2 e − LseImg[b,h,v]) of split `program_id(2)`, which
    owns heads [split·heads_per_split, min(.. + heads_per_split, H)). Each program owns BLOCK_U
    image keys of one split and loops over its heads and all text tiles (no atomics)."""
    pid_u = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    h_lo = split * heads_per_split
    h_hi = tl.minimum(h_lo + heads_per_split, H)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, HEAD_DIM)
    Q += b * stride_qb
    K += b * stride_kb + text_len * stride_kn
    LseImg += b * stride_lb

    total = tl.zeros([BLOCK_U], dtype=tl.float32)
    for h in range(h_lo, h_hi):
        k = _load_rows(K + h * stride_kh + offs_u[:, None] * stride_kn + offs_d[None, :], offs_u, image_len, offs_d, head_dim, True, PAD_D)
        kt = tl.trans(k)
        for v0 in range(0, text_len, BLOCK_V):
            rows = v0 + offs_v
            row_ok = rows < text_len
            q = _load_rows(Q + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :], rows, text_len, offs_d, head_dim, True, PAD_D)
            # +inf for the padded rows makes their terms exactly 0.
            lse = tl.load(LseImg + h * stride_lh + rows, mask=row_ok, other=float("inf"))
            s = _dot(q, kt, tl.zeros([BLOCK_V, BLOCK_U], dtype=tl.float32), DOT_FP32, PRECISION)
            p = tl.exp2(s * qk_scale - lse[:, None])
            if HAS_WEIGHTS:
                w = tl.load(W + b * stride_wb + rows, mask=row_ok, other=0.0)
                p = p * w[:, None]
            total += tl.sum(p, 0)
    tl.store(Mass + b * stride_mb + split * stride_ms + offs_u, total * inv_heads, mask=offs_u < image_len)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def padded_head_dim(head_dim: int) -> int:
    """HEAD_DIM the kernels use for `head_dim`: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"acd_attention: the Triton backend takes head_dim up to {MAX_HEAD_DIM}, "
            f"got head_dim={head_dim}; use backend=\"torch\" or backend=\"cpp\" for this head_dim"
        )


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, PRECISION): upcast under the interpreter (which computes exact fp32 dots). fp32
    inputs on the GPU use 3xTF32 (about fp32 accuracy on tensor cores; "ieee" dots spill)."""
    if triton_interpreter_enabled():
        return True, "ieee"
    return False, ("tf32x3" if dtype == torch.float32 else "tf32")


def _emulate_rne(dtype: torch.dtype) -> bool:
    """Round fp32 → bf16 to nearest in the kernel (only the interpreter truncates)."""
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


def _launch(kernel, grid, args, meta, config, interpreter_config):
    """Launch `kernel` (autotuned) on `grid`; with an explicit `config` (or under the interpreter,
    its small config) launch the underlying jit function with those meta-parameters instead."""
    if config is None and triton_interpreter_enabled():
        config = interpreter_config
    if config is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _launch_fused(q, k, v, out, lse_img, text_len, image_len, qk_scale, config=None):
    batch, heads, seq, head_dim = q.shape
    dot_fp32, precision = _dot_flags(q.dtype)
    padded = padded_head_dim(head_dim)
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    args = (
        q, k, v, out, lse_img,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse_img.stride(0), lse_img.stride(1),
        heads, seq, text_len, image_len, qk_scale, head_dim,
    )
    meta = dict(HEAD_DIM=padded, PAD_D=padded != head_dim, EMULATE_RNE=_emulate_rne(q.dtype),
                DOT_FP32=dot_fp32, PRECISION=precision)
    _launch(_acd_fwd_kernel, grid, args, meta, config, INTERPRETER_FWD_CONFIG)


def _launch_image_lse(q, k, lse_img, text_len, image_len, qk_scale, config=None):
    batch, heads, _, head_dim = q.shape
    dot_fp32, precision = _dot_flags(q.dtype)
    padded = padded_head_dim(head_dim)
    grid = lambda meta: (triton.cdiv(text_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    args = (
        q, k, lse_img,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse_img.stride(0), lse_img.stride(1),
        heads, text_len, image_len, qk_scale, head_dim,
    )
    meta = dict(HEAD_DIM=padded, PAD_D=padded != head_dim, DOT_FP32=dot_fp32, PRECISION=precision)
    _launch(_image_lse_kernel, grid, args, meta, config, INTERPRETER_LSE_CONFIG)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def mass_head_splits(batch: int, heads: int, image_len: int, sm_count: int) -> int:
    """Head splits of the mass kernel: enough (image tile, sample, split) programs for about
    _MASS_PROGRAMS_PER_SM per SM, at most one split per head, and no empty split (the heads are
    dealt in equal runs of cdiv(heads, splits)). 1 when the image tiles alone fill the GPU."""
    tiles = triton.cdiv(image_len, _MASS_SPLIT_BLOCK_U) * batch
    want = triton.cdiv(_MASS_PROGRAMS_PER_SM * sm_count, tiles)
    splits = max(1, min(heads, want))
    return triton.cdiv(heads, triton.cdiv(heads, splits))


def _default_head_splits(q: torch.Tensor, image_len: int) -> int:
    batch, heads = q.shape[0], q.shape[1]
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else _INTERPRETER_SM_COUNT
    return mass_head_splits(batch, heads, image_len, sms)


def _launch_mass(q, k, lse_img, weights, mass_parts, text_len, image_len, qk_scale, config=None):
    """mass_parts `[B, splits, I]` fp32: the heads are split into mass_parts.shape[1] runs."""
    batch, heads, _, head_dim = q.shape
    splits = mass_parts.shape[1]
    heads_per_split = triton.cdiv(heads, splits)
    dot_fp32, precision = _dot_flags(q.dtype)
    padded = padded_head_dim(head_dim)
    has_weights = weights is not None
    w = weights if has_weights else mass_parts  # placeholder pointer, never read
    grid = lambda meta: (triton.cdiv(image_len, meta["BLOCK_U"]), batch, splits)  # noqa: E731
    args = (
        q, k, lse_img, w, mass_parts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse_img.stride(0), lse_img.stride(1),
        w.stride(0), mass_parts.stride(0), mass_parts.stride(1),
        heads, heads_per_split, text_len, image_len, qk_scale, 1.0 / heads, head_dim,
    )
    meta = dict(HEAD_DIM=padded, HAS_WEIGHTS=has_weights, PAD_D=padded != head_dim,
                DOT_FP32=dot_fp32, PRECISION=precision)
    _launch(_acd_mass_kernel, grid, args, meta, config, INTERPRETER_MASS_CONFIG)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def acd_attention_triton(q, k, v, text_len, image_len, scale, text_weights=None, *, mode="fused",
                         head_splits: int | None = None, configs: dict | None = None):
    """Attention output and text→image mass with Triton kernels.

    Args:
        q, k, v: `[B, H, N, D]` fp32/fp16/bf16 (validated by the caller), D ≤ 256, any strides with
            unit stride in D (no copy).
        text_len, image_len: text rows `[0, T)`, image keys `[T, T + I)`, T + I ≤ N.
        scale: positive logit scale.
        text_weights: `[B, T]` or None.
        mode: "fused" or "sdpa".
        head_splits: head splits of the mass kernel (default: `mass_head_splits` for this device).
        configs: {"fwd" | "lse" | "mass": triton.Config} to launch those kernels with an explicit
            config instead of autotuning (tests run every GPU config this way).
    Returns:
        out `[B, H, N, D]` in q's dtype and layout, mass `[B, I]` fp32.
    """
    if mode not in ("fused", "sdpa"):
        raise ValueError(f"acd_attention: mode must be 'fused' or 'sdpa', got {mode!r}")
    batch, heads, seq, head_dim = q.shape
    _check_head_dim(head_dim)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"acd_attention: scale must be a finite positive number, got {scale!r}")
    splits = _default_head_splits(q, image_len) if head_splits is None else int(head_splits)
    if not 1 <= splits <= heads:
        raise ValueError(f"acd_attention: head_splits must be in 1..H = 1..{heads}, got {head_splits!r}")
    configs = configs or {}
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    qk_scale = float(scale) * _LOG2E
    weights = None
    if text_weights is not None:
        weights = text_weights.to(device=q.device, dtype=torch.float32)
        weights = _unit_last_stride(weights)

    lse_img = torch.empty(batch, heads, text_len, device=q.device, dtype=torch.float32)
    mass_parts = torch.empty(batch, splits, image_len, device=q.device, dtype=torch.float32)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if mode == "fused":
            out = torch.empty_like(q)  # q's layout
            _launch_fused(q, k, v, out, lse_img, text_len, image_len, qk_scale, configs.get("fwd"))
        else:
            out = sdpa_prioritized(q, k, v, scale=float(scale))
            _launch_image_lse(q, k, lse_img, text_len, image_len, qk_scale, configs.get("lse"))
        _launch_mass(q, k, lse_img, weights, mass_parts, text_len, image_len, qk_scale, configs.get("mass"))
    # Fixed-order reduction over the splits (deterministic); a view when there is one split.
    mass = mass_parts[:, 0] if splits == 1 else mass_parts.sum(dim=1)
    return out, mass


__all__ = [
    "GPU_FWD_CONFIGS",
    "GPU_LSE_CONFIGS",
    "GPU_MASS_CONFIGS",
    "INTERPRETER_FWD_CONFIG",
    "INTERPRETER_LSE_CONFIG",
    "INTERPRETER_MASS_CONFIG",
    "MAX_HEAD_DIM",
    "acd_attention_triton",
    "mass_head_splits",
    "padded_head_dim",
]
