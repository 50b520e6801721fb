"""Checks of command-line inputs that can run before any model is loaded.

Each raises ValueError / FileNotFoundError / NotADirectoryError / PermissionError with one line that
names the option and the input (the CLI maps them to exit status 2).
"""
from __future__ import annotations

import os
from pathlib import Path


def check_output_dir(path, option: str) -> Path:
    """An output directory that exists as a directory or can be created: not empty, not a file, writable."""
    text = str(path)
    if not text.strip():
        raise ValueError(f"{option}: expected a directory path, got an empty string")
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{option} {text!r} is not writable (it is a file, not a directory)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{option} {text!r} is not writable ({str(parent)!r} is a file, not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {text!r} is not writable (no write permission on {str(parent)!r})")
    return out


def check_input_file(path, option: str) -> Path:
    """An existing, readable regular file."""
    text = str(path)
    if not text.strip():
        raise ValueError(f"{option}: expected a file path, got an empty string")
    file = Path(text).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{option}: no such file {text!r}")
    if file.is_dir():
        raise ValueError(f"{option} {text!r} is a directory, not a file")
    if not os.access(file, os.R_OK):
        raise PermissionError(f"{option} {text!r} is not readable (no read permission)")
    return file


def check_lora_file(path, option: str = "--lora") -> Path:
    """A LoRA directory/file whose safetensors header holds complete lora_A/lora_B pairs of one rank
    (read from the header, no tensor loaded); its modules and shapes are checked against the model by
    `rcgrpo.editors.lora.load_lora` once the model is loaded, before any rollout."""
    from ..editors.lora import lora_file, lora_layers, read_lora_shapes

    file = lora_file(path, option)
    if not os.access(file, os.R_OK):
        raise PermissionError(f"{option} {str(path)!r}: {str(file)!r} is not readable (no read permission)")
    lora_layers(read_lora_shapes(file, option), f"{option} {str(path)!r}")
    return file


def check_edit_inputs(image, mask, *, image_option: str = "--image", mask_option: str = "--mask",
                      mask_source: str | None = None, mask_has_alpha: bool = False) -> None:
    """A source image `[3, H, W]` and pixel mask `[H, W]` (as loaded by `rcgrpo.io.images`) that can make an
    edit: same size, and the mask neither empty nor covering every pixel. `mask_source` (the file name)
    goes in the messages; `mask_has_alpha` adds the hint that the mask may be in the alpha channel."""
    where = f"{mask_option} {mask_source!r}" if mask_source else mask_option
    ih, iw = image.shape[-2:]
    mh, mw = mask.shape[-2:]
    if (ih, iw) != (mh, mw):
        raise ValueError(f"{where}: mask size {mw}x{mh} does not match the image size {iw}x{ih} of {image_option} "
                         "(width x height, after EXIF orientation)")
    hint = " (the file has an alpha channel: --mask-channel alpha reads the mask from it)" if mask_has_alpha else ""
    if float(mask.max()) <= 0:
        raise ValueError(f"{where}: the edit mask selects no token (every pixel is 0: empty edit region; white = "
                         f"edit){hint}")
    if float(mask.min()) >= 1:
        raise ValueError(f"{where}: the edit mask covers every token (every pixel is edit: no background left to "
                         f"preserve){hint}")


def check_mask_on_grid(mask, height: int, width: int, vae_scale_factor: int, *, option: str = "--mask",
                       source: str | None = None):
    """The token mask of a pixel mask at the edit size (`rcgrpo.method.masks.token_mask_for_image`, max
    pooling): at least one edit token and one background token, else ValueError naming the mask file."""
    from ..method.masks import token_mask_for_image

    where = f"{option} {source!r}" if source else option
    try:
        return token_mask_for_image(mask, height, width, vae_scale_factor, name=where)
    except ValueError as exc:
        raise ValueError(f"{exc} (on the {height // (2 * vae_scale_factor)}x{width // (2 * vae_scale_factor)} "
                         f"token grid of the {width}x{height} edit)") from None


__all__ = ["check_edit_inputs", "check_input_file", "check_lora_file", "check_mask_on_grid", "check_output_dir"]
