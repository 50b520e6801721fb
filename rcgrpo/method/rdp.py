"""Region-Decoupled Perturbation (SPEC §3, paper Eq. 10-11).

    α      = α_edit·M + α_base·(1 − M)
    ε^(0)  = ε*                                   (reference, unperturbed)
    ε^(i)  = sqrt(1 − α²) ⊙ ε* + α ⊙ δ^(i)        i = 1..G−1, ε*, δ^(i) ~ N(0, I)

The variance-preserving mix keeps every ε^(i) marginally N(0, I). α_edit = α_base = σ gives
Neighbor GRPO's global perturbation.
"""
from __future__ import annotations

import torch


def perturbation_scale(mask: torch.Tensor, alpha_edit: float, alpha_base: float) -> torch.Tensor:
    """α = α_edit·M + α_base·(1 − M), element-wise, same shape as `mask`."""
    return alpha_edit * mask + alpha_base * (1.0 - mask)


def region_decoupled_noise(
    shape,
    mask: torch.Tensor,
    *,
    group_size: int,
    alpha_edit: float = 0.3,
    alpha_base: float = 0.02,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A group of initial noises `[G, *shape]`; candidate 0 is the reference ε*.

    `mask` is broadcastable to `shape` (an element mask of `shape`, or a token mask `[N_img, 1]`
    for latents `[N_img, C]`; a 1-D token mask `[N_img]` is accepted for `[N_img, C]` shapes).
    Noise is drawn in float32 on the generator's device, in a fixed order: ε*, then δ^(1..G−1).
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int ≥ 2 (a reference and at least one perturbed candidate), got {group_size!r}")
    for name, value in (("alpha_edit", alpha_edit), ("alpha_base", alpha_base)):
        if not (0.0 <= float(value) <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    mask = mask.float()
    if mask.dim() == 1 and len(shape) == 2 and mask.shape[0] == shape[0]:
        mask = mask[:, None]
    try:
        torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the noise shape {shape}") from None
    gen_device = generator.device if generator is not None else torch.device("cpu")
    base = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    deltas = torch.randn((group_size - 1, *shape), generator=generator, device=gen_device, dtype=torch.float32)
    alpha = perturbation_scale(mask.to(gen_device), alpha_edit, alpha_base)
    perturbed = torch.sqrt(1.0 - alpha.square()) * base + alpha * deltas
    noises = torch.cat([base[None], perturbed], dim=0)
    return noises.to(device=device if device is not None else gen_device, dtype=dtype)
