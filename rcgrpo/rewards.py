"""Reward functions for RC-GRPO: one signature, composable with weights.

Every reward is a plain callable

    reward(edited, sources, masks, instructions, metadata) -> Tensor[B] float32

- `edited`: `Tensor[B, 3, H, W]` float in [0, 1], the candidate edits;
- `sources`: `Tensor[B, 3, H, W]` float in [0, 1], the images that were edited;
- `masks`: `Tensor[B, 1, H, W]` float in [0, 1], 1 = edit region, 0 = background to preserve;
- `instructions`: `list[str]` of length B, the edit instructions;
- `metadata`: `list[dict]` of length B, per-example extras (`"caption"`: the local description of the
  edited region, `"reference"`: a reference/ground-truth image as a `[3, H, W]` tensor in [0, 1], a PIL
  image or a file path, `"id"`, `"task"`, ...).

Higher is better for every reward. Provided here:

- `background_psnr`, `background_ssim`: PSNR / SSIM (data range 1, torchmetrics) of the edited image vs
  the source with the masked region zeroed in both, per example (CompBench's convention: the zeroed
  region is part of the image, identical in both, so it dilutes the mean squared error). PSNR of identical
  backgrounds is +inf; it is capped at `PSNR_CAP_DB` (100 dB) so rewards stay finite.
- `ClipLocalTextReward` (LC-T): CLIP similarity of the crop to the mask's bounding box vs the local
  description (`metadata["caption"]`, else the instruction).
- `ClipLocalImageReward` (LC-I): cosine of CLIP image embeddings of the bounding-box crops of the edited
  image and of `metadata["reference"]`.
- `EditScoreClient`: scores from an EditScore reward server over HTTP (`rcgrpo.reward_server`).
- `WeightedReward([(fn, w), ...])`: the weighted sum, with each function's values kept for logging.
- `check_reward_output(values, batch, name)`: validates what a reward returned.
- `resolve_reward(name_or_callable, **kwargs)`: names → reward callables.
"""
from __future__ import annotations

import base64
import importlib
import io
import json
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
"""PSNR (dB) reported for identical backgrounds, whose true PSNR is +inf."""

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RewardFn = Callable[..., torch.Tensor]

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_CLIP_MODEL",
    "PSNR_CAP_DB",
    "ClipEncoder",
    "ClipLocalImageReward",
    "ClipLocalTextReward",
    "EditScoreClient",
    "RewardServerError",
    "WeightedReward",
    "WeightsUnavailableError",
    "background_psnr",
    "background_ssim",
    "check_reward_inputs",
    "check_reward_output",
    "clip_preprocess",
    "crop_to_bbox",
    "decode_png_base64",
    "encode_png_base64",
    "load_pretrained",
    "mask_bbox",
    "masked_background",
    "resolve_reward",
    "reward_name",
]


# ----------------------------------------------------------------------------------------------------
# Validation


def check_reward_inputs(edited, sources, masks, instructions, metadata, *, name: str = "reward",
                        need_sources: bool = True) -> int:
    """Check the common reward arguments; returns the batch size B. Raises ValueError naming `name`."""
    if not isinstance(edited, torch.Tensor) or edited.dim() != 4 or edited.shape[1] != 3:
        shape = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
        raise ValueError(f"{name}: `edited` must be a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not edited.is_floating_point():
        raise ValueError(f"{name}: `edited` must be a float tensor in [0, 1], got dtype {edited.dtype}")
    batch, _, height, width = edited.shape
    if need_sources or sources is not None:
        if not isinstance(sources, torch.Tensor) or tuple(sources.shape) != tuple(edited.shape):
            shape = tuple(sources.shape) if isinstance(sources, torch.Tensor) else type(sources).__name__
            raise ValueError(f"{name}: `sources` must have the shape of `edited` {tuple(edited.shape)}, got {shape}")
        if not sources.is_floating_point():
            raise ValueError(f"{name}: `sources` must be a float tensor in [0, 1], got dtype {sources.dtype}")
    if masks is not None:
        if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (batch, 1, height, width):
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(f"{name}: `masks` must be a tensor [B, 1, H, W] = {(batch, 1, height, width)}, got {shape}")
    if instructions is not None and len(instructions) != batch:
        raise ValueError(f"{name}: got {len(instructions)} instructions for a batch of {batch} images")
    if metadata is not None and len(metadata) != batch:
        raise ValueError(f"{name}: got {len(metadata)} metadata entries for a batch of {batch} images")
    return batch


def check_reward_output(values, batch: int, name: str) -> torch.Tensor:
    """Validate a reward's output: a 1-D float tensor of `batch` finite values. Returns it as float32.

    Raises ValueError naming the reward and what was expected.
    """
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"reward {name!r} returned {type(values).__name__}; expected a float tensor of shape [{batch}]")
    if not values.is_floating_point():
        raise ValueError(f"reward {name!r} returned dtype {values.dtype}; expected a floating-point tensor of shape [{batch}]")
    if values.dim() != 1 or values.shape[0] != batch:
        raise ValueError(f"reward {name!r} returned shape {tuple(values.shape)}; expected [{batch}] (one value per image)")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"reward {name!r} returned non-finite values at indices {bad[:8]}"
            f" ({values[bad[0]].item()} at index {bad[0]}); rewards must be finite"
        )
    return values.float()


def reward_name(fn) -> str:
    """A readable name for a reward callable: its `name` attribute, function name or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return "reward" if name == "<lambda>" else name
    return type(fn).__name__


# ----------------------------------------------------------------------------------------------------
# Background preservation


def masked_background(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`images · (1 − masks)`: the masked (edit) region zeroed, soft masks weighting pixels."""
    return images * (1.0 - masks.to(images.dtype))


def background_psnr(edited, sources, masks, instructions=None, metadata=None, *, cap_db: float = PSNR_CAP_DB):
    """PSNR (dB, data range 1) per example between edited and source with the masked region zeroed.

    `10·log10(1 / mse)` with the mean over all C·H·W values of the zeroed images (CompBench's
    convention). Identical backgrounds give +inf, reported as `cap_db`; values above it are capped.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    check_reward_inputs(edited, sources, masks, instructions, metadata, name="background_psnr")
    preds = masked_background(edited.float(), masks)
    target = masked_background(sources.float(), masks)
    values = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    values = torch.nan_to_num(values, nan=cap_db, posinf=cap_db).clamp(max=cap_db)
    return values.float().reshape(edited.shape[0])


def background_ssim(edited, sources, masks, instructions=None, metadata=None):
    """SSIM (data range 1, 11×11 Gaussian window σ = 1.5, torchmetrics defaults) per example between
    edited and source with the masked region zeroed. 1 for identical backgrounds."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    check_reward_inputs(edited, sources, masks, instructions, metadata, name="background_ssim")
    if min(edited.shape[-2:]) < 11:
        raise ValueError(f"background_ssim: images must be at least 11x11 pixels (SSIM window), got {tuple(edited.shape[-2:])}")
    preds = masked_background(edited.float(), masks)
    target = masked_background(sources.float(), masks)
    values = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    return values.float().reshape(edited.shape[0])


# ----------------------------------------------------------------------------------------------------
# Masks, crops and CLIP


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


class WeightsUnavailableError(FileNotFoundError):
    """Model weights could not be found locally and could not be downloaded."""


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub endpoint accepts a TCP connection (a quick check, to fail fast offline
    instead of waiting for the hub client's retries)."""
    try:
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            return False, "HF_HUB_OFFLINE is set"
        endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    except Exception:  # noqa: BLE001 - no hub client: let from_pretrained decide
        endpoint = "https://huggingface.co"
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return False, f"cannot reach {endpoint} ({exc})"
    return True, ""


def load_pretrained(load: Callable[..., Any], name_or_path: str, *, what: str, option: str | None = None,
                    local_files_only: bool = False, **kwargs):
    """`load(name_or_path, **kwargs)` (a `from_pretrained`) with a clear error when weights are missing.

    A local directory loads directly. A hub id loads from the local cache first; only when it is not
    cached and the hub is reachable is it downloaded. Offline and uncached, this fails at once with a
    `WeightsUnavailableError` naming the model and suggesting a local path (instead of the hub client's
    minute of retries).
    """
    hint = f" (pass {option} /local/path/to/model)" if option else " (pass a local directory instead)"
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        try:
            return load(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsUnavailableError(f"could not load {what} from local path {str(path)!r}: {exc}") from None
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1:  # a path, not an org/name hub id
        raise WeightsUnavailableError(f"{what}: local path {text!r} does not exist")
    try:
        return load(str(name_or_path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_exc:
        if local_files_only:
            raise WeightsUnavailableError(
                f"{what} {str(name_or_path)!r} is not a local path and not in the local Hugging Face cache{hint}"
            ) from None
        reachable, why = _hub_reachable()
        if not reachable:
            raise WeightsUnavailableError(
                f"{what} {str(name_or_path)!r} is not a local path, not in the local Hugging Face cache, and it "
                f"cannot be downloaded: {why}{hint}"
            ) from None
        del cached_exc
    try:
        return load(str(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(f"could not load {what} {str(name_or_path)!r}: {exc}{hint}") from None


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

    `model`: a CLIPModel, or a hub id / local path loaded with `CLIPModel.from_pretrained` (default
    `openai/clip-vit-large-patch14`). `processor`: a CLIPProcessor (its `tokenizer`, and its image
    processor's crop size / mean / std when present) or a tokenizer; loaded from the same path when
    `model` is a string and neither `processor` nor `tokenizer` is given.
    """

    def __init__(self, model: Any = DEFAULT_CLIP_MODEL, processor: Any = None, *, tokenizer: Any = None,
                 device=None, dtype: torch.dtype | None = None, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 batch_size: int = 32, local_files_only: bool = False):
        self.name = model if isinstance(model, str) else type(model).__name__
        if isinstance(model, (str, os.PathLike)):
            from transformers import CLIPModel

            model_id = str(model)
            model = load_pretrained(CLIPModel.from_pretrained, model_id, what="CLIP model", option="--clip-model",
                                    local_files_only=local_files_only)
            if processor is None and tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_id, what="CLIP tokenizer",
                                            option="--clip-model", local_files_only=local_files_only)
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ValueError(f"ClipEncoder: {type(model).__name__} is not a CLIP model (no get_image_features/get_text_features)")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device, dtype=dtype) if dtype is not None else model.to(self.device)
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = tokenizer if tokenizer is not None else _as_tokenizer(processor)
        image_processor = getattr(processor, "image_processor", None)
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


# ----------------------------------------------------------------------------------------------------
# EditScore over HTTP


class RewardServerError(RuntimeError):
    """The reward server could not be reached, failed, or returned invalid scores."""


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


class EditScoreClient:
    """Reward from an EditScore server (`python -m rcgrpo.reward_server`): JSON over HTTP, never pickle.

    Each batch of `batch_size` examples is one `POST {url}/score` with body
    `{"edited": [base64 PNG], "sources": [base64 PNG], "instructions": [str]}`; the answer is
    `{"scores": [float, ...]}`, one finite float per example. Connection errors, timeouts and 5xx answers
    are retried `retries` times with exponential backoff (`backoff · 2^attempt` seconds); 4xx answers
    (e.g. 413, request too large) fail at once. Every error is a `RewardServerError` naming the URL.
    """

    name = "editscore"

    def __init__(self, url: str, *, batch_size: int = 8, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, send_sources: bool = True):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"EditScoreClient: url must be http(s)://host:port, got {url!r}")
        if batch_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("EditScoreClient: batch_size ≥ 1, timeout > 0, retries ≥ 0 and backoff ≥ 0 are required")
        self.url = url.rstrip("/")
        self.display_url = redact_url(self.url)  # what errors and logs show: no user:password
        self.score_url = self.url if parsed.path.rstrip("/").endswith("/score") else self.url + "/score"
        self.batch_size = int(batch_size)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.send_sources = send_sources

    def health(self) -> dict:
        """GET /health of the server (RewardServerError when it does not answer)."""
        base = self.score_url[: -len("/score")]
        try:
            with urllib.request.urlopen(base + "/health", timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RewardServerError(f"reward server at {self.display_url} did not answer /health: {exc}") from None

    def __call__(self, edited, sources, masks, instructions, metadata=None) -> torch.Tensor:
        batch = check_reward_inputs(edited, sources if self.send_sources else None, masks, instructions, metadata,
                                    name=self.name, need_sources=self.send_sources)
        if instructions is None:
            raise ValueError(f"{self.name}: needs one instruction per image")
        scores: list[float] = []
        for start in range(0, batch, self.batch_size):
            stop = min(start + self.batch_size, batch)
            payload = {
                "edited": [encode_png_base64(edited[i]) for i in range(start, stop)],
                "instructions": [str(t) for t in instructions[start:stop]],
            }
            if self.send_sources:
                payload["sources"] = [encode_png_base64(sources[i]) for i in range(start, stop)]
            scores.extend(self._post(payload, stop - start, start))
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, payload: dict, count: int, offset: int) -> list[float]:
        body = json.dumps(payload).encode("utf-8")
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            req = urllib.request.Request(self.score_url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code >= 500:
                    last_error = f"HTTP {exc.code}: {detail}"
                    continue
                if exc.code == 413:
                    raise RewardServerError(
                        f"reward server at {self.display_url} rejected a request of {len(body)} bytes as too large "
                        f"(HTTP 413: {detail}); lower batch_size or raise the server's --max-request-mb"
                    ) from None
                raise RewardServerError(f"reward server at {self.display_url} rejected the request (HTTP {exc.code}: {detail})") from None
            except (TimeoutError, socket.timeout):
                last_error = f"no answer within the {self.timeout:g} s timeout"
                continue
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last_error = f"no answer within the {self.timeout:g} s timeout"
                else:
                    last_error = f"cannot connect ({reason}); is the server running?"
                continue
            except (ConnectionError, OSError) as exc:  # reset / broken pipe mid-request
                last_error = f"connection failed ({exc})"
                continue
            return self._parse(raw, count, offset)
        raise RewardServerError(
            f"reward server at {self.display_url} failed after {self.retries + 1} attempt(s): {last_error}"
        )

    def _parse(self, raw: bytes, count: int, offset: int) -> list[float]:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RewardServerError(f"reward server at {self.display_url} answered with invalid JSON ({exc})") from None
        scores = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(scores, list):
            raise RewardServerError(f"reward server at {self.display_url} answered without a 'scores' list: {str(data)[:200]}")
        if len(scores) != count:
            raise RewardServerError(f"reward server at {self.display_url} returned {len(scores)} scores for {count} images")
        out = []
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
                raise RewardServerError(
                    f"reward server at {self.display_url} returned a non-finite or non-numeric score {s!r} for example "
                    f"{offset + i}; scores must be finite floats"
                )
            out.append(float(s))
        return out


def redact_url(url: str) -> str:
    """`url` without the user:password part, for messages and saved configs."""
    parsed = urllib.parse.urlparse(url)
    if not (parsed.username or parsed.password):
        return url
    host = parsed.hostname or ""
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return urllib.parse.urlunparse(parsed._replace(netloc=f"***@{host}"))


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return exc.reason if isinstance(exc.reason, str) else str(exc)
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])[:500]
    except ValueError:
        pass
    return text.strip()[:500] or str(exc.reason)


# ----------------------------------------------------------------------------------------------------
# Composition and lookup


class WeightedReward:
    """The weighted sum `Σ_k w_k · f_k(...)` of reward callables, every part validated.

    `compute_all(...)` returns `{name: values [B]}` for every function (names from `reward_name`, made
    unique with `_2`, `_3`, ...); `__call__` returns the weighted sum and keeps the parts in
    `self.components` for logging.
    """

    name = "weighted"

    def __init__(self, rewards: Iterable[tuple[RewardFn, float]]):
        self.rewards: list[tuple[str, RewardFn, float]] = []
        seen: dict[str, int] = {}
        for idx, item in enumerate(rewards):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"WeightedReward: item {idx} must be a (reward_fn, weight) pair, got {item!r}")
            fn, weight = item
            fn = resolve_reward(fn) if isinstance(fn, str) else fn
            if not callable(fn):
                raise ValueError(f"WeightedReward: item {idx} ({fn!r}) is not callable")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"WeightedReward: weight of item {idx} must be a number, got {weight!r}") from None
            if not math.isfinite(weight):
                raise ValueError(f"WeightedReward: weight of item {idx} must be finite, got {weight}")
            base = reward_name(fn)
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}_{seen[base]}"
            self.rewards.append((name, fn, weight))
        if not self.rewards:
            raise ValueError("WeightedReward: give at least one (reward_fn, weight) pair")
        self.components: dict[str, torch.Tensor] = {}

    @property
    def weights(self) -> dict[str, float]:
        return {name: w for name, _fn, w in self.rewards}

    def compute_all(self, edited, sources, masks, instructions, metadata) -> dict[str, torch.Tensor]:
        batch = edited.shape[0]
        out = {}
        for name, fn, _w in self.rewards:
            out[name] = check_reward_output(fn(edited, sources, masks, instructions, metadata), batch, name).cpu()
        return out

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, _fn, weight in self.rewards:
            part = weight * components[name]
            total = part if total is None else total + part
        return total.float()

    def __call__(self, edited, sources, masks, instructions, metadata) -> torch.Tensor:
        self.components = self.compute_all(edited, sources, masks, instructions, metadata)
        return self.combine(self.components)


REWARD_NAMES = ("background_psnr", "background_ssim", "clip_lct", "clip_lci", "editscore")


def resolve_reward(name_or_callable, **kwargs) -> RewardFn:
    """A reward callable from a name, a `"module:function"` path, or a callable (returned as is).

    Names: `background_psnr` (kwargs: cap_db), `background_ssim`, `clip_lct` (ClipLocalTextReward
    kwargs, e.g. model=, processor=), `clip_lci` (ClipLocalImageReward kwargs), `editscore`
    (EditScoreClient kwargs; `url` is required). `"pkg.module:attr"` imports `attr` (called with
    kwargs when it is a class or factory and kwargs are given).
    """
    if callable(name_or_callable) and not isinstance(name_or_callable, str):
        if kwargs:
            raise ValueError(f"resolve_reward: keyword arguments {sorted(kwargs)} given with a callable")
        return name_or_callable
    if not isinstance(name_or_callable, str):
        raise ValueError(f"resolve_reward: expected a reward name or callable, got {type(name_or_callable).__name__}")
    name = name_or_callable.strip()
    if name == "background_psnr":
        if kwargs:
            cap = kwargs.pop("cap_db", PSNR_CAP_DB)
            if kwargs:
                raise ValueError(f"resolve_reward: background_psnr takes only cap_db, got {sorted(kwargs)}")

            def psnr(edited, sources, masks, instructions=None, metadata=None):
                return background_psnr(edited, sources, masks, instructions, metadata, cap_db=cap)

            psnr.__name__ = "background_psnr"
            return psnr
        return background_psnr
    if name == "background_ssim":
        if kwargs:
            raise ValueError(f"resolve_reward: background_ssim takes no options, got {sorted(kwargs)}")
        return background_ssim
    if name == "clip_lct":
        return ClipLocalTextReward(**kwargs)
    if name == "clip_lci":
        return ClipLocalImageReward(**kwargs)
    if name == "editscore":
        if "url" not in kwargs:
            raise ValueError("resolve_reward: 'editscore' needs url=http://host:port of a running reward server")
        return EditScoreClient(kwargs.pop("url"), **kwargs)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"resolve_reward: cannot import {name!r} ({exc})") from None
        if kwargs or isinstance(obj, type):
            obj = obj(**kwargs)
        if not callable(obj):
            raise ValueError(f"resolve_reward: {name!r} is not callable")
        return obj
    raise ValueError(f"resolve_reward: unknown reward {name!r}; choose one of {', '.join(REWARD_NAMES)}, "
                     "a 'module:function' path, or pass a callable")
