"""Background preservation rewards: PSNR and SSIM of the edited image vs the source outside the mask.

Both follow CompBench's convention: the masked (edit) region is zeroed in both images and stays part
of the image, so it dilutes the mean squared error. PSNR of identical backgrounds is +inf; it is capped
at `PSNR_CAP_DB` so rewards stay finite.
"""
from __future__ import annotations

import torch

from .checks import check_reward_inputs

PSNR_CAP_DB = 100.0
"""PSNR (dB) reported for identical backgrounds, whose true PSNR is +inf."""


def masked_background(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`images · (1 − masks)`: the masked (edit) region zeroed, soft masks weighting pixels."""
    return images * (1.0 - masks.to(images.dtype))


def background_psnr(edited, sources, masks, instructions=None, metadata=None, *, cap_db: float = PSNR_CAP_DB):
    """PSNR (dB, data range 1) per example between edited and source with the masked region zeroed.

    `10·log10(1 / mse)` with the mean over all C·H·W values of the zeroed images (CompBench's
    convention). Identical backgrounds give +inf, reported as `cap_db`; values above it are capped.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    check_reward_inputs(edited, sources, masks, instructions, metadata, name="background_psnr")
    preds = masked_background(edited.float(), masks)
    target = masked_background(sources.float(), masks)
    values = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    values = torch.nan_to_num(values, nan=cap_db, posinf=cap_db).clamp(max=cap_db)
    return values.float().reshape(edited.shape[0])


def background_ssim(edited, sources, masks, instructions=None, metadata=None):
    """SSIM (data range 1, 11×11 Gaussian window σ = 1.5, torchmetrics defaults) per example between
    edited and source with the masked region zeroed. 1 for identical backgrounds."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    check_reward_inputs(edited, sources, masks, instructions, metadata, name="background_ssim")
    if min(edited.shape[-2:]) < 11:
        raise ValueError(f"background_ssim: images must be at least 11x11 pixels (SSIM window), got {tuple(edited.shape[-2:])}")
    preds = masked_background(edited.float(), masks)
    target = masked_background(sources.float(), masks)
    values = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    return values.float().reshape(edited.shape[0])


__all__ = ["PSNR_CAP_DB", "background_psnr", "background_ssim", "masked_background"]
