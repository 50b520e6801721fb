"""`acd_attention`: joint attention that also returns the text-to-image attention mass (ACD, SPEC §7-8).

    out[b,h]  = softmax(q[b,h] k[b,h]ᵀ · scale) v[b,h]                         [B, H, N, D]
    A_h(v,u)  = exp(s_h(v,u)) / Σ_{u' ∈ image} exp(s_h(v,u'))    v < text_len, u ∈ image keys
    mass[b,u] = (1/H) Σ_h Σ_v w[b,v] A_h(v,u)                                  [B, image_len] fp32

Image keys are tokens text_len .. text_len+image_len-1 (the target image of Kontext's
`[text | target | context]` sequence). This file holds the public op, its input checks, the
dispatch, the `torch.library` registration and the torch reference backend; the Triton and C++
backends live in `triton_acd_attention.py` and `cpp_ops.py`.

Layouts: q, k, v may have any strides with unit stride in D, in particular the sequence-major
`[B, N, H, D].transpose(1, 2)` that diffusers' Flux processors produce; no backend copies them
(the C++ backend copies only to convert float16/bfloat16 to float32), and `out` has q's layout.
"""
from __future__ import annotations

import torch

from ._backends import resolve_backend, warn_fallback
from ._validation import check_finite, check_same_device, check_scale, check_tensor

OP = "acd_attention"
MODES = ("auto", "fused", "sdpa")

# What mode="auto" runs on the Triton backend (CUDA tensors, or CPU tensors under the interpreter).
# AN ESTIMATE, NOT A MEASUREMENT: no GPU has run the benchmarks yet. Modelled at the Kontext 1024 px
# shape (B=1, H=24, N=8704, D=128, bf16) on an H100: SDPA through cuDNN / FlashAttention-3 ~1.5 ms
# (~630 TFLOP/s) + the Triton mass sidecar ~0.1 ms ≈ 1.6 ms, against ~2.4 ms for the fused Triton
# kernel (~400 TFLOP/s, the Triton tutorial's level). `bash benchmarks/gpu_check.sh` measures both
# (providers `triton_sdpa_mass`, `triton_fused`, `auto` in bench-attention.json): set this
# constant from its results.
TRITON_AUTO_MODE = "sdpa"

# Largest head dim the Triton kernels take (they zero-pad D to the next power of two, >= 16).
TRITON_MAX_HEAD_DIM = 256

# Rows of queries processed at once by the reference: bounds its scratch to H_CHUNK·Q_BLOCK·N floats.
_REF_QUERY_BLOCK = 512
_REF_HEAD_CHUNK = 4


def acd_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_len: int,
    image_len: int,
    *,
    scale: float | None = None,
    text_weights: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-image-token text→image mass.

    Args:
        q, k, v: `[B, H, N, D]`, float32/float16/bfloat16, same dtype and device; any strides with
            unit stride in D (e.g. diffusers' `[B, N, H, D].transpose(1, 2)`), taken without a copy.
        text_len: number of text tokens at the start of the sequence (≥ 1).
        image_len: number of target-image tokens right after the text (≥ 1).
        scale: logit scale, default D**-0.5.
        text_weights: `[B, text_len]` weights w_v of the text queries, or None for 1.
        backend: "auto" | "triton" | "cpp" | "torch".
        mode: "auto" (default: `TRITON_AUTO_MODE`), "fused" (one flash-style kernel) or "sdpa"
            (`out` from torch SDPA with the priority cuDNN > Flash > memory-efficient > math, mass
            from Triton kernels over the text×image block). Only the Triton backend distinguishes
            them.
    Returns:
        `(out, mass)`: out `[B, H, N, D]` in q's dtype (and q's layout); mass `[B, image_len]`
        float32 with `mass.sum(-1) == text_weights.sum(-1)` (or text_len).
    """
    scale = _validate(q, k, v, text_len, image_len, scale, text_weights, mode)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            f"{OP} is forward-only: q, k, v require grad; call it under torch.no_grad() "
            "(the ACD processor falls back to the stock attention when gradients are enabled)"
        )
    requested = backend
    backend = resolve_backend(backend, q.device, OP)
    head_dim = q.shape[-1]
    if requested == "auto" and backend == "triton" and head_dim > TRITON_MAX_HEAD_DIM:
        warn_fallback(
            f"{OP}-head-dim-{head_dim}",
            f"{OP}: head_dim={head_dim} > {TRITON_MAX_HEAD_DIM} is not supported by the Triton kernels; "
            "these calls use the torch reference backend",
        )
        backend = "torch"
    return torch.ops.rcgrpo.acd_attention(
        q, k, v, int(text_len), int(image_len), scale, text_weights, backend, resolve_mode(mode)
    )


def resolve_mode(mode: str) -> str:
    """The concrete mode ("fused" or "sdpa") that `mode` runs on the Triton backend."""
    return TRITON_AUTO_MODE if mode == "auto" else mode


def _validate(q, k, v, text_len, image_len, scale, text_weights, mode) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=(torch.float32, torch.float16, torch.bfloat16), op=OP)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{OP}: q, k, v must share the shape [B, H, N, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{OP}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(OP, q=q, k=k, v=v, text_weights=text_weights)
    batch, heads, seq, head_dim = q.shape
    if min(batch, heads, seq, head_dim) < 1:
        raise ValueError(f"{OP}: q must have non-empty dimensions, got shape {tuple(q.shape)}")
    for name, value in (("text_len", text_len), ("image_len", image_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{OP}: {name} must be an int ≥ 1, got {value!r}")
    if text_len + image_len > seq:
        raise ValueError(
            f"{OP}: text_len + image_len = {text_len} + {image_len} exceeds the sequence length N = {seq}"
        )
    if mode not in MODES:
        raise ValueError(f"{OP}: mode must be one of {MODES}, got {mode!r}")
    if text_weights is not None:
        check_tensor("text_weights", text_weights, ndim=2, op=OP)
        if tuple(text_weights.shape) != (batch, text_len):
            raise ValueError(
                f"{OP}: text_weights must have shape [B, text_len] = [{batch}, {text_len}], "
                f"got {tuple(text_weights.shape)}"
            )
        check_finite("text_weights", text_weights, op=OP)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t, op=OP)
    return check_scale(head_dim**-0.5 if scale is None else scale, op=OP)


# --------------------------------------------------------------------------------------------
# torch reference backend: fp32, blocked over heads and query rows, never B·H·N·N at once.
# --------------------------------------------------------------------------------------------
def acd_attention_torch(q, k, v, text_len, image_len, scale, text_weights):
    batch, heads, seq, _ = q.shape
    out = torch.empty_like(q)
    mass = torch.zeros(batch, image_len, dtype=torch.float32, device=q.device)
    image = slice(text_len, text_len + image_len)
    weights = None if text_weights is None else text_weights.to(torch.float32)
    for h0 in range(0, heads, _REF_HEAD_CHUNK):
        hs = slice(h0, min(h0 + _REF_HEAD_CHUNK, heads))
        kh = k[:, hs].float()
        vh = v[:, hs].float()
        for r0 in range(0, seq, _REF_QUERY_BLOCK):
            rows = slice(r0, min(r0 + _REF_QUERY_BLOCK, seq))
            logits = torch.matmul(q[:, hs, rows].float(), kh.transpose(-1, -2)) * scale
            out[:, hs, rows] = torch.matmul(torch.softmax(logits, dim=-1), vh).to(q.dtype)
            if r0 < text_len:
                n_text = min(text_len, rows.stop) - r0
                text_image = torch.softmax(logits[:, :, :n_text, image], dim=-1)  # [B, h, v, u]
                if weights is not None:
                    text_image = text_image * weights[:, None, r0 : r0 + n_text, None]
                mass += text_image.sum(dim=(1, 2))
    return out, mass / heads


def acd_attention_eager(q, k, v, text_len, image_len, scale=None, text_weights=None):
    """The baseline the op replaces, as attention-map tools compute it: per sample, materialize the
    logits q kᵀ·scale `[H, N, N]` and the weights (fp32 softmax cast to q's dtype, like transformers'
    eager attention), out = weights @ v, and read the mass from the text×image block of the
    materialized logits, renormalized over the image keys by an fp32 softmax over that block.
    The mass is computed in fp32 from the logits, not from the q.dtype weights: in float16 the
    image weights of a text row underflow to 0 once the text keys dominate by ~17 nats, and
    renormalizing those zeros gives NaN. Needs H·N² memory per sample; used by benchmarks and the
    dry run.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = torch.empty_like(q)
    mass = torch.empty(q.shape[0], image_len, dtype=torch.float32, device=q.device)
    image = slice(text_len, text_len + image_len)
    for b in range(q.shape[0]):
        logits = torch.matmul(q[b], k[b].transpose(-1, -2)) * scale  # [H, N, N] in q's dtype
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        out[b] = torch.matmul(weights, v[b])
        del weights
        block = torch.softmax(logits[:, :text_len, image].float(), dim=-1)  # [H, T, I] fp32, rows sum to 1
        if text_weights is not None:
            block = block * text_weights[b].float()[None, :, None]
        mass[b] = block.sum(1).mean(0)
        del logits, block
    return out, mass


def _run_backend(q, k, v, text_len, image_len, scale, text_weights, backend, mode):
    if backend == "torch":
        return acd_attention_torch(q, k, v, text_len, image_len, scale, text_weights)
    if backend == "triton":
        from .triton_acd_attention import acd_attention_triton

        return acd_attention_triton(q, k, v, text_len, image_len, scale, text_weights, mode=resolve_mode(mode))
    if backend == "cpp":
        from .cpp_ops import acd_attention_cpp

        return acd_attention_cpp(q, k, v, text_len, image_len, scale, text_weights)
    raise ValueError(f"{OP}: unknown backend {backend!r}")


@torch.library.custom_op("rcgrpo::acd_attention", mutates_args=())
def _acd_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_len: int,
    image_len: int,
    scale: float,
    text_weights: torch.Tensor | None,
    backend: str,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_backend(q, k, v, text_len, image_len, scale, text_weights, backend, mode)


@_acd_attention_op.register_fake
def _(q, k, v, text_len, image_len, scale, text_weights, backend, mode):
    # empty_like keeps q's strides, as every backend does for `out`.
    return torch.empty_like(q), q.new_empty((q.shape[0], image_len), dtype=torch.float32)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """FLOPs of the attention forward (two matmuls), for benchmark TFLOP/s columns."""
    return 4.0 * batch * heads * seq * seq * head_dim


__all__ = [
    "MODES",
    "TRITON_AUTO_MODE",
    "TRITON_MAX_HEAD_DIM",
    "acd_attention",
    "acd_attention_eager",
    "acd_attention_torch",
    "attention_flops",
    "resolve_mode",
]
