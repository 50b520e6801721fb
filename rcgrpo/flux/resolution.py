"""The size an edit runs at: the source image's aspect ratio kept, the area set by the model.

    edit_size(height, width, target=1024, multiple=16) -> (h, w)

At FLUX.1-Kontext's own area (target 1024 px, ~1 MP) the size is the pipeline's preferred bucket of the
nearest aspect ratio (diffusers' `PREFERRED_KONTEXT_RESOLUTIONS`, what `_auto_resize` picks); at other
targets (512 px, the tiny models' 32 or 64 px) it is that bucket scaled to the target area. Both sides
are multiples of `multiple` (2 × the VAE scale factor: the packed latent's token grid must tile the
image), so `h·w ≈ target²` and `w/h ≈ width/height`. Square images get `target × target`.
"""
from __future__ import annotations

import math

KONTEXT_AREA_SIDE = 1024


def _buckets() -> list[tuple[int, int]]:
    """(width, height) buckets of FluxKontextPipeline (at about 1024² pixels)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    return list(PREFERRED_KONTEXT_RESOLUTIONS)


def edit_size(height: int, width: int, *, target: int, multiple: int) -> tuple[int, int]:
    """(h, w) of the edit of a `height`×`width` image at about `target`² pixels (see the module docstring)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if target < multiple or multiple < 1:
        raise ValueError(f"target {target} must be at least the size multiple {multiple}")
    if height == width:
        side = max(multiple, target // multiple * multiple)
        return side, side
    aspect = width / height
    _, bucket_w, bucket_h = min((abs(aspect - w / h), w, h) for w, h in _buckets())
    scale = target / KONTEXT_AREA_SIDE
    w = max(multiple, int(round(bucket_w * scale / multiple)) * multiple)
    h = max(multiple, int(round(bucket_h * scale / multiple)) * multiple)
    if abs(math.log((w / h) / aspect)) > abs(math.log((bucket_w / bucket_h) / aspect)) + 0.35:
        # rounding to a coarse multiple at a tiny target moved the aspect too far: fall back to the exact one
        w = max(multiple, int(round(math.sqrt(target * target * aspect) / multiple)) * multiple)
        h = max(multiple, int(round(target * target / w / multiple)) * multiple)
    return h, w


__all__ = ["edit_size"]
