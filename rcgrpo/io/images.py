"""Reading and writing images and masks with clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_file


def _read_array(path, mode: str, name: str) -> np.ndarray:
    """Pixels of an image file converted to PIL `mode`, as float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {str(path)!r}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{name}: {str(path)!r} is not a readable image ({exc})") from None


def load_image(path, *, name: str = "image") -> torch.Tensor:
    """`[3, H, W]` float in [0, 1] from an image file."""
    return torch.from_numpy(_read_array(path, "RGB", name)).permute(2, 0, 1).contiguous()


def load_mask(path, *, name: str = "mask") -> torch.Tensor:
    """`[H, W]` float in [0, 1] from a grayscale/RGB mask file (white = edit region)."""
    return torch.from_numpy(_read_array(path, "L", name))


def to_pil(image: torch.Tensor):
    """PIL RGB image from `[3, H, W]` in [0, 1]."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_image(image: torch.Tensor, path) -> None:
    """Write `[3, H, W]` in [0, 1] as PNG atomically (temp file, then rename)."""
    with atomic_file(path) as tmp:
        to_pil(image).save(tmp, format="PNG")


def image_grid(images: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Tile equally sized `[3, H, W]` images into one `[3, rows·H, columns·W]` image."""
    rows = (len(images) + columns - 1) // columns
    _, h, w = images[0].shape
    grid = torch.ones(3, rows * h, columns * w)
    for idx, img in enumerate(images):
        r, c = divmod(idx, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = img.detach().float().cpu()
    return grid
