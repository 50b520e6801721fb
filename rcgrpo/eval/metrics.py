"""The per-example CompBench metrics of `eval_all.py`: background PSNR / SSIM / LPIPS, LC-T, LC-I."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..rewards.background import PSNR_CAP_DB, background_psnr, background_ssim, masked_background
from ..rewards.clip import ClipEncoder

METRICS = ("LC-I", "LC-T", "PSNR", "SSIM", "LPIPS")
HIGHER_IS_BETTER = {"LC-I": True, "LC-T": True, "PSNR": True, "SSIM": True, "LPIPS": False}
EVAL_SIZE = 512


def official_crop_box(mask_img) -> tuple[int, int, int, int] | None:
    """`(left, top, right, bottom)` = (min x, min y, max x, max y) of the mask pixels > 0, the box that
    CompBench's `eval_all.py` passes to `PIL.Image.crop` (whose right/bottom are exclusive). None when the
    mask is empty."""
    arr = np.asarray(mask_img)
    ys, xs = np.where(arr > 0)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _pil_to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@torch.no_grad()
def compute_example_metrics(source, edited, mask, ground_truth, captions: Sequence[str], *, size: int = EVAL_SIZE,
                            clip: ClipEncoder | None = None, lpips: Callable | None = None,
                            device=None, psnr_cap_db: float = PSNR_CAP_DB) -> dict[str, float]:
    """The CompBench metrics of one example from PIL images (see the module docstring).

    Metrics whose model is None (clip, lpips) are left out; LC-I is NaN without a ground truth.
    """
    from PIL import Image

    device = torch.device(device) if device is not None else torch.device("cpu")
    src = source.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    out = edited.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    msk = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
    gt = ground_truth.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) if ground_truth is not None else None

    mask_t = torch.from_numpy(np.asarray(msk, dtype=np.float32) / 255.0)[None, None].to(device)
    src_t = _pil_to_tensor(src)[None].to(device)
    out_t = _pil_to_tensor(out)[None].to(device)
    result: dict[str, float] = {
        "PSNR": float(background_psnr(out_t, src_t, mask_t, cap_db=psnr_cap_db)[0]),
        "SSIM": float(background_ssim(out_t, src_t, mask_t)[0]),
    }
    if lpips is not None:
        bg_src, bg_out = masked_background(src_t, mask_t), masked_background(out_t, mask_t)
        result["LPIPS"] = float(lpips(bg_out * 2 - 1, bg_src * 2 - 1).reshape(-1)[0])
    if clip is not None:
        box = official_crop_box(msk)
        if box is not None and box[2] > box[0] and box[3] > box[1]:
            crop = _pil_to_tensor(out.crop(box))
            captions = [c for c in captions if c] or [" "]
            img_emb = clip.image_embeddings([crop])
            txt_emb = clip.text_embeddings(list(captions))
            result["LC-T"] = float((100.0 * (img_emb * txt_emb).sum(-1)).clamp_min(0.0).mean())
            if gt is not None:
                emb = clip.image_embeddings([crop, _pil_to_tensor(gt.crop(box))])
                result["LC-I"] = float((emb[0] * emb[1]).sum())
            else:
                result["LC-I"] = float("nan")
        else:
            result["LC-T"] = 0.0
            result["LC-I"] = 0.0
    return result


__all__ = ["EVAL_SIZE", "HIGHER_IS_BETTER", "METRICS", "compute_example_metrics", "official_crop_box"]
