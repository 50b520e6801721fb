"""`ModelDefaults`: the settings that suit a model when a command is not told otherwise."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDefaults:
    """Settings that suit a model when a command is not told otherwise."""

    resolution: int
    num_inference_steps: int
    max_sequence_length: int
    guidance_scale: float = 2.5


KONTEXT_DEFAULTS = ModelDefaults(resolution=1024, num_inference_steps=28, max_sequence_length=512)
TINY_DEFAULTS = ModelDefaults(resolution=32, num_inference_steps=4, max_sequence_length=16)


__all__ = ["KONTEXT_DEFAULTS", "TINY_DEFAULTS", "ModelDefaults"]
