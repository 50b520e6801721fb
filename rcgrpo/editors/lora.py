"""LoRA files: found, checked against the model before anything loads, loaded; written in diffusers' format.

    lora_file(path)                 the safetensors file of a LoRA directory (or the file itself)
    read_lora_shapes(path)          {key: shape} from the safetensors header, no tensor loaded
    lora_layers(shapes, where)      the file's layers (lora_A/lora_B pairs of one rank), checked
    check_lora_layers(pipe, layers) every layer names a linear module of the pipeline with matching shapes
    load_lora(pipe, path)           the checks, then the pipeline's own `load_lora_weights`
    fold_lora_scale(state, module)  a peft state dict with each module's alpha/rank scale folded into lora_B
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------------------------
# LoRA files: checked against the model before any rollout
# ------------------------------------------------------------------------------------------------
# diffusers' LoRA format names `<component>.<module>.lora_A.weight` ([rank, in_features]) and
# `...lora_B.weight` ([out_features, rank]); peft's own state dicts add the adapter name
# (`.lora_A.default.weight`) and may lack the component prefix (then the transformer's).
_LORA_KEY = re.compile(r"^(?:(?P<component>transformer|text_encoder)\.)?(?P<module>.+?)\."
                       r"(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoraLayer:
    """The two halves of one module's LoRA in a file: keys and shapes."""

    component: str  # "transformer" or "text_encoder"
    module: str  # module path inside the component
    keys: dict[str, str] = field(default_factory=dict)  # "lora_A"/"lora_B" -> key in the file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.shapes["lora_A"][0]

    def diffusers_key(self, part: str) -> str:
        return f"{self.component}.{self.module}.{part}.weight"


def lora_file(path, option: str = "--lora") -> Path:
    """The safetensors file of `path` (a directory holding pytorch_lora_weights.safetensors, or the file)."""
    path = Path(path).expanduser()
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{option}: no LoRA weights at {str(file)!r}")
    if file.suffix != ".safetensors":
        raise ValueError(f"{option}: {str(file)!r} is not a .safetensors file (only safetensors LoRA files load)")
    return file


def read_lora_shapes(path, option: str = "--lora") -> dict[str, tuple[int, ...]]:
    """{key: shape} of a LoRA file, read from its safetensors header (no tensor is loaded)."""
    file = lora_file(path, option)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{option}: {str(file)!r} is not a valid safetensors file ({exc})") from None


def lora_layers(shapes: dict[str, tuple[int, ...]], where: str) -> list[LoraLayer] | None:
    """The LoRA layers of a file in the diffusers/peft form, checked for complete lora_A/lora_B pairs of one
    rank; None when the file is in another LoRA format (kohya, BFL: diffusers converts those itself).
    `where` (e.g. "--lora DIR") starts every error message."""
    if not shapes:
        raise ValueError(f"{where}: the file holds no tensors")
    if not any("lora" in key.lower() for key in shapes):
        raise ValueError(f"{where}: the file holds no LoRA weights (no key names lora_A/lora_B; e.g. "
                         f"{next(iter(shapes))!r})")
    matches = {key: _LORA_KEY.match(key) for key in shapes}
    if not all(matches.values()):
        return None
    layers: dict[tuple[str, str], LoraLayer] = {}
    for key, m in matches.items():
        component = m.group("component") or "transformer"
        layer = layers.setdefault((component, m.group("module")), LoraLayer(component, m.group("module")))
        part = m.group("part")
        if part in layer.keys:
            raise ValueError(f"{where}: keys {layer.keys[part]!r} and {key!r} both hold {part} of module "
                             f"{layer.module!r} (several adapters in one file)")
        layer.keys[part], layer.shapes[part] = key, tuple(shapes[key])
    for layer in layers.values():
        for part, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if part in layer.keys and other not in layer.keys:
                raise ValueError(f"{where}: key {layer.keys[part]!r} has no matching {other} for module {layer.module!r}")
        a, b = layer.shapes["lora_A"], layer.shapes["lora_B"]
        if len(a) != 2 or len(b) != 2:
            raise ValueError(f"{where}: key {layer.keys['lora_A' if len(a) != 2 else 'lora_B']!r} has shape "
                             f"{a if len(a) != 2 else b}; LoRA weights of linear layers are 2-D")
        if a[0] != b[1]:
            raise ValueError(f"{where}: key {layer.keys['lora_B']!r} has rank {b[1]} (shape {b}) but "
                             f"{layer.keys['lora_A']!r} has rank {a[0]} (shape {a})")
    return list(layers.values())


def _missing_module_hint(root, module: str) -> str:
    """Where the module path leaves the model: "transformer_blocks has 2 entries (0..1)" or "... has no 'x'"."""
    current, done = root, []
    for part in module.split("."):
        child = current._modules.get(part) if hasattr(current, "_modules") else None
        if child is None:
            parent = ".".join(done) or "the model"
            if isinstance(current, torch.nn.ModuleList | torch.nn.Sequential) and part.isdigit():
                return f"{parent} has {len(current)} entries (0..{len(current) - 1})"
            return f"{parent} has no {part!r}"
        current, done = child, done + [part]
    return ""


def _linear_dims(module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer (or of a peft LoRA wrapper's base layer)."""
    base = getattr(module, "base_layer", module)
    weight = getattr(base, "weight", None)
    if isinstance(base, torch.nn.Linear) or (isinstance(weight, torch.Tensor) and weight.dim() == 2):
        return int(weight.shape[1]), int(weight.shape[0])
    return None


def check_lora_layers(pipe, layers: list[LoraLayer], where: str) -> None:
    """Every layer names an existing linear module of `pipe` with matching in/out features; raises
    ValueError with the first mismatch (and how many more there are)."""
    problems: list[str] = []
    for layer in layers:
        root = getattr(pipe, layer.component, None)
        if root is None:
            problems.append(f"key {layer.keys['lora_A']!r} is for the {layer.component}, which this model does not have")
            continue
        try:
            module = root.get_submodule(layer.module)
        except AttributeError:
            hint = _missing_module_hint(root, layer.module)
            problems.append(f"key {layer.keys['lora_A']!r}: module {layer.module!r} does not exist in this model's "
                            f"{layer.component}" + (f" ({hint})" if hint else ""))
            continue
        dims = _linear_dims(module)
        if dims is None:
            problems.append(f"key {layer.keys['lora_A']!r}: module {layer.module!r} of this model is a "
                            f"{type(module).__name__}, not a linear layer")
            continue
        in_features, out_features = dims
        expected = {"lora_A": (layer.rank, in_features), "lora_B": (out_features, layer.rank)}
        for part in ("lora_A", "lora_B"):
            if layer.shapes[part] != expected[part]:
                problems.append(f"key {layer.keys[part]!r} expects shape {expected[part]} for module {layer.module!r} "
                                f"of this model, the file has {layer.shapes[part]}")
                break
    if problems:
        more = f" (and {len(problems) - 1} more mismatched key(s))" if len(problems) > 1 else ""
        raise ValueError(f"{where}: {problems[0]}{more}")


def _load_tensors(file: Path, option: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{option}: {str(file)!r} is not a valid safetensors file ({exc})") from None


def _check_finite(tensors: dict, file: Path, option: str) -> None:
    """ValueError naming the file and the first tensor that holds NaN or ±inf."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{option}: {str(file)!r}: tensor {key!r} holds {bad} non-finite value(s) (NaN or "
                             f"±inf) of {tensor.numel()}; these LoRA weights cannot be used")


def load_lora(pipe, path, *, option: str = "--lora") -> None:
    """Load diffusers-format LoRA weights (a directory holding pytorch_lora_weights.safetensors, or the file).

    Before anything is loaded into the model, the file's keys and shapes (from the safetensors header) are
    checked against `pipe`: `<component>.<module>.lora_A.weight` must be `[rank, in_features]` and
    `lora_B` `[out_features, rank]` of an existing linear module, else ValueError "--lora DIR: key X expects
    shape A for module M of this model, the file has B" (or "module M does not exist in this model").
    peft's key forms (`.lora_A.default.weight`, keys without the `transformer.` prefix), which diffusers
    would skip without a word, are renamed to diffusers' form. Other LoRA formats (kohya, BFL) are left to
    diffusers' converters unchecked. A tensor holding NaN or ±inf (any format) is refused with ValueError
    naming the file and the tensor.
    """
    where = f"{option} {str(path)!r}"
    file = lora_file(path, option)
    layers = lora_layers(read_lora_shapes(file, option), where)
    if layers is None:
        _check_finite(_load_tensors(file, option), file, option)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        return
    check_lora_layers(pipe, layers, where)
    tensors = _load_tensors(file, option)
    _check_finite(tensors, file, option)
    state = {layer.diffusers_key(part): tensors[layer.keys[part]] for layer in layers for part in ("lora_A", "lora_B")}
    pipe.load_lora_weights(state)
    missing = [layer.module for layer in layers
               if not hasattr(getattr(pipe, layer.component).get_submodule(layer.module), "lora_A")]
    if missing:
        raise RuntimeError(f"{where}: diffusers loaded no adapter into module {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def lora_scaling(transformer, module_path: str) -> float:
    """peft's scale (alpha / rank) of the LoRA on `module_path` of `transformer`; 1 without one."""
    for path in (module_path, module_path.removeprefix("transformer.")):
        try:
            module = transformer.get_submodule(path)
        except AttributeError:
            continue
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or not scaling:
            return 1.0
        if len(scaling) > 1:
            raise ValueError(f"module {path!r} holds several LoRA adapters {sorted(scaling)}; save one adapter at a time")
        return float(next(iter(scaling.values())))
    return 1.0


def fold_lora_scale(state_dict: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """A peft LoRA state dict (`<module>.lora_A.weight` / `.lora_B.weight`) with each module's alpha/rank
    scale folded into its `lora_B`, as diffusers' files need (they carry no alpha: the loader uses scale 1)."""
    bad = next((k for k in state_dict if ".lora_A." not in k and ".lora_B." not in k), None)
    if not state_dict or bad is not None:
        raise ValueError("expected a peft LoRA state dict (keys ending in lora_A/lora_B.weight), got "
                         + ("no keys" if not state_dict else repr(bad)))
    folded = {}
    for key, value in state_dict.items():
        if ".lora_B." in key:
            scale = lora_scaling(transformer, key.split(".lora_B.")[0])
            value = value * scale if scale != 1.0 else value
        folded[key] = value
    return folded


def unfold_lora_scale(state_dict: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """The inverse of `fold_lora_scale` (a diffusers file back to the adapter's own weights)."""
    out = {}
    for key, value in state_dict.items():
        if ".lora_B." in key:
            scale = lora_scaling(transformer, key.split(".lora_B.")[0])
            value = value / scale if scale != 1.0 else value
        out[key] = value
    return out

