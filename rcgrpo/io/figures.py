"""Labelled image figures for reports (matplotlib, Agg backend): grids with titles, column and row
labels and captions, small images enlarged with nearest-neighbour so their pixels can be read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_file

MIN_TILE_PX = 192  # tiles are drawn at least this many pixels on their longer side
DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def as_hwc(image) -> np.ndarray:
    """`[H, W, 3]` float in [0, 1] from a `[3, H, W]` / `[1, H, W]` / `[H, W]` tensor or a `[H, W, 3]` array."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected an image [3, H, W], [1, H, W] or [H, W], got shape {tuple(image.shape)}")
        return torch.nan_to_num(t, nan=0.0).clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy()
    raw = np.asarray(image)
    arr = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
    return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=-1)


def nearest_upscale(arr: np.ndarray, min_side: int = MIN_TILE_PX) -> np.ndarray:
    """Repeat pixels by the integer factor that brings the longer side to at least `min_side`."""
    factor = max(1, -(-min_side // max(arr.shape[:2])))
    if factor == 1:
        return arr
    return arr.repeat(factor, axis=0).repeat(factor, axis=1)


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png", facecolor="white")
    finally:
        plt.close(fig)
    return path


def draw_outline(ax, mask, shape: tuple[int, int], color: str = "white") -> None:
    """Contour of a `[h, w]` mask (any size; stretched over the tile) at level 0.5."""
    m = mask.detach().float().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=np.float32)
    if m.min(initial=0) == m.max(initial=0):
        return
    height, width = shape
    # the mask seen nearest-neighbour at the tile's size, so the contour follows its pixels
    yi = np.minimum((np.arange(height) * m.shape[0]) // height, m.shape[0] - 1)
    xi = np.minimum((np.arange(width) * m.shape[1]) // width, m.shape[1] - 1)
    from matplotlib import patheffects

    contour = ax.contour(m[yi][:, xi], levels=[0.5], colors=[color], linewidths=1.3)
    # a dark rim keeps a white outline visible on light images and colour maps alike
    contour.set(path_effects=[patheffects.Stroke(linewidth=2.8, foreground="black"), patheffects.Normal()])


def save_labelled_grid(rows: list[list], path, *, column_labels: list[str], row_labels: list[str] | None = None,
                       captions: list[list[str]] | None = None, title: str | None = None,
                       outlines: list[list] | None = None, min_tile_px: int = MIN_TILE_PX) -> Path:
    """A PNG of image tiles in rows, with a title, column labels over the first row, row labels on the left,
    captions under each tile and mask outlines (a `[h, w]` mask per tile, or None). Tiles are enlarged with
    nearest-neighbour to at least `min_tile_px` pixels (no smoothing: the pixels stay visible)."""
    if not rows or not rows[0]:
        raise ValueError("save_labelled_grid needs at least one tile")
    n_cols = max(len(r) for r in rows)
    if len(column_labels) != n_cols:
        raise ValueError(f"{len(column_labels)} column labels for {n_cols} columns")
    plt = pyplot()
    tiles = [[nearest_upscale(as_hwc(t), min_tile_px) for t in row] for row in rows]
    tile_h = max(t.shape[0] for row in tiles for t in row)
    tile_w = max(t.shape[1] for row in tiles for t in row)
    label_w = 1.6 if row_labels else 0.0
    cell_w, cell_h = tile_w / DPI + 0.2, tile_h / DPI + (0.45 if captions else 0.2)
    fig_w = label_w + n_cols * cell_w
    fig_h = len(rows) * cell_h + 0.35 + (0.45 if title else 0.0)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(fig_w, fig_h), squeeze=False)
    for r, row in enumerate(tiles):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            ax.imshow(row[c], interpolation="nearest")
            if outlines is not None and outlines[r][c] is not None:
                draw_outline(ax, outlines[r][c], row[c].shape[:2])
            if r == 0:
                ax.set_title(column_labels[c], fontsize=10, fontweight="bold")
            if captions is not None and captions[r][c]:
                ax.set_xlabel(captions[r][c], fontsize=8)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["as_hwc", "draw_outline", "nearest_upscale", "pyplot", "save_figure", "save_labelled_grid"]
