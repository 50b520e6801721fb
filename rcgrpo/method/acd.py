"""Attention Concentration Density from attention mass (SPEC §7, paper Eq. 16-18).

    ACD_{l,t} = ( Σ_u a(u) m(u) / (|m| + ε) ) / ( Σ_u a(u) / (N_img + ε) )
    R_acd     = mean over the selected layers l and all steps t of ACD_{l,t}

`a(u)` is the per-image-token mass from `rcgrpo_kernels.acd_attention`. ACD is 1 when the mass is
uniform over the image and grows as it concentrates inside the edit mask.
"""
from __future__ import annotations

import torch

ACD_EPS = 1e-6


def acd_from_mass(mass: torch.Tensor, token_mask: torch.Tensor, *, eps: float = ACD_EPS) -> torch.Tensor:
    """ACD per image from mass `[..., B, N_img]` and token mask `[N_img]` or `[B, N_img]`: `[..., B]`."""
    if mass.dim() < 2:
        raise ValueError(f"mass must be [..., B, N_img], got shape {tuple(mass.shape)}")
    n_img = mass.shape[-1]
    if token_mask.shape[-1] != n_img or token_mask.dim() > 2:
        raise ValueError(f"token_mask must be [N_img] or [B, N_img] with N_img = {n_img}, got {tuple(token_mask.shape)}")
    mass = mass.float()
    m = token_mask.to(device=mass.device, dtype=torch.float32)
    inside = (mass * m).sum(-1) / (m.sum(-1) + eps)
    overall = mass.sum(-1) / (n_img + eps)
    return inside / overall


def acd_reward(acd_per_call: torch.Tensor) -> torch.Tensor:
    """R_acd `[B]`: the mean of ACD over attention calls (layers × steps) `[calls, B]`."""
    if acd_per_call.dim() != 2 or acd_per_call.shape[0] == 0:
        raise ValueError(f"expected ACD values [calls ≥ 1, B], got shape {tuple(acd_per_call.shape)}")
    return acd_per_call.mean(0)
