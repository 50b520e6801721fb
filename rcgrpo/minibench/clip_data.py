"""Crops and captions of the tiny MiniBench CLIP (`rcgrpo.minibench.clip`): its training pairs and
its held-out scores.

- `all_captions()`: every local caption MiniBench produces (30 objects, 5 backgrounds).
- `eval_crop(image, mask)`: the crop `rcgrpo eval` hands CLIP (512 px resize, CompBench's PIL box);
  `native_crop(image, mask)`: the crop the trainer's LC-T reward takes (the mask's box at native size).
- `build_training_set(config)`: preprocessed crops and caption ids from MiniBench's train split only.
- `heldout_scores(encoder, ...)`: top-1 caption ranking and LC-T (edit vs source) on the val split.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..rewards.clip import ClipEncoder, clip_preprocess, mask_bbox
from .tasks import (
    BACKGROUND_WORDS,
    COLORS,
    SHAPES,
    TASKS,
    MiniBenchDataset,
    background_caption,
    example_seed,
    generate_example,
    object_caption,
    render_edit,
)

EVAL_CROP_SIZE = 512  # `rcgrpo eval` resizes images and masks to this size before cropping (CompBench)


def all_captions() -> list[str]:
    """Every local caption MiniBench can produce: the 30 objects, then the 5 backgrounds."""
    return [object_caption(c, s) for c in COLORS for s in SHAPES] + [background_caption(k) for k in BACKGROUND_WORDS]


# ----------------------------------------------------------------------------------------------------
# Crops and data
# ----------------------------------------------------------------------------------------------------


def _to_pil(image: torch.Tensor):
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def eval_crop(image: torch.Tensor, mask: torch.Tensor, size: int = EVAL_CROP_SIZE) -> torch.Tensor:
    """The crop `rcgrpo eval` gives CLIP: image (as 8-bit PNG pixels) resized to `size` (bicubic) and the
    mask (nearest), cropped with CompBench's box (`eval.metrics.official_crop_box`). `[3, h, w]` in [0, 1]."""
    from PIL import Image

    from ..eval.metrics import official_crop_box

    m = (mask.detach().float().cpu().numpy() > 0.5).astype(np.uint8) * 255
    msk = Image.fromarray(m, mode="L").resize((size, size), Image.Resampling.NEAREST)
    img = _to_pil(image).resize((size, size), Image.Resampling.BICUBIC)
    box = official_crop_box(msk)
    if box is None or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError("eval_crop: the mask is empty")
    crop = img.crop(box)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def native_crop(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The crop the trainer's LC-T reward takes: the mask's bounding box at the image's own size."""
    box = mask_bbox(mask)
    if box is None:
        raise ValueError("native_crop: the mask is empty")
    top, left, bottom, right = box
    return image[:, top:bottom, left:right]


def _box_mask(box, size: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[box[0]:box[2], box[1]:box[3]] = 1.0
    return mask


def _jitter_box(box, size: int, jitter: int, rng: np.random.Generator) -> list[int]:
    if jitter <= 0:
        return list(box)
    t, l, b, r = (int(v) + int(d) for v, d in zip(box, rng.integers(-jitter, jitter + 1, 4)))
    t, l = min(max(t, 0), size - 2), min(max(l, 0), size - 2)
    b, r = max(min(b, size), t + 2), max(min(r, size), l + 2)
    return [t, l, b, r]


def _example_pairs(ex, rng: np.random.Generator, config) -> list[tuple[torch.Tensor, str]]:
    """(image, caption) pairs of one example; every image is then cropped to the (jittered) mask box."""
    spec = ex.spec
    pairs = [(ex.target, ex.caption)]
    if config.source_crops:
        before = spec.get("before")
        src_caption = (object_caption(before["color"], before["shape"]) if before is not None
                       else background_caption(spec["background"]["kind"]))
        pairs.append((ex.image, src_caption))
    if config.wrong_edit_crops and spec.get("after") is not None:
        after = spec["after"]
        mode = int(rng.integers(3))  # 0: other colour, 1: other shape, 2: both
        color = after["color"] if mode == 1 else [c for c in COLORS if c != after["color"]][int(rng.integers(len(COLORS) - 1))]
        shape = after["shape"] if mode == 0 else [s for s in SHAPES if s != after["shape"]][int(rng.integers(len(SHAPES) - 1))]
        pairs.append((render_edit(spec, color=color, shape=shape), object_caption(color, shape)))
    return pairs


def build_training_set(config, log: Callable[[str], None] | None = None):
    """From a `TinyClipConfig`: (pixels `[N, 3, S, S]` float16 preprocessed as ClipEncoder does, caption ids `[N]` into `all_captions()`)."""
    captions = {c: i for i, c in enumerate(all_captions())}
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xC11B]))
    sizes = [int(s) for s in config.render_sizes]
    crops, labels = [], []
    start = time.time()
    for i in range(config.train_examples):
        task = TASKS[i % len(TASKS)]
        size = sizes[(i // len(TASKS)) % len(sizes)]
        ex = generate_example(example_seed(config.data_seed, "train", i), task=task, size=size, split="train")
        box = ex.spec["mask_box"]
        for image, caption in _example_pairs(ex, rng, config):
            mask = _box_mask(_jitter_box(box, size, config.box_jitter, rng), size)
            use_eval = rng.random() < config.eval_path_fraction
            crops.append(eval_crop(image, mask) if use_eval else native_crop(image, mask))
            labels.append(captions[caption])
        if log is not None and (i + 1) % 2000 == 0:
            log(f"data: {i + 1}/{config.train_examples} examples, {len(labels)} crops ({time.time() - start:.0f} s)")
    pixels = torch.cat([clip_preprocess(crops[k:k + 512], config.image_size).half()
                        for k in range(0, len(crops), 512)])
    return pixels, torch.tensor(labels, dtype=torch.long)


def heldout_scores(encoder: ClipEncoder, *, per_task: int = 50, seed: int = 0, sizes: Sequence[int] = (64,),
                   crop: str = "eval") -> dict:
    """Ranking and LC-T of `encoder` on MiniBench held-out examples (never seen in training).

    For every example (per_task of each task, at each size) the crop of the ground-truth edit
    (`crop="eval"`: as `rcgrpo eval` crops, or `"native"`) is ranked against `all_captions()`.
    Returns {"top1", "chance", "n", "top1_by_task", "lct_edit", "lct_source" (mean CLIPScore =
    100·cos of the edit's / the source's crop vs the caption, per task), "lct_gap_add_replace"}.
    """
    if crop not in ("eval", "native"):
        raise ValueError(f"crop must be 'eval' or 'native', got {crop!r}")
    take = eval_crop if crop == "eval" else native_crop
    captions = all_captions()
    text = encoder.text_embeddings(captions)
    rows = []
    for size in sizes:
        for ex in MiniBenchDataset(per_task=per_task, split="val", seed=seed, size=int(size), cache=False):
            rows.append((ex.task, captions.index(ex.caption), take(ex.target, ex.mask), take(ex.image, ex.mask)))
    edit = encoder.image_embeddings([r[2] for r in rows])
    source = encoder.image_embeddings([r[3] for r in rows])
    labels = torch.tensor([r[1] for r in rows])
    tasks = [r[0] for r in rows]
    correct = ((edit @ text.t()).argmax(dim=1) == labels).float()
    lct_edit = (100.0 * (edit * text[labels]).sum(-1)).clamp_min(0.0)
    lct_source = (100.0 * (source * text[labels]).sum(-1)).clamp_min(0.0)

    def by_task(values):
        return {t: float(values[[k for k, x in enumerate(tasks) if x == t]].mean()) for t in TASKS}

    ar = [k for k, t in enumerate(tasks) if t in ("add", "replace")]
    return {"top1": float(correct.mean()), "chance": 1.0 / len(captions), "n": len(rows),
            "top1_by_task": by_task(correct), "lct_edit": by_task(lct_edit), "lct_source": by_task(lct_source),
            "lct_gap_add_replace": float((lct_edit[ar] - lct_source[ar]).mean())}


__all__ = ["EVAL_CROP_SIZE", "all_captions", "build_training_set", "eval_crop", "heldout_scores", "native_crop"]
