"""The size an edit runs at: the source image's aspect ratio kept, the area set by the model.

    edit_size(height, width, target=1024, multiple=16) -> (h, w)

For FLUX.1-Kontext (targets above 64 px) the size is the pipeline's preferred bucket of the nearest
aspect ratio (diffusers' `PREFERRED_KONTEXT_RESOLUTIONS`, what its `_auto_resize` picks), scaled to
`target`² pixels when the target is not Kontext's own 1024; for the tiny models (64 px and below) it
is the exact aspect at an area of `target`². Both sides are multiples of `multiple` (2 × the VAE scale
factor: the packed latent's token grid must tile the image). `rcgrpo edit` and the trainer use it,
so an image is edited at the same size by both. The arithmetic is `rcgrpo.io.images.fit_size`.
"""
from __future__ import annotations

TINY_RESOLUTION_LIMIT = 64  # at or below this target the tiny models size edits by area, not by Kontext's buckets


def edit_size(height: int, width: int, *, target: int, multiple: int) -> tuple[int, int]:
    """(h, w) of the edit of a `height`×`width` image at about `target`² pixels (see the module docstring)."""
    from ...io.images import fit_size

    buckets = None
    if target > TINY_RESOLUTION_LIMIT:
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        buckets = list(PREFERRED_KONTEXT_RESOLUTIONS)
    return fit_size(height, width, area=target * target, multiple=multiple, buckets=buckets)


__all__ = ["TINY_RESOLUTION_LIMIT", "edit_size"]
