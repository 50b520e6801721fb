"""Generating the edits that `rcgrpo eval` scores, one per CompBench example, with a cache keyed on what
produced each edit.

Each edit `outputs/<task>/<image_path as .png>` has a sidecar `<same name>.json` holding its
`generation key`: the model (a local path as its resolved real path, so `./m`, `m/` and a symlink to it
are the same model; a hub id or a built-in name as given), the SHA-256 of the LoRA safetensors file (its
content, not its path), steps, guidance, seed (and the per-example seed drawn from it), height, width,
the text length, the instruction and the SHA-256 of the source file. An edit is reused only when its
sidecar matches the key of the current run; otherwise it is stale and regenerated (or, on request,
refused). The image is written before its sidecar, each atomically, and the old sidecar is removed
first, so a run killed half-way leaves an edit without a sidecar (regenerated next time), never a
sidecar vouching for an image that it did not produce.
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..io.files import atomic_file, atomic_write_text
from ..io.images import to_pil
from .compbench import CompBenchDataset, CompBenchRecord

KEY_VERSION = 1
SIDECAR_SUFFIX = ".json"


def output_path(outputs_root: Path, rec: CompBenchRecord) -> Path:
    """Where the edit of `rec` is written: `outputs_root/<task>/<image_path with .png suffix>`."""
    return Path(outputs_root).joinpath(rec.task, *Path(rec.image_path).with_suffix(".png").parts)


def sidecar_path(image_path: Path) -> Path:
    """The generation-key file next to an edit: `<name>.png.json`."""
    return image_path.with_name(image_path.name + SIDECAR_SUFFIX)


def find_existing_output(outputs_root: Path, rec: CompBenchRecord) -> Path | None:
    """The edit of `rec` in a directory of existing outputs: `<task>/<image_path>` as named, or as .png."""
    exact = Path(outputs_root).joinpath(rec.task, *Path(rec.image_path).parts)
    if exact.is_file():
        return exact
    png = output_path(outputs_root, rec)
    return png if png.is_file() else None


def example_seed(seed: int, example_id: str) -> int:
    """A per-example generator seed that does not depend on the order or subset of examples."""
    return (int(seed) * 1_000_003 + zlib.crc32(example_id.encode("utf-8"))) % (2**63 - 1)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model: str, builtin: Sequence[str] = ()) -> str:
    """What names the model in a generation key: an existing local path → its resolved real path (every
    spelling of the same folder gives the same string); a built-in name or a hub id → as given."""
    text = str(model)
    if text in builtin:
        return text
    local = Path(text).expanduser()
    return str(local.resolve()) if local.exists() else text


@dataclass(frozen=True)
class GenerationSettings:
    """What produces every edit of a run (the per-example part of the key is added by `generation_key`)."""

    model: str  # `model_identity(...)`
    lora_sha256: str | None
    steps: int
    guidance_scale: float
    seed: int
    height: int
    width: int
    max_sequence_length: int
    negative_prompt: str | None = None  # true CFG's (Qwen-Image-Edit); None for families without it

    def to_dict(self) -> dict:
        values = {"model": self.model, "lora_sha256": self.lora_sha256, "steps": self.steps,
                  "guidance_scale": self.guidance_scale, "seed": self.seed, "height": self.height,
                  "width": self.width, "max_sequence_length": self.max_sequence_length}
        if self.negative_prompt is not None:
            values["negative_prompt"] = self.negative_prompt
        return values


def generation_key(settings: GenerationSettings, rec: CompBenchRecord) -> dict:
    """The full key of one edit: the run's settings, the example's seed and instruction, the source's hash."""
    return {"version": KEY_VERSION, **settings.to_dict(), "example": rec.id,
            "example_seed": example_seed(settings.seed, rec.id), "instruction": rec.instruction,
            "source_sha256": file_sha256(rec.source_path)}


def read_key(image_path: Path) -> dict | None:
    """The key stored beside an edit, or None (no sidecar, unreadable, or not a key)."""
    side = sidecar_path(image_path)
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def key_difference(stored: dict | None, wanted: dict) -> str:
    """A short description of how a stored key differs from the wanted one ("" when they agree)."""
    if stored is None:
        return "no generation key stored beside it"
    diffs = [k for k in wanted if stored.get(k) != wanted[k]]
    diffs += [k for k in stored if k not in wanted]
    if not diffs:
        return ""

    def short(v):
        text = repr(v)
        return text if len(text) <= 24 else text[:21] + "..."

    return ", ".join(f"{k}: {short(stored.get(k))} → {short(wanted.get(k))}" for k in diffs[:3]) + (
        f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")


@dataclass
class CachePlan:
    """For each example to generate: fresh (reuse), missing (generate) or stale (key differs)."""

    keys: dict[str, dict]
    fresh: list[CompBenchRecord]
    missing: list[CompBenchRecord]
    stale: list[tuple[CompBenchRecord, str]]

    @property
    def todo(self) -> list[CompBenchRecord]:
        return self.missing + [rec for rec, _ in self.stale]


def plan_generation(records: Sequence[CompBenchRecord], outputs_root, settings: GenerationSettings) -> CachePlan:
    """Compare each example's output and sidecar with the key of this run."""
    outputs_root = Path(outputs_root)
    plan = CachePlan(keys={}, fresh=[], missing=[], stale=[])
    for rec in records:
        key = generation_key(settings, rec)
        plan.keys[rec.id] = key
        path = output_path(outputs_root, rec)
        if not path.is_file():
            plan.missing.append(rec)
            continue
        why = key_difference(read_key(path), key)
        if why:
            plan.stale.append((rec, why))
        else:
            plan.fresh.append(rec)
    return plan


def _atomic_save_png(img, path: Path) -> None:
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")


def generate_edits(dataset: CompBenchDataset, records: Sequence[CompBenchRecord], outputs_root, editor,
                   settings: GenerationSettings, keys: dict[str, dict] | None = None,
                   log: Callable[[str], None] | None = print) -> int:
    """Edit `records` with `editor` (an `rcgrpo.editors.Editor`: `editor.edit` from the example's seed) into
    `outputs_root`, each followed by its sidecar key; returns how many were generated. The source is
    resized to `settings.height` × `settings.width` (bicubic) and edited at exactly that size."""
    from PIL import Image

    outputs_root = Path(outputs_root)
    start = time.time()
    total = len(records)
    for n, rec in enumerate(records, 1):
        key = (keys or {}).get(rec.id) or generation_key(settings, rec)
        path = output_path(outputs_root, rec)
        sidecar_path(path).unlink(missing_ok=True)
        image = dataset.load_source(rec).resize((settings.width, settings.height), Image.Resampling.BICUBIC)
        source = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        edited = editor.edit(source[None].to(editor.device, editor.dtype), rec.instruction, num_steps=settings.steps,
                             guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width,
                             max_sequence_length=settings.max_sequence_length, seed=key["example_seed"],
                             negative_prompt=settings.negative_prompt)
        _atomic_save_png(to_pil(edited), path)
        atomic_write_text(sidecar_path(path), json.dumps(key, indent=1, ensure_ascii=False))
        if log is not None and (n == 1 or n == total or n % 10 == 0):
            log(f"generated {n}/{total} edit(s) ({time.time() - start:.1f} s)")
    return total


__all__ = ["CachePlan", "GenerationSettings", "example_seed", "file_sha256", "find_existing_output",
           "generate_edits", "generation_key", "key_difference", "model_identity", "output_path",
           "plan_generation", "read_key", "sidecar_path"]
