"""Qwen-Image-Edit (`QwenImageEditPipeline`, `QwenImageEditPlusPipeline`) behind the `Editor` interface.

Modules: `editor` (`QwenImageEditor`), `text` (prompt embeddings, the instruction's ACD weights), `source`
(source image sizes, VL input, VAE latents), `rollout` (Euler loop, true-CFG velocity, decode),
`attention` (the ACD processor and the recorder's family entry).
"""
from .attention import QwenACDAttnProcessor
from .editor import QWEN_IMAGE_EDIT_DEFAULTS, QwenImageEditor
from .rollout import QwenConditioning
from .text import QwenTextConditions

__all__ = ["QWEN_IMAGE_EDIT_DEFAULTS", "QwenACDAttnProcessor", "QwenConditioning", "QwenImageEditor",
           "QwenTextConditions"]
