"""Images on the wire between the reward client and server: base64 PNG strings (never pickle)."""
from __future__ import annotations

import base64
import io

import numpy as np
import torch


def encode_png_base64(image: torch.Tensor) -> str:
    """A `[3, H, W]` tensor in [0, 1] as a base64 PNG string (8 bits per channel)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png_base64(data: str):
    """The PIL RGB image of a base64 PNG/JPEG string (ValueError when it is not one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not valid base64 ({exc})") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None


__all__ = ["decode_png_base64", "encode_png_base64"]
