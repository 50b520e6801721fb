"""Loading an editor: `--model` means the same in every command.

    load_editor(model, device=None, dtype=None) -> Editor
    editor_for_pipeline(pipe, defaults=None)    -> Editor      (a pipeline already built)
    model_defaults(model)                       -> ModelDefaults, known before any weight loads

`model` is a registered name (the offline models: `tiny` and `tiny-qwen` register themselves in
`rcgrpo.testing`, `tiny-editor` in `rcgrpo.minibench`; the command line imports both), a local directory
in the diffusers layout, or a hub id. The family is read from the folder's `model_index.json`
(`_class_name`: the pipeline class) and looked up in `FAMILIES`; an unsupported class is refused with
one line naming it and the supported ones. FLUX.1-Kontext-dev is gated on the hub: `huggingface-cli
login` first.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .base import Editor, ModelDefaults

# diffusers pipeline class name -> "module:EditorClass" (imported on first use)
FAMILIES: dict[str, str] = {
    "FluxKontextPipeline": "rcgrpo.editors.flux_kontext:FluxKontextEditor",
    "QwenImageEditPipeline": "rcgrpo.editors.qwen_image_edit:QwenImageEditor",
    "QwenImageEditPlusPipeline": "rcgrpo.editors.qwen_image_edit:QwenImageEditor",
}


@dataclass(frozen=True)
class NamedModel:
    """A model known by name: `factory(device, dtype, seed) -> Editor`, and its defaults."""

    factory: Callable[..., Editor]
    defaults: ModelDefaults
    pipeline_class: str  # the diffusers pipeline class it builds (a key of FAMILIES)
    description: str = ""


_NAMED: dict[str, NamedModel] = {}


def register_model(name: str, factory: Callable[..., Editor], defaults: ModelDefaults, pipeline_class: str,
                   description: str = "") -> None:
    """Make `--model name` load `factory(device=..., dtype=..., seed=...)` (an Editor of `pipeline_class`)."""
    if not name or "/" in name:
        raise ValueError(f"model names are plain words, got {name!r}")
    if pipeline_class not in FAMILIES:
        raise ValueError(f"register_model({name!r}): pipeline class {pipeline_class!r} is not one of {', '.join(FAMILIES)}")
    _NAMED[name] = NamedModel(factory, defaults, pipeline_class, description)


def registered_models() -> dict[str, NamedModel]:
    return dict(_NAMED)


def default_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def editor_class(pipeline_class: str) -> type[Editor]:
    """The Editor class of a diffusers pipeline class name (ValueError naming the supported ones)."""
    if pipeline_class not in FAMILIES:
        raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported: {', '.join(FAMILIES)}")
    module, _, name = FAMILIES[pipeline_class].partition(":")
    return getattr(importlib.import_module(module), name)


def editor_for_pipeline(pipe, defaults: ModelDefaults | None = None) -> Editor:
    """Wrap a built diffusers pipeline (or return an Editor unchanged) in its family's Editor."""
    if isinstance(pipe, Editor):
        return pipe
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            editor = editor_class(cls.__name__)
            return editor(pipe, defaults) if defaults is not None else editor(pipe)
    raise ValueError(f"pipeline class {type(pipe).__name__!r} is not supported; supported: {', '.join(FAMILIES)}")


def pipeline_class_of(model: str) -> str:
    """The `_class_name` of a local diffusers folder's or a hub id's `model_index.json`."""
    local = Path(model).expanduser()
    if not local.exists() and model.startswith(("/", "./", "../", "~", ".\\")):
        raise ValueError(f"--model {model!r}: no such directory (a local diffusers pipeline folder, or a hub id "
                         "like black-forest-labs/FLUX.1-Kontext-dev)")
    try:
        if local.is_dir():
            import json

            index = local / "model_index.json"
            if not index.is_file():
                raise ValueError(f"--model {model!r}: the folder has no model_index.json (a diffusers pipeline "
                                 "folder, e.g. from `huggingface-cli download ... --local-dir DIR`, has one)")
            config = json.loads(index.read_text())
        else:
            from diffusers import DiffusionPipeline

            config = DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("--model"):
            raise
        where = "local directory" if local.exists() else "hub id"
        raise ValueError(f"--model {model!r}: cannot read model_index.json of this {where} ({_first_line(exc)}); "
                         "download the model (`huggingface-cli download <id> --local-dir DIR`) and pass DIR") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"--model {model!r}: model_index.json names no pipeline class (_class_name)")
    return name


def model_defaults(model: str | None) -> ModelDefaults:
    """The defaults `load_editor(model)` will use, without loading weights."""
    name = model or "tiny"
    if name in _NAMED:
        return _NAMED[name].defaults
    if name in ("tiny", "tiny-editor", "tiny-qwen"):
        raise ValueError(_unregistered(name))
    return editor_class(pipeline_class_of(name)).family_defaults()


def expected_editor_class(model: str | None) -> type[Editor] | None:
    """The Editor class `load_editor(model)` will return, from the registry or `model_index.json`; None when
    that cannot be known without loading (an uncached hub id)."""
    name = model or "tiny"
    if name in _NAMED:
        return editor_class(_NAMED[name].pipeline_class)
    try:
        return editor_class(pipeline_class_of(name))
    except ValueError:
        return None


def load_editor(model: str | None, *, device: str | None = None, dtype: torch.dtype | None = None,
                seed: int = 0) -> Editor:
    """The Editor of `--model` (see the module docstring; None means "tiny")."""
    dev = default_device(device)
    name = model or "tiny"
    if name in _NAMED:
        return _NAMED[name].factory(device=dev, dtype=dtype or torch.float32, seed=seed)
    if name in ("tiny", "tiny-editor", "tiny-qwen"):
        raise ValueError(_unregistered(name))
    pipeline_class = pipeline_class_of(name)
    editor = editor_class(pipeline_class)
    import diffusers

    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    try:
        pipe = getattr(diffusers, pipeline_class).from_pretrained(name, **_dtype_kwarg(dtype))
    except (OSError, ValueError) as exc:
        where = "local directory" if Path(name).exists() else "hub id"
        raise ValueError(f"--model {name!r}: could not load {pipeline_class} weights from this {where} "
                         f"({_first_line(exc)}); download the model (`huggingface-cli download <id>`) and pass "
                         "its local path") from None
    pipe.set_progress_bar_config(disable=True)
    return editor(pipe.to(dev))


def _unregistered(name: str) -> str:
    where = "rcgrpo.minibench" if name == "tiny-editor" else "rcgrpo.testing"
    return f"--model {name!r}: this offline model registers itself when {where} is imported (the rcgrpo command does it)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers ≥ 0.42 takes `dtype=`, earlier releases `torch_dtype=`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


__all__ = ["FAMILIES", "NamedModel", "default_device", "editor_class", "editor_for_pipeline", "expected_editor_class",
           "load_editor",
           "model_defaults", "pipeline_class_of", "register_model", "registered_models"]
