"""Edit masks at three granularities (SPEC §2).

pixel mask `[H, W]` (1 = edit) → token mask `m` `[N_img]` (one value per packed latent token,
pooled over the token's pixel patch) → element mask `M` `[N_img·C]` (m repeated over channels).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

POOLINGS = ("max", "mean")


def as_pixel_mask(mask, *, name: str = "mask") -> torch.Tensor:
    """A float `[H, W]` tensor in [0, 1] from a bool/float tensor, numpy array or PIL image."""
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # PIL image
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, numpy array or PIL image, got {type(mask).__name__}")
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [H, W] mask, got shape {tuple(mask.shape)}")
    mask = mask.float()
    if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0 or float(mask.max()) > 1:
        raise ValueError(f"{name}: mask values must be finite and lie in [0, 1]")
    return mask


def token_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Packed-latent token grid `(rows, cols)` of an image: each token covers (2·vae_scale_factor)² pixels."""
    patch = 2 * vae_scale_factor
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}x{width} must be a multiple of {patch} (2 × VAE scale factor {vae_scale_factor})"
        )
    return height // patch, width // patch


def pixel_to_token_mask(
    mask,
    grid: tuple[int, int],
    *,
    pooling: str = "max",
    threshold: float = 0.5,
    name: str = "mask",
) -> torch.Tensor:
    """Pool a pixel mask `[H, W]` onto the token grid: `[rows·cols]` float in [0, 1], row-major.

    pooling="max": a token is edit if any of its pixels is (soft values keep their maximum).
    pooling="mean": a token is edit (1.0) when the mean over its pixels is ≥ threshold, else 0.0.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    pixel = as_pixel_mask(mask, name=name)
    rows, cols = grid
    height, width = pixel.shape
    if height % rows or width % cols:
        raise ValueError(f"{name}: size {height}x{width} does not tile the {rows}x{cols} token grid")
    kernel = (height // rows, width // cols)
    if pooling == "max":
        pooled = F.max_pool2d(pixel[None, None], kernel)
    else:
        pooled = (F.avg_pool2d(pixel[None, None], kernel) >= threshold).float()
    return pooled.reshape(-1)


def check_token_mask(token_mask: torch.Tensor, *, name: str = "mask") -> None:
    """A usable mask has at least one edit token and at least one background token."""
    if token_mask.numel() == 0:
        raise ValueError(f"{name}: the token mask is empty (no image tokens)")
    if float(token_mask.max()) <= 0:
        raise ValueError(f"{name}: the edit mask selects no token (empty edit region)")
    if float(token_mask.min()) >= 1:
        raise ValueError(f"{name}: the edit mask covers every token (no background left to preserve)")


def token_mask_for_image(
    mask,
    height: int,
    width: int,
    vae_scale_factor: int,
    *,
    pooling: str = "max",
    threshold: float = 0.5,
    name: str = "mask",
) -> torch.Tensor:
    """Pixel mask of an `height`×`width` image → checked token mask `[N_img]`."""
    pixel = as_pixel_mask(mask, name=name)
    if tuple(pixel.shape) != (height, width):
        raise ValueError(f"{name}: mask size {pixel.shape[0]}x{pixel.shape[1]} does not match the image size {height}x{width}")
    token_mask = pixel_to_token_mask(pixel, token_grid(height, width, vae_scale_factor), pooling=pooling,
                                     threshold=threshold, name=name)
    check_token_mask(token_mask, name=name)
    return token_mask


def element_mask(token_mask: torch.Tensor, channels: int) -> torch.Tensor:
    """M `[N_img·C]`: the token mask repeated over each token's C channels (latent layout `[N_img, C]`)."""
    return token_mask[:, None].expand(-1, channels).reshape(-1)
