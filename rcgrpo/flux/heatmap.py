"""ACD heatmaps: the text→image attention mass a(u) (SPEC §7) drawn over the edited image.

`save_acd_heatmap(image, path, mass)` blends the mass (a capture of `rcgrpo.flux.attention`, or a mass
tensor) onto the image with a colour map and outlines the edit mask.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io.files import atomic_file


def _image_array(image) -> np.ndarray:
    """`[H, W, 3]` uint8 from a PIL image or a `[3, H, W]` / `[1, 3, H, W]` tensor in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        t = t.float().clamp(0, 1).expand(3, -1, -1)
        return (t.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"image must be a PIL image or a [3, H, W] tensor, got {type(image).__name__}")


def _infer_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """Token grid `(rows, cols)` with rows·cols = n_tokens and the image's aspect ratio (square for square images)."""
    rows = int(round(math.sqrt(n_tokens * height / width)))
    for r in (rows, rows - 1, rows + 1):
        if r >= 1 and n_tokens % r == 0:
            cols = n_tokens // r
            if abs(r / cols - height / width) <= 0.25 * height / width:
                return r, cols
    raise ValueError(f"cannot infer a token grid for {n_tokens} tokens on a {height}x{width} image; pass grid=(rows, cols)")


def _is_capture(source) -> bool:
    """A capture of `rcgrpo.flux.attention` (duck-typed: it has `mass` and `token_mask`)."""
    return hasattr(source, "mass") and hasattr(source, "token_mask") and not isinstance(source, torch.Tensor)


def _select_mass(source, calls, index: int) -> torch.Tensor:
    """`[N_img]` mass of image `index`, averaged over the selected calls."""
    mass = source.mass if _is_capture(source) else torch.as_tensor(source)
    mass = mass.detach().float()
    if mass.dim() == 3:  # [calls, B, N]
        if calls is not None:
            selector = [calls] if isinstance(calls, int) else list(calls)
            if not selector:
                raise ValueError("calls must select at least one recorded call")
            mass = mass[selector]
        mass = mass.mean(0)
    elif calls is not None:
        raise ValueError("calls= needs a capture or a [calls, B, N_img] mass")
    if mass.dim() == 2:
        mass = mass[index]
    if mass.dim() != 1:
        raise ValueError(f"mass must be [N_img], [B, N_img] or [calls, B, N_img], got shape {tuple(mass.shape)}")
    return mass.cpu()


def _mask_array(mask, index: int, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Bool `[H, W]` edit mask from a token mask `[N_img]`/`[B, N_img]` or a pixel mask `[h, w]` (PIL, array, tensor)."""
    height, width = size
    if hasattr(mask, "convert") and hasattr(mask, "size"):
        mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).detach().float().cpu()
    rows, cols = grid
    if m.dim() == 2 and m.shape[-1] == rows * cols and tuple(m.shape) != (rows, cols) and m.shape[0] != height:
        m = m[index]
    if m.dim() == 1:
        if m.numel() != rows * cols:
            raise ValueError(f"token mask has {m.numel()} entries, the grid {rows}x{cols} needs {rows * cols}")
        m = m.reshape(rows, cols)
    if m.dim() != 2:
        raise ValueError(f"mask must be a token mask [N_img] or a pixel mask [H, W], got shape {tuple(m.shape)}")
    m = F.interpolate(m[None, None], size=(height, width), mode="nearest")[0, 0]
    return (m >= 0.5).numpy()


def _outline(binary: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of `binary` within `thickness` of its boundary with the background."""
    background = torch.from_numpy(~binary).float()[None, None]
    near_bg = F.max_pool2d(background, 2 * thickness + 1, stride=1, padding=thickness)[0, 0].numpy() > 0
    return binary & near_bg


def save_acd_heatmap(
    image,
    path,
    mass,
    *,
    calls=None,
    index: int = 0,
    mask=None,
    grid: tuple[int, int] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    outline_color: tuple[int, int, int] = (255, 255, 255),
) -> Path:
    """Render the ACD mass over `image` and save a PNG of the image's size; returns the path.

    image: PIL image or `[3, H, W]` tensor in [0, 1]. mass: a `Capture`, or a mass tensor `[N_img]`,
    `[B, N_img]` or `[calls, B, N_img]`. calls: None (mean over all calls), an int (one call) or a
    list of call indices. index: which image of the batch. mask: token mask `[N_img]`/`[B, N_img]` or
    pixel mask `[h, w]` whose outline is drawn (default: the capture's token mask). grid: token grid
    `(rows, cols)`, inferred from the image's aspect ratio by default. Written atomically.
    """
    from matplotlib import colormaps
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = _image_array(image)
    height, width = rgb.shape[:2]
    values = _select_mass(mass, calls, index)
    rows, cols = grid if grid is not None else _infer_grid(values.numel(), height, width)
    if rows * cols != values.numel():
        raise ValueError(f"grid {rows}x{cols} does not hold {values.numel()} tokens")
    heat = F.interpolate(values.reshape(1, 1, rows, cols), size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0]
    lo, hi = float(heat.min()), float(heat.max())
    heat = (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)
    colors = colormaps[cmap](heat.numpy())[..., :3] * 255.0
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colors
    out = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    if mask is None and _is_capture(mass):
        mask = mass.token_mask
    if mask is not None:
        edge = _outline(_mask_array(mask, index, (rows, cols), (height, width)), max(1, min(height, width) // 128))
        out[edge] = np.asarray(outline_color, dtype=np.uint8)

    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")
    return path


__all__ = ["save_acd_heatmap"]
