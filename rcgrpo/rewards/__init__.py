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

Higher is better for every reward. A reward that waits on another process or machine declares it with
a class or function attribute `asynchronous = True`: the trainer then calls it from a background
thread while it rolls out the step's next group (`rcgrpo.train.scoring`), so it must be safe to call
concurrently with itself, and it receives CPU tensors. An optional int attribute `retry_count` (requests
resent so far) is logged per step as `reward/retries`. Everything else runs inline, as called.

Provided here:

- `background_psnr`, `background_ssim`: PSNR / SSIM (data range 1, torchmetrics) of the edited image vs
  the source with the masked region zeroed in both, per example (CompBench's convention: the zeroed
  region is part of the image, identical in both, so it dilutes the mean squared error). PSNR of identical
  backgrounds is +inf; it is capped at `PSNR_CAP_DB` (100 dB) so rewards stay finite.
- `ClipLocalTextReward` (LC-T): CLIP similarity of the crop to the mask's bounding box vs the local
  description (`metadata["caption"]`, else the instruction).
- `ClipLocalImageReward` (LC-I): cosine of CLIP image embeddings of the bounding-box crops of the edited
  image and of `metadata["reference"]`.
- `EditScoreClient`: scores from an EditScore reward server over HTTP (`rcgrpo.rewards.server`);
  asynchronous.
- `EditScorePool`: the same over several servers, least outstanding requests first, a failing server
  set aside and its batch resent to another (`rcgrpo.rewards.pool`); asynchronous.
- `WeightedReward([(fn, w), ...])`: the weighted sum, with each function's values kept for logging.
- `check_reward_output(values, batch, name)`: validates what a reward returned.
- `resolve_reward(name_or_callable, **kwargs)`: names → reward callables.
"""
from __future__ import annotations

from ..io.hub import WeightsUnavailableError, load_pretrained
from .background import PSNR_CAP_DB, background_psnr, background_ssim, masked_background
from .checks import RewardFn, check_reward_inputs, check_reward_output, reward_name
from .clip import (CLIP_MEAN, CLIP_STD, DEFAULT_CLIP_MODEL, ClipEncoder, ClipLocalImageReward, ClipLocalTextReward,
                   clip_preprocess, crop_to_bbox, mask_bbox)
from .codec import decode_png_base64, encode_png_base64
from .editscore import EditScoreClient, RewardServerError, redact_url
from .pool import EditScorePool, RewardsUnavailableError, split_urls
from .registry import REWARD_NAMES, WeightedReward, resolve_reward

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_CLIP_MODEL",
    "PSNR_CAP_DB",
    "REWARD_NAMES",
    "ClipEncoder",
    "ClipLocalImageReward",
    "ClipLocalTextReward",
    "EditScoreClient",
    "EditScorePool",
    "RewardFn",
    "RewardServerError",
    "RewardsUnavailableError",
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
    "redact_url",
    "resolve_reward",
    "reward_name",
    "split_urls",
]
