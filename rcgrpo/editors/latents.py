"""Measures on packed latents `[G, N_img, C]` that hold for every editor family."""
from __future__ import annotations

import torch


def background_drift(final_states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Per candidate, the mean squared difference of its final latent `[G, N_img, C]` to the reference
    candidate 0 over the background elements (token mask `[N_img]`, 1 = edit): `[G]`, entry 0 is 0."""
    final = final_states.float()
    background = (1.0 - token_mask.to(device=final.device, dtype=final.dtype))[:, None].expand_as(final[0])
    return ((final - final[0]).square() * background).sum((-1, -2)) / background.sum().clamp_min(1e-12)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x + (σ_next − σ)·v computed in float32 (as FlowMatchEulerDiscreteScheduler.step does), in the velocity's dtype.

    `sigma`/`sigma_next` are scalars or `[B]` (broadcast over tokens and channels).
    """
    dt = (sigma_next - sigma).to(torch.float32)
    if dt.dim() == 1:
        dt = dt[:, None, None]
    return (latents.to(torch.float32) + dt * velocity.to(torch.float32)).to(velocity.dtype)


__all__ = ["background_drift", "euler_step"]
