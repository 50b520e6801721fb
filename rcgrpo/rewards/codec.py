"""Images on the wire between the reward client and server: base64 PNG strings (never pickle).

`png_size_base64` reads an image's width and height from the first 24 bytes of the PNG (signature and
IHDR chunk, i.e. the first 32 base64 characters), so the server can check pixel limits before it
decodes anything; `decode_png_base64` then decodes PNG only (no other format reaches the decoder).
"""
from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 24  # 8 signature + 4 chunk length + 4 "IHDR" + 4 width + 4 height
_HEADER_CHARS = 32  # base64 characters that hold those 24 bytes


def encode_png_base64(image: torch.Tensor) -> str:
    """A `[3, H, W]` tensor in [0, 1] as a base64 PNG string (8 bits per channel)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_size_base64(data: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG from its IHDR header, without decoding the rest (ValueError if not a PNG)."""
    if not isinstance(data, str):
        raise ValueError(f"not a base64 string (got {type(data).__name__})")
    try:
        head = base64.b64decode(data[:_HEADER_CHARS], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(head) < _HEADER_BYTES or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError("not a PNG image (no PNG signature followed by an IHDR header)")
    width, height = struct.unpack(">II", head[16:24])
    if width == 0 or height == 0:
        raise ValueError(f"a PNG with an empty size {width}x{height}")
    return width, height


def decode_png_base64(data: str):
    """The PIL RGB image of a base64 PNG string (ValueError when it is not a readable PNG)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError(f"not valid base64 ({exc})") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable PNG image ({exc})") from None


__all__ = ["PNG_SIGNATURE", "decode_png_base64", "encode_png_base64", "png_size_base64"]
