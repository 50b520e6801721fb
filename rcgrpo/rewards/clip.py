"""CLIP rewards on the edit region: LC-T (crop vs local caption) and LC-I (crop vs reference crop).

`ClipEncoder` wraps a transformers `CLIPModel` with torch-only image preprocessing (`clip_preprocess`,
no torchvision). Crops are the bounding box of the mask (`mask_bbox`, exclusive bottom/right).

Training-time and eval-time preprocessing differ on purpose:

- here (training rewards): `clip_preprocess` resizes float `[3, h, w]` tensors in [0, 1] with torch's
  antialiased bicubic, long side `round(size·long/short)`, and captions are truncated to the model's
  length keeping the end-of-text token. It takes batches of decoded images on any device without an
  8-bit round trip, which is what a reward needs.
- `rcgrpo.eval.clip_official` (`rcgrpo eval`, CompBench's numbers): the 8-bit crop is resized with PIL
  bicubic, long side `int(size·long/short)`, as transformers 4's `CLIPImageProcessor` did in the official
  run, and captions are tokenized as torchmetrics' `CLIPScore` does (no truncation; over 77 tokens the
  ids are sliced, which drops the end-of-text token). Where the two size rules disagree, crop pixels
  differ by up to 64/255 (LC-I by ~1e-3, LC-T by ~0.4): close enough for a reward, not for reporting
  the benchmark. Both use the same model and tokenizer (a `ClipEncoder`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..eval.constants import DEFAULT_CLIP_MODEL
import torch.nn.functional as F

from ..io.hub import load_pretrained, shipped_model_path
from .checks import check_reward_inputs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def mask_bbox(mask: torch.Tensor, threshold: float = 0.0) -> tuple[int, int, int, int] | None:
    """Bounding box `(top, left, bottom, right)` of the pixels where `mask > threshold`; bottom/right are
    exclusive (so `image[..., top:bottom, left:right]` is the crop). None for an empty mask."""
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise ValueError(f"mask_bbox: expected a [H, W] or [1, H, W] mask, got {tuple(mask.shape)}")
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"mask_bbox: expected a [H, W] or [1, H, W] mask, got {tuple(mask.shape)}")
    rows = (mask > threshold).any(dim=1).nonzero().flatten()
    cols = (mask > threshold).any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def crop_to_bbox(image: torch.Tensor, bbox: tuple[int, int, int, int]) -> torch.Tensor:
    """`image[..., top:bottom, left:right]` for a `(top, left, bottom, right)` box."""
    top, left, bottom, right = bbox
    return image[..., top:bottom, left:right]


def clip_preprocess(images: Sequence[torch.Tensor], size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's image preprocessing with torch ops (no torchvision): each `[3, h, w]` image in [0, 1] is
    resized so its shorter side is `size` (bicubic, antialiased, like CLIPImageProcessor's PIL resize),
    center-cropped to `size`×`size`, clamped to [0, 1] and normalized with CLIP's mean/std.
    Returns `[N, 3, size, size]` float32."""
    out = []
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    for idx, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"clip_preprocess: image {idx} must be [3, h, w] with h, w ≥ 1, got {tuple(img.shape)}")
        img = img.detach().float().cpu()
        h, w = img.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_long = max(size, int(round(size * long / short)))
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        if (new_h, new_w) != (h, w):
            img = F.interpolate(img[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
        top = (new_h - size) // 2
        left = (new_w - size) // 2
        img = img[:, top : top + size, left : left + size].clamp(0.0, 1.0)
        out.append((img - mean_t) / std_t)
    return torch.stack(out)


def _as_tokenizer(processor):
    """The tokenizer inside a CLIPProcessor-like object, or the object itself when it tokenizes."""
    if processor is None:
        return None
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        return tok
    if callable(processor):
        return processor
    raise ValueError(f"processor {type(processor).__name__} has no `tokenizer` and is not callable as a tokenizer")


def _saved_image_processor(model_id: str):
    """The image processor saved next to a local (or shipped) CLIP folder (`preprocessor_config.json`),
    or None: hub ids keep the defaults below (image size from the vision config, CLIP's mean/std)."""
    folder = shipped_model_path(model_id) or Path(model_id).expanduser()
    if not (folder / "preprocessor_config.json").is_file():
        return None
    try:  # transformers ≥ 5: the PIL backend (no torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    try:
        return Processor.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ValueError(f"CLIP model {model_id!r}: unreadable {str(folder / 'preprocessor_config.json')!r} ({exc})") from None


def _features(output) -> torch.Tensor:
    """CLIP `get_*_features` returns a tensor (transformers 4) or an output with `pooler_output` (5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None and isinstance(output, (tuple, list)):
        pooled = output[1] if len(output) > 1 else output[0]
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__}")
    return pooled


class ClipEncoder:
    """A transformers CLIPModel plus tokenizer, with torch-only image preprocessing (`clip_preprocess`).

    `model`: a CLIPModel, or a hub id / local path / shipped name ("tiny-clip", see
    `rcgrpo.io.hub.SHIPPED_MODELS`) loaded with `CLIPModel.from_pretrained` (default
    `openai/clip-vit-large-patch14`). `processor`: a CLIPProcessor (its `tokenizer`, and its image
    processor's crop size / mean / std when present) or a tokenizer; loaded from the same path when
    `model` is a string and neither `processor` nor `tokenizer` is given. A local or shipped folder's
    `preprocessor_config.json` gives the crop size / mean / std when no processor is passed.
    """

    def __init__(self, model: Any = DEFAULT_CLIP_MODEL, processor: Any = None, *, tokenizer: Any = None,
                 device=None, dtype: torch.dtype | None = None, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 batch_size: int = 32, local_files_only: bool = False):
        self.name = model if isinstance(model, str) else type(model).__name__
        saved_image_processor = None
        if isinstance(model, (str, os.PathLike)):
            from transformers import CLIPModel

            model_id = str(model)
            model = load_pretrained(CLIPModel.from_pretrained, model_id, what="CLIP model", option="--clip-model",
                                    local_files_only=local_files_only)
            if processor is None and tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_id, what="CLIP tokenizer",
                                            option="--clip-model", local_files_only=local_files_only)
            if processor is None:
                saved_image_processor = _saved_image_processor(model_id)
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ValueError(f"ClipEncoder: {type(model).__name__} is not a CLIP model (no get_image_features/get_text_features)")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device, dtype=dtype) if dtype is not None else model.to(self.device)
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = tokenizer if tokenizer is not None else _as_tokenizer(processor)
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            image_processor = saved_image_processor
        if image_size is None:
            crop = getattr(image_processor, "crop_size", None)
            if isinstance(crop, dict):
                image_size = crop.get("height") or crop.get("shortest_edge")
            elif isinstance(crop, int):
                image_size = crop
            elif crop is not None and getattr(crop, "height", None):
                image_size = crop.height
        if image_size is None:
            image_size = int(model.config.vision_config.image_size)
        self.image_size = int(image_size)
        self.mean = tuple(mean or getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(std or getattr(image_processor, "image_std", None) or CLIP_STD)
        self.batch_size = int(batch_size)
        text_cfg = getattr(model.config, "text_config", None)
        self.max_text_len = int(getattr(text_cfg, "max_position_embeddings", 77) or 77)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalized CLIP image embeddings `[N, D]` float32 of `[3, h, w]` images in [0, 1]."""
        feats = []
        for start in range(0, len(images), self.batch_size):
            pixels = clip_preprocess(images[start : start + self.batch_size], self.image_size, self.mean, self.std)
            out = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            feats.append(out.float())
        feats = torch.cat(feats)
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized CLIP text embeddings `[N, D]` float32 (texts truncated to the model's length)."""
        if self.tokenizer is None:
            raise ValueError("ClipEncoder: no tokenizer given (pass processor= or tokenizer=) for text embeddings")
        feats = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t) for t in texts[start : start + self.batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt")
            kwargs = {"input_ids": enc["input_ids"].to(self.device)}
            if "attention_mask" in enc:
                kwargs["attention_mask"] = enc["attention_mask"].to(self.device)
            feats.append(_features(self.model.get_text_features(**kwargs)).float())
        feats = torch.cat(feats)
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _as_encoder(model, processor, tokenizer, device, dtype, local_files_only) -> ClipEncoder:
    if isinstance(model, ClipEncoder):
        return model
    return ClipEncoder(model, processor, tokenizer=tokenizer, device=device, dtype=dtype,
                       local_files_only=local_files_only)


def _bbox_crops(images: torch.Tensor, masks: torch.Tensor, name: str, metadata=None) -> list[torch.Tensor]:
    crops = []
    for i in range(images.shape[0]):
        bbox = mask_bbox(masks[i])
        if bbox is None:
            ex = ""
            if metadata is not None and isinstance(metadata[i], dict) and "id" in metadata[i]:
                ex = f" ({metadata[i]['id']})"
            raise ValueError(f"{name}: the mask of example {i}{ex} is empty; a local CLIP reward needs an edit region")
        crops.append(crop_to_bbox(images[i], bbox))
    return crops


class ClipLocalTextReward:
    """LC-T: CLIP similarity of the edited image's mask bounding-box crop vs the local description.

    The text is `metadata[i][caption_key]` when present and non-empty, else `instructions[i]`.
    `score="cosine"` (default) returns the cosine in [-1, 1]; `score="clipscore"` returns
    CLIPScore = max(100·cosine, 0) as torchmetrics and CompBench report it.
    """

    name = "clip_lct"

    def __init__(self, model: Any = DEFAULT_CLIP_MODEL, processor: Any = None, *, tokenizer: Any = None,
                 device=None, dtype=None, caption_key: str = "caption", score: str = "cosine",
                 local_files_only: bool = False):
        if score not in ("cosine", "clipscore"):
            raise ValueError(f"ClipLocalTextReward: score must be 'cosine' or 'clipscore', got {score!r}")
        self.encoder = _as_encoder(model, processor, tokenizer, device, dtype, local_files_only)
        self.caption_key = caption_key
        self.score = score

    def texts(self, instructions, metadata) -> list[str]:
        out = []
        for i, instruction in enumerate(instructions):
            meta = metadata[i] if metadata is not None else None
            caption = meta.get(self.caption_key) if isinstance(meta, dict) else None
            out.append(str(caption) if caption else str(instruction))
        return out

    def __call__(self, edited, sources, masks, instructions, metadata=None) -> torch.Tensor:
        check_reward_inputs(edited, sources, masks, instructions, metadata, name=self.name, need_sources=False)
        if masks is None or instructions is None:
            raise ValueError(f"{self.name}: needs masks and instructions")
        crops = _bbox_crops(edited, masks, self.name, metadata)
        img = self.encoder.image_embeddings(crops)
        txt = self.encoder.text_embeddings(self.texts(instructions, metadata))
        cos = (img * txt).sum(-1)
        if self.score == "clipscore":
            cos = (100.0 * cos).clamp_min(0.0)
        return cos.float().cpu()


def _load_reference(ref, size: tuple[int, int], name: str, index: int) -> torch.Tensor:
    """A reference image as `[3, H, W]` in [0, 1] at `size` (bicubic resize when it differs)."""
    if isinstance(ref, (str, os.PathLike)):
        from PIL import Image

        path = Path(ref)
        if not path.is_file():
            raise ValueError(f"{name}: reference image of example {index} not found: {str(path)!r}")
        with Image.open(path) as im:
            ref = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    elif hasattr(ref, "convert") and hasattr(ref, "size"):  # PIL
        ref = torch.from_numpy(np.asarray(ref.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if not isinstance(ref, torch.Tensor) or ref.dim() != 3 or ref.shape[0] != 3:
        what = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"{name}: metadata[{index}]['reference'] must be a [3, H, W] tensor, PIL image or path, got {what}")
    ref = ref.detach().float().cpu()
    if tuple(ref.shape[-2:]) != tuple(size):
        ref = F.interpolate(ref[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    return ref


class ClipLocalImageReward:
    """LC-I: cosine of CLIP image embeddings of the mask bounding-box crops of the edited image and of
    the reference image `metadata[i][reference_key]` (resized to the edited image's size first)."""

    name = "clip_lci"

    def __init__(self, model: Any = DEFAULT_CLIP_MODEL, processor: Any = None, *, tokenizer: Any = None,
                 device=None, dtype=None, reference_key: str = "reference", local_files_only: bool = False):
        self.encoder = _as_encoder(model, processor, tokenizer, device, dtype, local_files_only)
        self.reference_key = reference_key

    def __call__(self, edited, sources, masks, instructions, metadata) -> torch.Tensor:
        check_reward_inputs(edited, sources, masks, instructions, metadata, name=self.name, need_sources=False)
        if masks is None or metadata is None:
            raise ValueError(f"{self.name}: needs masks and metadata with a {self.reference_key!r} image per example")
        refs = []
        for i, meta in enumerate(metadata):
            if not isinstance(meta, dict) or meta.get(self.reference_key) is None:
                raise ValueError(f"{self.name}: metadata[{i}] has no {self.reference_key!r} image (needed for LC-I)")
            refs.append(_load_reference(meta[self.reference_key], tuple(edited.shape[-2:]), self.name, i))
        crops = _bbox_crops(edited, masks, self.name, metadata)
        ref_crops = _bbox_crops(torch.stack(refs), masks.cpu(), self.name, metadata)
        a = self.encoder.image_embeddings(crops)
        b = self.encoder.image_embeddings(ref_crops)
        return (a * b).sum(-1).float().cpu()


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_CLIP_MODEL",
    "ClipEncoder",
    "ClipLocalImageReward",
    "ClipLocalTextReward",
    "clip_preprocess",
    "crop_to_bbox",
    "mask_bbox",
]
