"""Function forms of the editor operations, for any supported pipeline (SPEC §9)."""
from __future__ import annotations

import torch

from .base import RolloutResult
from .loading import editor_for_pipeline


def rollout(pipe, image, prompt: str, noises: torch.Tensor, *, num_steps: int, guidance_scale: float, height: int,
            width: int, max_sequence_length: int | None = None, **options) -> RolloutResult:
    """`editor_for_pipeline(pipe).rollout(...)`: the deterministic Euler rollout of `noises` `[G, N_img, C]`
    (SPEC §4) with the pipeline's own encoders and scheduler, every state recorded. `max_sequence_length`
    defaults to the family's; `options` are the family's (`text`, `negative_prompt`, `decode`, ...)."""
    editor = editor_for_pipeline(pipe)
    length = editor.defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
    return editor.rollout(image, prompt, noises, num_steps=num_steps, guidance_scale=guidance_scale, height=height,
                          width=width, max_sequence_length=length, **options)


__all__ = ["rollout"]
