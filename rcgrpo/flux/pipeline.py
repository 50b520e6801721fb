"""Loading pipelines and LoRA weights, with clear errors when files are missing.

`--model` means the same in every command: `tiny` (the random offline test pipeline), `tiny-editor`
(the pretrained tiny editor shipped with rcgrpo, MiniBench), a local directory in the diffusers
layout, or a hub id (FLUX.1-Kontext-dev is gated: `huggingface-cli login` first). `load_pipeline`
returns the pipeline with the `ModelDefaults` (resolution, steps, text length, guidance) that suit it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .defaults import KONTEXT_DEFAULTS, TINY_DEFAULTS, ModelDefaults

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TINY_MODELS = ("tiny", "tiny-editor")




def default_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model: str | None, *, device: str | None = None, dtype: torch.dtype | None = None,
                  seed: int = 0) -> tuple[object, ModelDefaults]:
    """(pipeline, defaults) for `--model` (see the module docstring; None means "tiny")."""
    dev = default_device(device)
    if model in (None, "tiny"):
        from ..testing import tiny_kontext_pipeline

        return tiny_kontext_pipeline(seed, device=dev, dtype=dtype or torch.float32), TINY_DEFAULTS
    if model == "tiny-editor":
        from .. import testing

        if not hasattr(testing, "tiny_editor"):
            raise ValueError("--model tiny-editor: the pretrained tiny editor is not part of this build")
        pipe = testing.tiny_editor(device=dev, dtype=dtype or torch.float32)
        return pipe, testing.TINY_EDITOR_DEFAULTS
    from diffusers import FluxKontextPipeline

    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    local = Path(model)
    try:
        pipe = FluxKontextPipeline.from_pretrained(model, **_dtype_kwarg(dtype))
    except (OSError, ValueError) as exc:
        where = "local directory" if local.exists() else "hub id"
        raise ValueError(
            f"--model {model!r}: could not load FluxKontextPipeline weights from this {where} ({exc}); "
            "download the model (e.g. `huggingface-cli download black-forest-labs/FLUX.1-Kontext-dev`) "
            "and pass its local path"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev), KONTEXT_DEFAULTS


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers ≥ 0.42 takes `dtype=`, earlier releases `torch_dtype=`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_lora(pipe, path) -> None:
    """Load diffusers-format LoRA weights (a directory holding pytorch_lora_weights.safetensors, or the file)."""
    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--lora: no LoRA weights at {str(file)!r}")
    if file.suffix != ".safetensors":
        raise ValueError(f"--lora: {str(file)!r} is not a .safetensors file (only safetensors LoRA files load)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--lora: {str(file)!r} is not a valid safetensors file ({exc})") from None
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
