"""`QwenImageEditor`: Qwen-Image-Edit (diffusers `QwenImageEditPipeline`, and `QwenImageEditPlusPipeline`
for the 2509 / 2511 releases) behind rcgrpo's `Editor` interface.

- text: the vision-language prompt of the instruction with the source image, the negative prompt for
  true CFG, and the instruction's token weights for ACD (`text.py`);
- rollout / velocity: our own Euler loop equal to the stock `__call__` at the stock source area, with the
  source area as an option and the CFG pass batched or separate (`rollout.py`, `source.py`);
- ACD: every block's joint attention `[text | target | source]`, last K = 10 by default (`attention.py`);
- LoRA: the attention projections of both streams, saved with the pipeline class's `save_lora_weights`.
"""
from __future__ import annotations

import math
import warnings

import torch

from ..base import Editor, ModelDefaults, RolloutResult
from .attention import QwenACDAttnProcessor, attention_modules, is_stock_processor
from .rollout import QwenConditioning, decode_latents, euler_rollout, sigma_schedule, velocity
from .source import STOCK_CONDITION_AREA, STOCK_SOURCE_AREA, PreparedSource, prepare_source, source_latents
from .text import MAX_SEQUENCE_LENGTH, QwenTextConditions, encode_text

# The pipelines' own defaults: 1024² px, 50 steps, true CFG 4 with the negative prompt " " (the model card's).
QWEN_IMAGE_EDIT_DEFAULTS = ModelDefaults(resolution=1024, num_inference_steps=50,
                                         max_sequence_length=MAX_SEQUENCE_LENGTH, guidance_scale=4.0,
                                         negative_prompt=" ")
CALCULATE_DIMENSIONS_MULTIPLE = 32  # the pipelines round sizes to 32 px (`calculate_dimensions`)


class QwenImageEditor(Editor):
    """A Qwen-Image-Edit pipeline seen through the operations RC-GRPO uses.

    source_area: pixels of the source image's VAE input (and, for QwenImageEditPipeline, of its
    vision-language input); the stock pipelines use 1024². condition_area: pixels of the Plus pipeline's
    vision-language input (384² stock). cfg_batch: run true CFG's two passes in one transformer call.
    """

    family = "qwen-image-edit"
    pipeline_classes = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    transformer_classes = ("QwenImageTransformer2DModel",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    text_depends_on_image = True
    text_encoder_names = ("text_encoder",)

    def __init__(self, pipe, defaults: ModelDefaults | None = None, *, source_area: int = STOCK_SOURCE_AREA,
                 condition_area: int = STOCK_CONDITION_AREA, cfg_batch: bool = True):
        names = [cls.__name__ for cls in type(pipe).__mro__]
        if not any(name in self.pipeline_classes for name in names):
            raise ValueError(f"{type(pipe).__name__} is not a Qwen-Image-Edit pipeline; supported: "
                             f"{', '.join(self.pipeline_classes)}")
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported")
        super().__init__(pipe, defaults if defaults is not None else QWEN_IMAGE_EDIT_DEFAULTS)
        self.plus = "QwenImageEditPlusPipeline" in names
        self.source_area = _check_area("source_area", source_area)
        self.condition_area = _check_area("condition_area", condition_area)
        if not isinstance(cfg_batch, bool):
            raise ValueError(f"cfg_batch must be True or False, got {cfg_batch!r}")
        self.cfg_batch = cfg_batch

    @classmethod
    def family_defaults(cls) -> ModelDefaults:
        return QWEN_IMAGE_EDIT_DEFAULTS

    def configure_family(self, *, source_resolution: int | None = None, cfg_batch: bool = True) -> None:
        """A run's options: `source_resolution` (side of the source area, None: keep this editor's, the
        pipelines' 1024² unless constructed otherwise) and `cfg_batch` (the config decides)."""
        if source_resolution is not None:
            if isinstance(source_resolution, bool) or not isinstance(source_resolution, int) or source_resolution < 32:
                raise ValueError(f"config source_resolution: expected an int ≥ 32 (pixels), got {source_resolution!r}")
            self.source_area = source_resolution * source_resolution
        if not isinstance(cfg_batch, bool):
            raise ValueError(f"config cfg_batch: expected True or False, got {cfg_batch!r}")
        self.cfg_batch = cfg_batch

    # ------------------------------------------------------------------ geometry
    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @classmethod
    def size_for(cls, height: int, width: int, target: int, size_multiple: int, *,
                 keep_aspect: bool = True) -> tuple[int, int]:
        """(h, w) of about `target`² px with the image's aspect (or square), rounded as the pipelines'
        `calculate_dimensions` rounds (32 px, or the size multiple if that is coarser)."""
        from ...io.images import fit_size

        multiple = math.lcm(CALCULATE_DIMENSIONS_MULTIPLE, size_multiple)
        if keep_aspect:
            return fit_size(height, width, area=target * target, multiple=multiple)
        return fit_size(1, 1, area=target * target, multiple=multiple)

    # ------------------------------------------------------------------ conditions
    def prepare_source(self, image, *, source_area: int | None = None) -> PreparedSource:
        """The source image sized and preprocessed as the pipeline does (`source.prepare_source`)."""
        area = self.source_area if source_area is None else _check_area("source_area", source_area)
        return prepare_source(self.pipe, image, plus=self.plus, source_area=area, condition_area=self.condition_area)

    def encode_text(self, instruction: str, image, *, max_sequence_length: int, acd_text_tokens: str = "prompt",
                    negative_prompt: str | None = None, source_area: int | None = None,
                    source: PreparedSource | None = None) -> QwenTextConditions:
        """Prompt embeddings of `instruction` with the source `image` (`[1, 3, H, W]` in [0, 1] or PIL) as the
        pipeline encodes them, the negative prompt's (None: no true CFG) and `acd_weights` `[N_txt]`."""
        if source is None:
            if image is None:
                raise ValueError("encode_text: Qwen-Image-Edit encodes the instruction together with the source "
                                 "image; pass image")
            source = self.prepare_source(image, source_area=source_area)
        with self.text_encoders_on_device():
            return encode_text(self.pipe, instruction, source.vl_input(self.plus),
                               max_sequence_length=max_sequence_length, acd_text_tokens=acd_text_tokens,
                               negative_prompt=negative_prompt, vl_size=source.vl_size)

    def text_cache_key(self, instruction: str, image, **settings) -> tuple:
        settings.setdefault("source_area", self.source_area)
        settings.setdefault("condition_area", self.condition_area)
        return super().text_cache_key(instruction, image, **settings)

    # ------------------------------------------------------------------ sampling
    def conditioning(self, text: QwenTextConditions, source: PreparedSource, *, height: int, width: int,
                     guidance_scale: float, cfg_batch: bool | None = None) -> QwenConditioning:
        """What `velocity` needs for an `height`×`width` edit of `source` with `text`."""
        rows, cols = self.token_grid(height, width)
        factor = self.size_multiple
        src_h, src_w = source.source_size
        if not self.plus and tuple(text.vl_size) != tuple(source.vl_size):
            raise ValueError(f"the text was encoded with a {text.vl_size} source image, this rollout uses "
                             f"{source.vl_size}: encode the text with the same source_area")
        do_cfg = guidance_scale > 1 and text.negative_embeds is not None
        if guidance_scale > 1 and text.negative_embeds is None:
            warnings.warn(f"guidance_scale={guidance_scale} but no negative prompt: true CFG is off (as in the "
                          "pipeline)", stacklevel=3)
        dtype = self.dtype
        return QwenConditioning(
            prompt_embeds=text.prompt_embeds.to(self.device, dtype),
            negative_embeds=text.negative_embeds.to(self.device, dtype) if do_cfg else None,
            source_latents=source_latents(self.pipe, source, plus=self.plus, dtype=dtype, device=self.device),
            img_shapes=((1, rows, cols), (1, src_h // factor, src_w // factor)),
            true_cfg_scale=float(guidance_scale),
            cfg_batch=self.cfg_batch if cfg_batch is None else bool(cfg_batch),
        )

    @torch.no_grad()
    def rollout(self, image, instruction: str, noises: torch.Tensor, *, num_steps: int, guidance_scale: float,
                height: int, width: int, max_sequence_length: int, text: QwenTextConditions | None = None,
                negative_prompt: str | None = None, decode: bool = True, source_area: int | None = None,
                cfg_batch: bool | None = None, attention_kwargs: dict | None = None) -> RolloutResult:
        """Roll out `noises` `[G, N_img, C]` from the source `image` (`[1, 3, H, W]` in [0, 1] or PIL).

        The true-CFG scale is `guidance_scale` (CFG runs when it is > 1 and there is a negative prompt:
        `negative_prompt`, or the one `text` was encoded with). `source_area` overrides the editor's
        (stock: 1024²); `cfg_batch` its CFG batching. `conditioning` of the result is a `QwenConditioning`."""
        n_img, channels = self.latent_shape(height, width)
        if noises.dim() != 3 or tuple(noises.shape[1:]) != (n_img, channels):
            raise ValueError(f"noises must have shape [G, N_img, C] = [G, {n_img}, {channels}] for a {height}x{width} "
                             f"edit, got {tuple(noises.shape)}")
        source = self.prepare_source(image, source_area=source_area)
        if text is None:
            text = self.encode_text(instruction, None, max_sequence_length=max_sequence_length, source=source,
                                    negative_prompt=negative_prompt if guidance_scale > 1 else None)
        elif negative_prompt is not None and negative_prompt != text.negative_prompt:
            raise ValueError(f"negative_prompt={negative_prompt!r} but the given text was encoded with "
                             f"{text.negative_prompt!r}")
        cond = self.conditioning(text, source, height=height, width=width, guidance_scale=guidance_scale,
                                 cfg_batch=cfg_batch)
        scheduler, timesteps = sigma_schedule(self.pipe.scheduler.config, num_steps, n_img, self.device)
        states = euler_rollout(self.transformer, cond, noises.to(self.device, self.dtype), scheduler, timesteps,
                               attention_kwargs)
        images = self.decode(states[:, -1], height, width) if decode else None
        return RolloutResult(states=states, sigmas=scheduler.sigmas.detach().to(torch.float32).cpu().clone(),
                             timesteps=timesteps.detach().cpu().clone(), images=images, conditioning=cond,
                             height=height, width=width)

    def velocity(self, conditioning: QwenConditioning, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """v `[B, N_img, C]` as the rollout computed it (true CFG combined, batched or not as recorded in
        `conditioning.cfg_batch`); differentiable with respect to the LoRA parameters."""
        return velocity(self.transformer, conditioning, latents, timestep)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return decode_latents(self.pipe, latents, height, width)

    # ------------------------------------------------------------------ ACD
    def attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        return attention_modules(self.transformer)

    def acd_processor(self, recorder, layer_index: int, *, backend: str = "auto", mode: str = "auto"):
        return QwenACDAttnProcessor(recorder, layer_index, backend=backend, mode=mode)

    def is_stock_processor(self, processor) -> bool:
        return is_stock_processor(processor)


def _check_area(name: str, area) -> int:
    if isinstance(area, bool) or not isinstance(area, int) or area < 32 * 32:
        raise ValueError(f"{name} must be an int ≥ {32 * 32} (pixels), got {area!r}")
    return area


__all__ = ["QWEN_IMAGE_EDIT_DEFAULTS", "QwenImageEditor"]
