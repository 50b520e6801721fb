"""ACD heatmaps: the text→image attention mass a(u) (SPEC §7) drawn over the edited image.

`save_acd_heatmap(image, path, mass)` blends the mass (a capture of `rcgrpo.editors.acd`, or a mass
tensor) onto the image with a colour map and outlines the edit mask, in a PNG of the image's size.
`save_acd_figure(image, path, mass, title=...)` draws the report's version: source, the density per
token with a colour bar, and the overlay, with a title and panel labels, small images enlarged.
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
    """A capture of `rcgrpo.editors.acd` (duck-typed: it has `mass` and `token_mask`)."""
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


def _render(image, mass, calls, index, mask, grid, alpha, cmap, outline_color):
    """(overlay `[H, W, 3]` uint8, mass grid `[rows, cols]`, bool pixel mask or None) of the heatmap."""
    from matplotlib import colormaps

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
    binary = None
    if mask is not None:
        binary = _mask_array(mask, index, (rows, cols), (height, width))
        edge = _outline(binary, max(1, min(height, width) // 128))
        out[edge] = np.asarray(outline_color, dtype=np.uint8)
    return out, values.reshape(rows, cols), rgb, binary


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
    `save_acd_figure` draws the same with a title, panel labels and a colour bar.
    """
    from PIL import Image

    out, *_ = _render(image, mass, calls, index, mask, grid, alpha, cmap, outline_color)
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")
    return path


def acd_density(values: torch.Tensor) -> torch.Tensor:
    """a(u)·N_img / Σ_u a(u): the attention mass per token relative to a uniform spread (1 = uniform);
    ACD (SPEC §7) is its mean over the edit tokens."""
    total = float(values.sum())
    return values * values.numel() / total if total > 0 else torch.zeros_like(values)


def save_acd_figure(
    image,
    path,
    mass,
    *,
    calls=None,
    index: int = 0,
    mask=None,
    grid: tuple[int, int] | None = None,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    min_side: int = 256,
) -> Path:
    """A labelled ACD figure (PNG): the source with the edit mask outlined, the attention density per token
    (a(u) relative to uniform, with a colour bar) and the overlay of `save_acd_heatmap`. Arguments as
    `save_acd_heatmap`; `title` goes on top (with the ACD value when a mask is known). Small images are
    drawn enlarged with nearest-neighbour (at least `min_side` pixels), the token grid as blocks."""
    from ..io.figures import draw_outline, nearest_upscale, pyplot, save_figure

    overlay, values, rgb, binary = _render(image, mass, calls, index, mask, grid, alpha, cmap, (255, 255, 255))
    density = acd_density(values)
    acd, token_mask = None, None
    if binary is not None:
        # the tokens of the outlined region (max pooling, SPEC §2)
        token_mask = F.adaptive_max_pool2d(torch.from_numpy(binary).float()[None, None], tuple(values.shape))[0, 0]
        if bool((token_mask > 0).any()):
            acd = float(density[token_mask > 0].mean())
    plt = pyplot()
    height, width = rgb.shape[:2]
    side = max(min_side, max(height, width))
    panel_w, panel_h = side / 100 * width / max(height, width), side / 100 * height / max(height, width)
    fig, axes = plt.subplots(1, 3, figsize=(3 * panel_w + 1.6, panel_h + 1.1))
    source = nearest_upscale(rgb, min_side)
    axes[0].imshow(source, interpolation="nearest")
    axes[0].set_title("source" + (" (edit mask outlined)" if binary is not None else ""), fontsize=9)
    if binary is not None:
        draw_outline(axes[0], binary.astype(np.float32), source.shape[:2])
    blocks = nearest_upscale(density.numpy(), min_side)  # one block per token
    im = axes[1].imshow(blocks, cmap=cmap, interpolation="nearest", vmin=0.0)
    axes[1].set_title(f"density per token ({values.shape[0]}x{values.shape[1]})", fontsize=9)
    if token_mask is not None:
        draw_outline(axes[1], token_mask, blocks.shape[:2])
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    bar = fig.colorbar(im, cax=make_axes_locatable(axes[1]).append_axes("right", size="5%", pad=0.06))
    bar.set_label("a(u) / mean a (1 = uniform)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    axes[2].imshow(nearest_upscale(overlay, min_side), interpolation="nearest")
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    heading = title or "ACD: text-to-image attention mass"
    if acd is not None:
        heading += f"   (ACD {acd:.2f}: mean density inside the mask)"
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["acd_density", "save_acd_figure", "save_acd_heatmap"]
