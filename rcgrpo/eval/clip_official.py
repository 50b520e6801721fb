"""LC-T and LC-I with CLIP exactly as CompBench's official `eval_all.py` computes them.

The official run called transformers 4's `CLIPImageProcessor` (PIL backend) and torchmetrics' `CLIPScore`:

- Images (`PilClipPreprocessing`): the 8-bit RGB crop is resized with PIL (bicubic, the processor's
  `resample`) so that its short side is `shortest_edge` and its long side `int(shortest_edge·long/short)`
  (truncated, not rounded), center-cropped to `crop_size` (top/left offsets floored), multiplied by
  `rescale_factor` (1/255) in float64, cast to float32 and normalized with the processor's mean/std.
  transformers 5 moved that path to `CLIPImageProcessorPil` (its `CLIPImageProcessor` is the torchvision
  backend, which needs torchvision); this module does the same few steps itself, so the numbers do not
  depend on the installed transformers version (the tests compare it with `CLIPImageProcessorPil`).
- Captions (`clipscore_text_inputs`): tokenized as torchmetrics' `CLIPScore` does: one caption at a
  time, no truncation; when the ids are longer than the text model's `max_position_embeddings` (77), the
  ids and the attention mask are sliced to that length, which drops the end-of-text token, and the text
  model pools whatever its pooling rule then picks (for CLIP with an `eos_token_id` in its config, the
  first position when no end-of-text token is left). LC-T = mean over the captions of
  `max(100·cos(image, caption), 0)`; an example without a caption uses `" "`, as the official script.
- LC-I: the edited and the ground-truth crops go through the image path as one batch of two;
  `F.cosine_similarity` of the two feature vectors.

One official quirk is not reproduced: transformers 4 infers the channel axis from the first image, so a
PIL crop 1 or 3 pixels tall (`HWC` with H in {1, 3}) is read channel-first; the official LC-I then fails
(1 px) or scores a scrambled image (3 px). Here such crops are scored as images and
`lci_channel_quirk(height)` lets `rcgrpo eval` list those examples.

The training-time CLIP rewards (`rcgrpo.rewards.clip.clip_preprocess`) resize float tensors with torch
(batched, any device, no 8-bit round trip) and round the long side; they truncate captions keeping the
end-of-text token. That is fine for a reward and off by up to 64/255 per pixel for reporting the
benchmark, hence this separate path. The model and tokenizer are the same (`ClipEncoder`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..rewards.clip import CLIP_MEAN, CLIP_STD, ClipEncoder

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the `resample` of CLIP's preprocessor config


@dataclass(frozen=True)
class PilClipPreprocessing:
    """transformers 4's `CLIPImageProcessor` (PIL backend) for 8-bit RGB images (see the module docstring)."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = PIL_BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.shortest_edge < max(self.crop_height, self.crop_width):
            raise ValueError(f"CLIP preprocessing: shortest_edge {self.shortest_edge} is smaller than the crop "
                             f"{self.crop_height}x{self.crop_width} (padding crops are not supported)")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"CLIP preprocessing: mean and std need 3 values, got {self.mean} and {self.std}")

    @classmethod
    def from_config(cls, config: dict | None, *, default_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> "PilClipPreprocessing":
        """From a `preprocessor_config.json` dict (old `size: 224` / `crop_size: 224` ints or the newer
        dicts); None gives `default_size` for both sizes and the given mean/std."""
        if not config:
            return cls(default_size, default_size, default_size, tuple(mean), tuple(std))
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if config.get(flag) is False:
                raise ValueError(f"CLIP preprocessor config sets {flag}=false, which rcgrpo eval does not support")
        size = config.get("size", default_size)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"CLIP preprocessor config: size {size} has no 'shortest_edge'")
            size = size["shortest_edge"]
        crop = config.get("crop_size", size)
        crop_h, crop_w = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), int(crop_h), int(crop_w), tuple(config.get("image_mean") or mean),
                   tuple(config.get("image_std") or std), int(config.get("resample", PIL_BICUBIC)),
                   float(config.get("rescale_factor", 1 / 255)))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the shortest-edge resize: the long side is `int(size·long/short)`."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def __call__(self, image) -> np.ndarray:
        """`[3, crop_height, crop_width]` float32 pixel values of a PIL image or `[H, W, 3]` uint8 array."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"CLIP preprocessing: expected an [H, W, 3] uint8 array, got {image.dtype} {image.shape}")
            pil = Image.fromarray(image)
        else:
            pil = image.convert("RGB")
        new_h, new_w = self.output_size(pil.height, pil.width)
        arr = np.asarray(pil.resize((new_w, new_h), resample=Image.Resampling(self.resample)))
        top = (new_h - self.crop_height) // 2
        left = (new_w - self.crop_width) // 2
        arr = arr[top : top + self.crop_height, left : left + self.crop_width]
        x = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def batch(self, images: Sequence[Any]) -> torch.Tensor:
        """`[N, 3, crop_height, crop_width]` float32."""
        return torch.from_numpy(np.stack([self(im) for im in images]))


def clipscore_text_inputs(tokenizer, caption: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` `[1, L]` of one caption as torchmetrics' `CLIPScore` makes them:
    tokenized with padding and without truncation, then both sliced to `max_length` positions."""
    enc = tokenizer([caption], padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    mask = enc.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    return ids[..., :max_length], mask[..., :max_length]


def lci_channel_quirk(crop_height: int) -> bool:
    """Whether the official script's transformers 4 reads an LC-I crop of this height channel-first."""
    return crop_height in (1, 3)


def _tensor(output) -> torch.Tensor:
    """`get_*_features` returns a tensor (transformers 4) or an output with `pooler_output` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def read_preprocessor_config(model_id: str) -> dict | None:
    """The `preprocessor_config.json` of a local CLIP folder or a hub id (cache first), or None."""
    import json

    folder = Path(str(model_id)).expanduser()
    if folder.is_dir():
        file = folder / "preprocessor_config.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--clip-model {model_id!r}: unreadable {str(file)!r} ({exc})") from None
    from transformers.image_processing_utils import ImageProcessingMixin

    from ..io.hub import WeightsUnavailableError, load_pretrained

    def read(name, **kwargs):
        return ImageProcessingMixin.get_image_processor_dict(name, **kwargs)[0]

    try:
        return load_pretrained(read, str(model_id), what="CLIP preprocessor config", option="--clip-model")
    except WeightsUnavailableError:
        return None


class OfficialClip:
    """LC-T and LC-I of one example as the official script computes them (see the module docstring).

    `encoder`: a `ClipEncoder` (its model and tokenizer); `preprocessing`: a `PilClipPreprocessing`
    (default: from the encoder's image size, mean and std). `OfficialClip.load(model_id)` reads the
    model's own `preprocessor_config.json` too.
    """

    def __init__(self, encoder: ClipEncoder, preprocessing: PilClipPreprocessing | None = None):
        self.encoder = encoder
        self.name = encoder.name
        self.preprocessing = preprocessing or PilClipPreprocessing(
            encoder.image_size, encoder.image_size, encoder.image_size, tuple(encoder.mean), tuple(encoder.std))
        text_cfg = getattr(encoder.model.config, "text_config", None)
        self.max_text_len = int(getattr(text_cfg, "max_position_embeddings", None) or encoder.max_text_len)

    @classmethod
    def load(cls, model_id: str, *, device=None) -> "OfficialClip":
        encoder = ClipEncoder(model_id, device=device)
        config = read_preprocessor_config(model_id)
        prep = PilClipPreprocessing.from_config(config, default_size=encoder.image_size, mean=encoder.mean,
                                                std=encoder.std) if config else None
        return cls(encoder, prep)

    @torch.no_grad()
    def _image_features(self, crops) -> torch.Tensor:
        pixels = self.preprocessing.batch(crops).to(self.encoder.device, self.encoder.dtype)
        return _tensor(self.encoder.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def lc_t(self, crop, captions: Sequence[str]) -> float:
        """Mean over `captions` of CLIPScore = max(100·cos, 0) of the crop (PIL) and each caption."""
        if self.encoder.tokenizer is None:
            raise ValueError("LC-T needs the CLIP tokenizer")
        captions = [c for c in captions if c] or [" "]
        img = self._image_features([crop])
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        scores = []
        for caption in captions:
            ids, mask = clipscore_text_inputs(self.encoder.tokenizer, caption, self.max_text_len)
            txt = _tensor(self.encoder.model.get_text_features(input_ids=ids.to(self.encoder.device),
                                                               attention_mask=mask.to(self.encoder.device))).float()
            txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
            score = 100.0 * (img * txt).sum(dim=-1)
            scores.append(float(torch.clamp_min(score, 0.0)[0]))
        return float(np.mean(scores))

    @torch.no_grad()
    def lc_i(self, crop, ground_truth_crop) -> float:
        """Cosine similarity of the CLIP image features of the two crops (PIL), computed as one batch."""
        feats = self._image_features([crop, ground_truth_crop])
        return float(F.cosine_similarity(feats[0:1], feats[1:2])[0])


__all__ = ["OfficialClip", "PilClipPreprocessing", "clipscore_text_inputs", "lci_channel_quirk",
           "read_preprocessor_config"]
