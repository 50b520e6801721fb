"""FLUX.1-Kontext (diffusers `FluxKontextPipeline`) behind rcgrpo's `Editor` interface."""
from .editor import KONTEXT_DEFAULTS, FluxKontextEditor, FluxTextConditions

__all__ = ["KONTEXT_DEFAULTS", "FluxKontextEditor", "FluxTextConditions"]
