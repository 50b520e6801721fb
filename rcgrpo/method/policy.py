"""The surrogate "leaping" policy and the clipped GRPO objective (SPEC §5-6, paper Eq. 4-5, 12-15).

Region-normalized distance (our reconstruction of the supplement's Eq. B.3):

    S_in  = Σ_d M_d (x_d − y_d)²          S_out = Σ_d (1 − M_d)(x_d − y_d)²
    d²_C  = s · (D/2) · [ S_in / (τ_edit² (|M| + ε)) + S_out / (τ_base² (D − |M| + ε)) ]

    log π(i | j, k) = log_softmax_i(−½ d²_C(x^(i)_{j+1}, x̄^(k)_{j+1}))

    L = −mean_{k,j,i} min(A_i ρ_i, A_i clip(ρ_i, 1 − ε_clip, 1 + ε_clip)) + β·mean((x̄(θ) − x̄(ref))²)
    with log ρ = clamp(log π_θ − log π_old, −10, 10).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rcgrpo_kernels import region_sq_dists

LOG_RATIO_CLAMP = 10.0


def distance_from_region_sums(
    sums: torch.Tensor,
    mask_sum: torch.Tensor | float,
    dim: int,
    *,
    tau_edit: float,
    tau_base: float,
    scale: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """d²_C from region sums `[..., 2]` (S_in, S_out): the one place the metric is assembled."""
    s_in, s_out = sums[..., 0], sums[..., 1]
    inside = s_in / (tau_edit**2 * (mask_sum + eps))
    outside = s_out / (tau_base**2 * (dim - mask_sum + eps))
    return scale * (dim / 2.0) * (inside + outside)


def region_normalized_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_edit: float = 0.9,
    tau_base: float = 1.1,
    scale: float = 1.0,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """d²_C between candidates x `[T, G, D]` and anchors y `[T, K, D]` under element mask `[D]`: `[T, K, G]`."""
    _check_taus(tau_edit, tau_base, scale)
    sums = region_sq_dists(x, y, mask, backend=backend)
    return distance_from_region_sums(
        sums, mask.sum(dtype=sums.dtype), x.shape[-1], tau_edit=tau_edit, tau_base=tau_base, scale=scale, eps=eps
    )


def surrogate_log_probs(
    states_next: torch.Tensor,
    anchor_pred: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_edit: float = 0.9,
    tau_base: float = 1.1,
    scale: float = 1.0,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """log π(i | j, k) `[T, K, G]`: softmax over the G candidate states `[T, G, D]` of −½ d²_C to each anchor `[T, K, D]`."""
    dist = region_normalized_distance(
        states_next, anchor_pred, mask, tau_edit=tau_edit, tau_base=tau_base, scale=scale, eps=eps, backend=backend
    )
    return torch.log_softmax(-0.5 * dist, dim=-1)


@dataclass
class LossStats:
    """Diagnostics of one `grpo_loss` call (floats, detached)."""

    policy_loss: float
    kl_loss: float
    ratio_mean: float
    ratio_max: float
    ratio_min: float
    clip_fraction: float


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    anchor_pred: torch.Tensor | None = None,
    anchor_ref: torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    """Clipped GRPO objective for one group.

    Args:
        log_probs: log π_θ `[T, K, G]` (carries the gradient).
        old_log_probs: log π_old `[T, K, G]` (no gradient needed).
        advantages: A `[G]`.
        beta: weight of the `mean((anchor_pred − anchor_ref)²)` regulariser (needs both tensors).
        return_stats: also return a `LossStats` (ratio, clip fraction, loss parts).
    Returns:
        the scalar loss, or `(loss, stats)` with `return_stats=True`.
    """
    if log_probs.shape != old_log_probs.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and old_log_probs {tuple(old_log_probs.shape)} must match")
    if advantages.dim() != 1 or advantages.shape[0] != log_probs.shape[-1]:
        raise ValueError(
            f"advantages must have shape [G] = [{log_probs.shape[-1]}], got {tuple(advantages.shape)}"
        )
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    log_ratio = torch.clamp(log_probs - old_log_probs.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    unclipped = adv * ratio
    clipped = adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    policy_loss = -torch.minimum(unclipped, clipped).mean()
    kl = policy_loss.new_zeros(())
    if beta:
        if anchor_pred is None or anchor_ref is None:
            raise ValueError("beta > 0 needs anchor_pred and anchor_ref (the base model's prediction)")
        kl = (anchor_pred.float() - anchor_ref.detach().float()).square().mean()
    loss = policy_loss + beta * kl
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = LossStats(
            policy_loss=float(policy_loss),
            kl_loss=float(kl),
            ratio_mean=float(ratio.mean()),
            ratio_max=float(ratio.max()),
            ratio_min=float(ratio.min()),
            clip_fraction=float(((ratio - 1.0).abs() > clip_eps).float().mean()),
        )
    return loss, stats


def _check_taus(tau_edit: float, tau_base: float, scale: float) -> None:
    for name, value in (("tau_edit", tau_edit), ("tau_base", tau_base), ("distance_scale", scale)):
        if not (float(value) > 0):
            raise ValueError(f"{name} must be > 0, got {value!r}")
