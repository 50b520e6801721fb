"""The source image as the Qwen-Image-Edit pipelines prepare it: its sizes, the vision-language input and
the packed VAE latents of the `[text | target | source]` sequence.

    QwenImageEditPipeline      VAE input = VL input = the source resized to about `source_area` pixels
    QwenImageEditPlusPipeline  VAE input at about `source_area`, VL input at about `condition_area` (384²)

Both pipelines size by `calculate_dimensions(area, w / h)` (aspect kept, sides rounded to 32 px) with the
area fixed at 1024² (`STOCK_SOURCE_AREA`), whatever the edit's height and width; `source_area` lets a
training rollout at a small edit size encode a small source. Tensors are turned into 8-bit PIL images
first, as the pipelines' own `numpy_to_pil` does: the pipelines resize PIL images only.
"""
from __future__ import annotations

from dataclasses import dataclass

import PIL.Image
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

STOCK_SOURCE_AREA = 1024 * 1024  # the pipelines' VAE image area (QwenImageEditPlusPipeline: VAE_IMAGE_SIZE)
STOCK_CONDITION_AREA = 384 * 384  # QwenImageEditPlusPipeline's vision-language image area (CONDITION_IMAGE_SIZE)


@dataclass
class PreparedSource:
    """One source image, ready for the text encoder and the VAE."""

    vl_image: PIL.Image.Image  # what the vision-language encoder sees (Plus: the condition image)
    vae_image: torch.Tensor  # [1, 3, 1, H_src, W_src] in [-1, 1], the pipeline's preprocessed VAE input
    source_size: tuple[int, int]  # (H_src, W_src) in pixels
    vl_size: tuple[int, int]  # (height, width) of vl_image

    def vl_input(self, plus: bool):
        """The `image` argument of the pipeline's `encode_prompt` (Plus takes a list of images)."""
        return [self.vl_image] if plus else self.vl_image


def source_dimensions(area: int, width: int, height: int) -> tuple[int, int]:
    """(height, width) the pipelines resize a `width`×`height` image to for an area of about `area` px."""
    if isinstance(area, bool) or not isinstance(area, int) or area < 32 * 32:
        raise ValueError(f"source area must be an int ≥ {32 * 32} pixels, got {area!r}")
    w, h = calculate_dimensions(area, width / height)[:2]
    return int(h), int(w)


def to_pil(image) -> PIL.Image.Image:
    """An RGB PIL image from a PIL image or a `[1, 3, H, W]` / `[3, H, W]` tensor in [0, 1] (rounded to 8 bits
    as diffusers' `VaeImageProcessor.numpy_to_pil` rounds)."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if not isinstance(image, torch.Tensor):
        raise ValueError("source image must be a PIL image or a [1, 3, H, W] tensor in [0, 1], got "
                         f"{type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"source image must be a [1, 3, H, W] tensor in [0, 1], got shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("source image has non-finite values")
    from diffusers.image_processor import VaeImageProcessor

    array = VaeImageProcessor.pt_to_numpy(image.detach().clamp(0, 1))
    return VaeImageProcessor.numpy_to_pil(array)[0]


def prepare_source(pipe, image, *, plus: bool, source_area: int, condition_area: int) -> PreparedSource:
    """Size and preprocess `image` exactly as the pipeline's `__call__` does, at the given areas."""
    pil = to_pil(image)
    width, height = pil.size
    src_h, src_w = source_dimensions(source_area, width, height)
    processor = pipe.image_processor
    if plus:
        cond_h, cond_w = source_dimensions(condition_area, width, height)
        vl_image = processor.resize(pil, cond_h, cond_w)
        vae_image = processor.preprocess(pil, src_h, src_w).unsqueeze(2)
    else:
        vl_image = processor.resize(pil, src_h, src_w)
        vae_image = processor.preprocess(vl_image, src_h, src_w).unsqueeze(2)
    return PreparedSource(vl_image=vl_image, vae_image=vae_image, source_size=(src_h, src_w),
                          vl_size=(vl_image.size[1], vl_image.size[0]))


@torch.no_grad()
def source_latents(pipe, source: PreparedSource, *, plus: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """`[1, N_src, C]` packed, normalized VAE latents of the source (the pipeline's `prepare_latents`)."""
    channels = pipe.transformer.config.in_channels // 4
    vae_input = [source.vae_image] if plus else source.vae_image
    placeholder = torch.zeros(1, 1, 1, device=device, dtype=dtype)  # prepare_latents wants noise; not used
    h, w = source.source_size
    _, latents = pipe.prepare_latents(vae_input, 1, channels, h, w, dtype, device, None, placeholder)
    return latents


__all__ = ["STOCK_CONDITION_AREA", "STOCK_SOURCE_AREA", "PreparedSource", "prepare_source", "source_dimensions",
           "source_latents", "to_pil"]
