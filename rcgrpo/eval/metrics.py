"""The per-example CompBench metrics, step for step as the official `eval_all.py` computes them.

1. Source, edit and ground truth are converted to RGB and resized to `size`×`size` (512) with PIL
   bicubic, the mask converted to L and resized with PIL nearest, each on its own (their sizes need not
   agree). Pixels become float32 `/255`; the mask `m = L/255` (soft masks stay soft).
2. Background: both images times `(1 − m)`. PSNR (data range 1, over all 3·size² values; identical
   backgrounds give +inf, reported as `psnr_cap_db`), SSIM (torchmetrics defaults: 11×11 Gaussian
   window, σ = 1.5) and LPIPS (SqueezeNet, inputs `2·x − 1`) of the edit against the source.
3. Edit region: the box `(min x, min y, max x, max y)` of the resized mask's pixels > 0, given to
   `PIL.Image.crop` as is, so its last row and column are left out, as in the official script. A box with
   no width or height (empty, 1-pixel or 1-pixel-wide masks) gives LC-T = LC-I = 0. LC-T and LC-I of
   the crops: `rcgrpo.eval.clip_official` (transformers 4's PIL preprocessing, torchmetrics' CLIPScore
   tokenization). Without a ground truth LC-I is NaN (left out of the means, as the official script does).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .constants import EVAL_SIZE

from ..rewards.background import PSNR_CAP_DB, background_psnr, background_ssim, masked_background
from ..rewards.clip import ClipEncoder
from .clip_official import OfficialClip, lci_channel_quirk

METRICS = ("LC-I", "LC-T", "PSNR", "SSIM", "LPIPS")
HIGHER_IS_BETTER = {"LC-I": True, "LC-T": True, "PSNR": True, "SSIM": True, "LPIPS": False}


def official_crop_box(mask_img) -> tuple[int, int, int, int] | None:
    """`(left, top, right, bottom)` = (min x, min y, max x, max y) of the mask pixels > 0, the box that
    CompBench's `eval_all.py` passes to `PIL.Image.crop` (whose right/bottom are exclusive). None when the
    mask is empty."""
    arr = np.asarray(mask_img)
    ys, xs = np.where(arr > 0)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _to_tensor(img) -> torch.Tensor:
    """`[1, 3, H, W]` float32 in [0, 1] of an 8-bit RGB PIL image."""
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def official_inputs(source, edited, mask, ground_truth, size: int = EVAL_SIZE):
    """The four images as the official script prepares them: RGB (L for the mask), each resized to
    `size`×`size` on its own (bicubic; the mask nearest). Returns (source, edited, mask, ground truth or None)."""
    from PIL import Image

    def rgb(img):
        return img.convert("RGB").resize((size, size), resample=Image.Resampling.BICUBIC)

    msk = mask.convert("L").resize((size, size), resample=Image.Resampling.NEAREST)
    return rgb(source), rgb(edited), msk, (rgb(ground_truth) if ground_truth is not None else None)


@torch.no_grad()
def compute_example_metrics(source, edited, mask, ground_truth, captions: Sequence[str], *, size: int = EVAL_SIZE,
                            clip: OfficialClip | ClipEncoder | None = None, lpips: Callable | None = None,
                            device=None, psnr_cap_db: float = PSNR_CAP_DB,
                            notes: list[str] | None = None) -> dict[str, float]:
    """The CompBench metrics of one example from PIL images (see the module docstring).

    Metrics whose model is None (clip, lpips) are left out; LC-I is NaN without a ground truth. `notes`,
    when given, receives a line about anything where the official script would not give this number.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    src, out, msk, gt = official_inputs(source, edited, mask, ground_truth, size)
    mask_t = torch.from_numpy(np.asarray(msk, dtype=np.float32) / 255.0)[None, None].to(device)
    src_t = _to_tensor(src).to(device)
    out_t = _to_tensor(out).to(device)
    psnr = float(background_psnr(out_t, src_t, mask_t, cap_db=math.inf)[0])
    if notes is not None and psnr > psnr_cap_db:
        notes.append(f"PSNR {'+inf' if math.isinf(psnr) else f'{psnr:.2f} dB'} (identical backgrounds) "
                     f"reported as the cap, {psnr_cap_db:g} dB")
    result: dict[str, float] = {
        "PSNR": min(psnr, psnr_cap_db),
        "SSIM": float(background_ssim(out_t, src_t, mask_t)[0]),
    }
    if lpips is not None:
        bg_src, bg_out = masked_background(src_t, mask_t), masked_background(out_t, mask_t)
        result["LPIPS"] = float(lpips(bg_out * 2 - 1, bg_src * 2 - 1).reshape(-1)[0])
    if clip is not None:
        if isinstance(clip, ClipEncoder):
            clip = OfficialClip(clip)
        box = official_crop_box(msk)
        if box is not None and box[2] > box[0] and box[3] > box[1]:
            crop = out.crop(box)
            result["LC-T"] = clip.lc_t(crop, list(captions))
            if gt is not None:
                result["LC-I"] = clip.lc_i(crop, gt.crop(box))
                if notes is not None and lci_channel_quirk(crop.height):
                    notes.append(f"LC-I crop is {crop.height} px tall: the official script's transformers 4 reads it "
                                 "channel-first (it fails on 1 px and scrambles 3 px); scored here as an image")
            else:
                result["LC-I"] = float("nan")
        else:
            result["LC-T"] = 0.0
            result["LC-I"] = 0.0
    return result


__all__ = ["EVAL_SIZE", "HIGHER_IS_BETTER", "METRICS", "compute_example_metrics", "official_crop_box",
           "official_inputs"]
