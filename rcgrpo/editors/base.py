"""`Editor`: what RC-GRPO needs of a flow-matching image editor, one implementation per model family.

The method (SPEC §3-7) sees an editor only through this interface, so the trainer, `rcgrpo edit`,
`rcgrpo eval`, the dry run, the heatmaps and the ACD recorder work for every family alike:

    editor.edit_size(h, w, target)            (h', w') the family edits an h×w image at, about target² px
    editor.latent_shape(h, w)                 (N_img, C) of the packed target latents
    editor.token_grid(h, w)                   (rows, cols) of the target tokens, rows·cols = N_img
    editor.encode_text(instruction, image)    TextConditions: prompt embeddings (+ negative ones for true
                                              CFG) and `acd_weights` `[N_txt]`: 1 on the instruction's
                                              own tokens, 0 on padding / template / vision tokens
    editor.rollout(image, instruction, ε)     RolloutResult: the deterministic Euler ODE from each noise
                                              (SPEC §4), every state recorded, equal to the stock pipeline
    editor.velocity(cond, x, t)               v_θ(x, t, c) `[B, N_img, C]` with the family's guidance
                                              (Kontext: guidance embedding; Qwen: true CFG)
    editor.decode(x, h, w)                    images `[B, 3, h, w]` in [0, 1], as the pipeline decodes
    editor.edit(image, instruction, seed=s)   one edit from a seeded noise (what `rcgrpo eval` scores)
    editor.lora_targets / save_lora / load_lora   LoRA on the attention projections, in the family's
                                              diffusers format (stock `load_lora_weights` loads it)
    editor.attention_modules()                (name, module) of every joint attention, execution order
    editor.acd_processor(recorder, index)     the family's drop-in ACD attention processor
    editor.configure(**options)               a training run's editor options (`RCGRPOConfig.editor_options()`):
                                              text encoders kept off the device, the family's own options

Layout of the joint attention sequence in every family: `[text (N_txt) | target image (N_img) |
context/source image (N_ctx)]`; ACD's keys are the target tokens `N_txt .. N_txt + N_img − 1`.
Latents are packed tokens `[B, N_img, C]`; pixel masks become token masks on `token_grid`.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class ModelDefaults:
    """Settings that suit a model when a command is not told otherwise."""

    resolution: int  # edit side in pixels (area resolution²)
    num_inference_steps: int  # T
    max_sequence_length: int  # text tokens (prompt padding / truncation length)
    guidance_scale: float = 2.5  # the family's guidance: Kontext's embedded guidance, Qwen's true-CFG scale
    negative_prompt: str | None = None  # true CFG's negative prompt (None: no CFG pass)


@dataclass
class RolloutResult:
    """One group's rollout: G candidates × (T+1) states."""

    states: torch.Tensor  # [G, T+1, N_img, C] packed latents; states[:, 0] = the noises
    sigmas: torch.Tensor  # [T+1] float32, sigmas[0] = 1 (the first sigma of the schedule), sigmas[T] = 0
    timesteps: torch.Tensor  # [T] the scheduler's timesteps (sigma·1000) as the transformer was fed them
    images: torch.Tensor | None  # [G, 3, H, W] in [0, 1], decoded finals (None if not decoded)
    conditioning: Any  # the family's conditioning: what `Editor.velocity` needs besides x and t
    height: int
    width: int

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0] - 1


class Editor(ABC):
    """A diffusers editing pipeline of one family, seen through the operations RC-GRPO uses."""

    family: ClassVar[str]  # "flux-kontext", "qwen-image-edit", ...
    pipeline_classes: ClassVar[tuple[str, ...]]  # diffusers pipeline class names this family loads
    transformer_classes: ClassVar[tuple[str, ...]]  # diffusers transformer class names (for attach_acd)
    lora_targets: ClassVar[tuple[str, ...]]  # module names of the attention projections that get LoRA
    text_depends_on_image: ClassVar[bool] = False  # True when the text encoder also sees the source image
    text_encoder_names: ClassVar[tuple[str, ...]] = ()  # pipeline attributes holding the text encoder(s)
    # Options of `configure_family` with the value that means "the family's own behaviour": a family that
    # has no use for an option refuses it only when it is set to something else.
    FAMILY_OPTION_DEFAULTS: ClassVar[dict[str, Any]] = {"source_resolution": None, "cfg_batch": True}

    def __init__(self, pipe, defaults: ModelDefaults):
        self.pipe = pipe
        self.defaults = defaults
        self.offload_text_encoder = False

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @classmethod
    @abstractmethod
    def family_defaults(cls) -> ModelDefaults:
        """The family's own settings (its released model's resolution, steps, text length, guidance)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipe).__name__}, {self.defaults})"

    # ------------------------------------------------------------------ run options
    def configure(self, *, offload_text_encoder: bool = False, **family_options) -> None:
        """Apply a training run's editor options (`RCGRPOConfig.editor_options()`; the trainer calls this once
        the pipeline is on its device).

        offload_text_encoder: keep the text encoder(s) in CPU memory from now on; `encode_text` moves them to
        the device for the encoding and back (`text_encoders_on_device`). The family's own options
        (`source_resolution`, `cfg_batch`) go to `configure_family`."""
        if not isinstance(offload_text_encoder, bool):
            raise ValueError(f"config offload_text_encoder: expected True or False, got {offload_text_encoder!r}")
        self.offload_text_encoder = offload_text_encoder
        if offload_text_encoder:
            for module in self.text_encoders():
                module.to("cpu")
        self.configure_family(**family_options)

    def configure_family(self, **options) -> None:
        """The family's options (see `FAMILY_OPTION_DEFAULTS`). This default takes none: an option set to
        anything but its default is refused with the option's name."""
        for name, value in options.items():
            if name not in self.FAMILY_OPTION_DEFAULTS:
                raise ValueError(f"unknown editor option {name!r}; known: {', '.join(self.FAMILY_OPTION_DEFAULTS)}")
            if value != self.FAMILY_OPTION_DEFAULTS[name]:
                raise ValueError(f"config {name} = {value!r}: not an option of {self.family} (leave it at "
                                 f"{self.FAMILY_OPTION_DEFAULTS[name]!r}; Qwen-Image-Edit takes it)")

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoder modules (`text_encoder_names` that are set)."""
        return [m for m in (getattr(self.pipe, name, None) for name in self.text_encoder_names) if m is not None]

    @contextlib.contextmanager
    def text_encoders_on_device(self):
        """Inside: the text encoders on the editor's device. With `offload_text_encoder` they are moved there
        on entry and back to CPU memory on exit; otherwise nothing moves."""
        modules = self.text_encoders() if self.offload_text_encoder else []
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    # ------------------------------------------------------------------ geometry
    @property
    @abstractmethod
    def size_multiple(self) -> int:
        """Pixels per target token side: image sides must be multiples of it."""

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the target tokens of a `height`×`width` edit."""
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} must be positive multiples of {m} for {self.family}")
        return height // m, width // m

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """(N_img, C) of the packed target latents of a `height`×`width` edit."""
        rows, cols = self.token_grid(height, width)
        return rows * cols, self.latent_channels

    def token_mask(self, pixel_mask, height: int, width: int, *, pooling: str = "max", threshold: float = 0.5,
                   name: str = "mask") -> torch.Tensor:
        """The checked token mask `[N_img]` of a pixel mask `[H, W]` of an `height`×`width` edit (SPEC §2)."""
        from ..method.masks import as_pixel_mask, check_token_mask, pixel_to_token_mask

        pixel = as_pixel_mask(pixel_mask, name=name)
        if tuple(pixel.shape) != (height, width):
            raise ValueError(f"{name}: mask size {pixel.shape[0]}x{pixel.shape[1]} does not match the image size "
                             f"{height}x{width}")
        mask = pixel_to_token_mask(pixel, self.token_grid(height, width), pooling=pooling, threshold=threshold,
                                   name=name)
        check_token_mask(mask, name=name)
        return mask

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """C: channels of one packed latent token."""

    def edit_size(self, height: int, width: int, target: int, *, keep_aspect: bool = True) -> tuple[int, int]:
        """(h, w) at which the family edits a `height`×`width` image at about `target`² pixels."""
        return type(self).size_for(height, width, target, self.size_multiple, keep_aspect=keep_aspect)

    @classmethod
    @abstractmethod
    def size_for(cls, height: int, width: int, target: int, size_multiple: int, *,
                 keep_aspect: bool = True) -> tuple[int, int]:
        """`edit_size` from the token size alone (known from the model's config files before it loads)."""

    # ------------------------------------------------------------------ conditions
    @abstractmethod
    def encode_text(self, instruction: str, image: torch.Tensor | None, *, max_sequence_length: int,
                    acd_text_tokens: str = "prompt", negative_prompt: str | None = None):
        """The text conditions of one edit (batch 1), with `acd_weights` `[N_txt]` (None for "all").

        `image` `[1, 3, H, W]` in [0, 1] is used only when `text_depends_on_image`."""

    def text_cache_key(self, instruction: str, image: torch.Tensor | None, **settings) -> tuple:
        """A key under which `encode_text`'s result can be reused."""
        key = (instruction, tuple(sorted(settings.items())))
        if self.text_depends_on_image and image is not None:
            key += (image_fingerprint(image),)
        return key

    # ------------------------------------------------------------------ sampling
    @abstractmethod
    def rollout(self, image: torch.Tensor, instruction: str, noises: torch.Tensor, *, num_steps: int,
                guidance_scale: float, height: int, width: int, max_sequence_length: int,
                text=None, negative_prompt: str | None = None, decode: bool = True) -> RolloutResult:
        """Roll out `noises` `[G, N_img, C]` with the family's Euler loop (SPEC §4).

        `image` is the source `[1, 3, H, W]` in [0, 1]; `text` the result of `encode_text` (encoded
        here when None). The final images equal the stock pipeline's for the same noise and settings."""

    @torch.no_grad()
    def edit(self, image, instruction: str, *, num_steps: int, guidance_scale: float, height: int, width: int,
             max_sequence_length: int, seed: int, negative_prompt: str | None = None) -> torch.Tensor:
        """One edit `[3, H, W]` in [0, 1] from the noise `seed` draws (`rcgrpo eval`'s edits): a rollout of
        one candidate from `randn([1, N_img, C])` of a CPU generator seeded with `seed`."""
        n_img, channels = self.latent_shape(height, width)
        noise = torch.randn((1, n_img, channels), generator=torch.Generator().manual_seed(int(seed)))
        result = self.rollout(image, instruction, noise.to(self.device, self.dtype), num_steps=num_steps,
                              guidance_scale=guidance_scale, height=height, width=width,
                              max_sequence_length=max_sequence_length, negative_prompt=negative_prompt)
        return result.images[0].float().clamp(0, 1).cpu()

    @abstractmethod
    def velocity(self, conditioning, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """v_θ(x, t, c) `[B, N_img, C]` for latents `[B, N_img, C]` at scheduler timesteps `[B]`
        (sigma·1000), computed exactly as the rollout computed it (guidance included)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [0, 1] from packed latents `[B, N_img, C]`, as the pipeline decodes."""

    # ------------------------------------------------------------------ LoRA
    def save_lora(self, state_dict: dict[str, torch.Tensor], directory) -> Path:
        """Write the transformer's LoRA (a peft state dict) in the family's diffusers format to
        `directory/pytorch_lora_weights.safetensors` with the pipeline class's `save_lora_weights`; each
        module's alpha/rank scale is folded into `lora_B` (the file carries no alpha, and diffusers'
        loader assumes alpha = rank), so a stock `load_lora_weights` reproduces the trained model."""
        from .lora import LORA_WEIGHT_NAME, fold_lora_scale

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        type(self.pipe).save_lora_weights(str(directory), transformer_lora_layers=fold_lora_scale(state_dict,
                                          self.transformer), weight_name=LORA_WEIGHT_NAME)
        return directory / LORA_WEIGHT_NAME

    def load_lora(self, path, *, option: str = "--lora") -> None:
        """Load diffusers-format LoRA weights into the pipeline, checked against the model first."""
        from .lora import load_lora

        load_lora(self.pipe, path, option=option)

    # ------------------------------------------------------------------ ACD
    @abstractmethod
    def attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, attention module) of every joint attention layer, in execution order."""

    @abstractmethod
    def acd_processor(self, recorder, layer_index: int, *, backend: str = "auto", mode: str = "auto"):
        """The family's drop-in ACD processor for the attention layer `layer_index` (execution order):
        identical to the stock processor outside a capture of `recorder`."""

    @abstractmethod
    def is_stock_processor(self, processor) -> bool:
        """Whether `processor` computes what the family's stock attention processor computes."""


def image_fingerprint(image: torch.Tensor) -> str:
    """SHA-1 of an image tensor's shape, dtype and values (a cache key for image-dependent text)."""
    import hashlib

    data = image.detach().contiguous().cpu()
    digest = hashlib.sha1(f"{tuple(data.shape)}{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


__all__ = ["Editor", "ModelDefaults", "RolloutResult", "image_fingerprint"]
