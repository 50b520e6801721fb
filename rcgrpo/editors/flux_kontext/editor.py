"""`FluxKontextEditor`: FLUX.1-Kontext (diffusers `FluxKontextPipeline`) behind rcgrpo's `Editor` interface.

- text: the pipeline's CLIP + T5 prompt embeddings, and the instruction's T5 tokens for ACD (`text.py`);
- rollout: the stock pipeline's own Euler loop, every state recorded, the transformer's conditioning
  captured; velocity: one transformer call fed as the pipeline feeds it, with the guidance embedding
  (`rollout.py`);
- ACD: every attention layer (double-, then single-stream blocks), `[text | target | context]` (`attention.py`);
- sizes: Kontext's preferred resolution buckets scaled to the target area (`resolution.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Editor, ModelDefaults, RolloutResult
from .attention import FluxACDAttnProcessor, attention_modules, is_stock_processor
from .resolution import edit_size
from .rollout import Conditioning, decode_latents, predict_velocity, rollout
from .text import acd_text_weights, encode_prompt

# FLUX.1-Kontext-dev's own settings: 1024² px, 28 steps, T5 length 512, guidance 2.5.
KONTEXT_DEFAULTS = ModelDefaults(resolution=1024, num_inference_steps=28, max_sequence_length=512)


@dataclass
class FluxTextConditions:
    """CLIP + T5 conditions of one instruction (batch 1) and its ACD text weights."""

    prompt_embeds: torch.Tensor  # [1, N_txt, C_txt] T5
    pooled_prompt_embeds: torch.Tensor  # [1, C_pool] CLIP
    acd_weights: torch.Tensor | None  # [N_txt] 1 on the instruction's T5 tokens (None: every position)


class FluxKontextEditor(Editor):
    """A FLUX.1-Kontext pipeline seen through the operations RC-GRPO uses."""

    family = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    transformer_classes = ("FluxTransformer2DModel",)
    # single-stream blocks hold only to_q/to_k/to_v: peft adapts the names that exist
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe, defaults: ModelDefaults | None = None):
        if not any(cls.__name__ in self.pipeline_classes for cls in type(pipe).__mro__):
            raise ValueError(f"{type(pipe).__name__} is not a FLUX.1-Kontext pipeline; supported: "
                             f"{', '.join(self.pipeline_classes)}")
        super().__init__(pipe, defaults if defaults is not None else KONTEXT_DEFAULTS)

    @classmethod
    def family_defaults(cls) -> ModelDefaults:
        return KONTEXT_DEFAULTS

    # ------------------------------------------------------------------ geometry
    @property
    def size_multiple(self) -> int:
        return 2 * self.pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @classmethod
    def size_for(cls, height: int, width: int, target: int, size_multiple: int, *,
                 keep_aspect: bool = True) -> tuple[int, int]:
        """Kontext's preferred bucket of the nearest aspect ratio scaled to `target`² (the tiny models, 64 px
        and below: the exact aspect at that area), or `target`×`target` without `keep_aspect`."""
        if not keep_aspect:
            return target, target
        return edit_size(height, width, target=target, multiple=size_multiple)

    # ------------------------------------------------------------------ conditions
    def encode_text(self, instruction: str, image=None, *, max_sequence_length: int, acd_text_tokens: str = "prompt",
                    negative_prompt: str | None = None) -> FluxTextConditions:
        """The pipeline's own prompt embeddings of `instruction` (the image plays no part) and the T5
        attention mask of the instruction as ACD text weights (None with acd_text_tokens='all')."""
        _no_negative_prompt(negative_prompt)
        with self.text_encoders_on_device():
            embeds, pooled = encode_prompt(self.pipe, instruction, max_sequence_length, self.device)
        weights = acd_text_weights(self.pipe, instruction, max_sequence_length, acd_text_tokens)
        return FluxTextConditions(embeds, pooled, weights)

    def text_conditions(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                        acd_weights: torch.Tensor | None = None) -> FluxTextConditions:
        """Conditions from pre-computed embeddings (`[1, N_txt, C]`, `[1, C_pool]`), e.g. for a pipeline
        loaded without its text encoders."""
        return FluxTextConditions(prompt_embeds, pooled_prompt_embeds, acd_weights)

    def acd_text_weights(self, instruction: str, image=None, *, max_sequence_length: int,
                         acd_text_tokens: str = "prompt") -> torch.Tensor | None:
        return acd_text_weights(self.pipe, instruction, max_sequence_length, acd_text_tokens)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def rollout(self, image, instruction: str, noises: torch.Tensor, *, num_steps: int, guidance_scale: float,
                height: int, width: int, max_sequence_length: int, text: FluxTextConditions | None = None,
                negative_prompt: str | None = None, decode: bool = True) -> RolloutResult:
        """The stock pipeline's Euler loop from `noises` `[G, N_img, C]` (SPEC §4); `conditioning` is a
        `Conditioning` (the transformer inputs besides x and t)."""
        _no_negative_prompt(negative_prompt)
        embeds = None if text is None else text.prompt_embeds
        pooled = None if text is None else text.pooled_prompt_embeds
        return rollout(self.pipe, image, instruction, noises, num_steps=num_steps, guidance_scale=guidance_scale,
                       height=height, width=width, max_sequence_length=max_sequence_length, decode=decode,
                       prompt_embeds=embeds, pooled_prompt_embeds=pooled)

    @torch.no_grad()
    def edit(self, image, instruction: str, *, num_steps: int, guidance_scale: float, height: int, width: int,
             max_sequence_length: int, seed: int, negative_prompt: str | None = None) -> torch.Tensor:
        """The stock pipeline's own edit with `torch.Generator("cpu").manual_seed(seed)` (its noise is drawn
        unpacked, so it differs from the base class's packed draw), at exactly `height`×`width`."""
        _no_negative_prompt(negative_prompt)
        if isinstance(image, torch.Tensor):
            image = image[0] if image.dim() == 4 else image
            from ...io.images import to_pil

            image = to_pil(image)
        out = self.pipe(image=image, prompt=instruction, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                        generator=torch.Generator(device="cpu").manual_seed(int(seed)), height=height, width=width,
                        max_area=height * width, _auto_resize=False, max_sequence_length=max_sequence_length,
                        output_type="pt")
        return out.images[0].float().clamp(0, 1).cpu()

    def velocity(self, conditioning: Conditioning, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return predict_velocity(self.transformer, conditioning, latents, timestep)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return decode_latents(self.pipe, latents, height, width)

    # ------------------------------------------------------------------ ACD
    def attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        return attention_modules(self.transformer)

    def acd_processor(self, recorder, layer_index: int, *, backend: str = "auto", mode: str = "auto"):
        return FluxACDAttnProcessor(recorder, layer_index, backend=backend, mode=mode)

    def is_stock_processor(self, processor) -> bool:
        return is_stock_processor(processor)


def _no_negative_prompt(negative_prompt) -> None:
    if negative_prompt is not None:
        raise ValueError("FLUX.1-Kontext is guided by its guidance embedding: negative_prompt is not used")


__all__ = ["KONTEXT_DEFAULTS", "FluxKontextEditor", "FluxTextConditions"]
