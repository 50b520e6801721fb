"""A small synthetic CompBench-format directory (add / remove / replace), for tests and demos."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io.files import atomic_file, atomic_write_text
from .compbench import GROUND_TRUTH_DIR, MASK_DIR, METADATA_FILE, SOURCE_DIR, TASKS


_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190), "orange": (240, 140, 30)}
_SHAPES = ("square", "disc")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    c0 = rng.uniform(40, 200, 3)
    c1 = rng.uniform(40, 200, 3)
    t = (x * rng.uniform(0.3, 1.0) + y * rng.uniform(0.3, 1.0))[..., None] / 2.0
    img = c0 * (1 - t) + c1 * t
    stripes = (np.sin(2 * np.pi * (x * rng.integers(2, 5) + y * rng.integers(1, 4))) * 12.0)[..., None]
    noise = rng.normal(0, 4.0, img.shape)
    return np.clip(img + stripes + noise, 0, 255)


def _shape_mask(kind: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    top, left, bottom, right = box
    y, x = np.mgrid[0:size, 0:size]
    if kind == "square":
        return (y >= top) & (y < bottom) & (x >= left) & (x < right)
    cy, cx = (top + bottom - 1) / 2, (left + right - 1) / 2
    ry, rx = (bottom - top) / 2, (right - left) / 2
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _write_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8)).save(tmp, format="PNG")


def write_compbench_example_dir(root, n_per_task: int = 2, size: int = 64, seed: int = 0,
                                tasks: Sequence[str] = TASKS) -> Path:
    """Write a small synthetic CompBench-format directory under `root` and return `root/tasks`.

    Per task, `n_per_task` examples of `size`×`size` px: a textured background, a rectangular edit mask
    (the object's box grown by a margin), the source and a ground-truth edit (add: a colored shape appears
    in the box; remove: it disappears; replace: its color and shape change), with instructions and local
    captions. Image paths are nested like the official data (`<hash>/<k>/<frame>.png`). Deterministic in
    `seed`.
    """
    if n_per_task < 1 or size < 16:
        raise ValueError(f"write_compbench_example_dir: n_per_task ≥ 1 and size ≥ 16 are required, got {n_per_task}, {size}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"write_compbench_example_dir: unknown tasks {unknown}; choose from {TASKS}")
    tasks_root = Path(root) / "tasks"
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    for task in tasks:
        task_dir = tasks_root / task
        entries = []
        for k in range(n_per_task):
            h = "%08x" % int(rng.integers(0, 2**32))
            image_path = f"{h}/{k}/{k:05d}.png"
            bg = _background(rng, size)
            obj = int(rng.integers(size // 4, size // 2))
            top = int(rng.integers(2, size - obj - 2))
            left = int(rng.integers(2, size - obj - 2))
            box = (top, left, top + obj, left + obj)
            margin = max(1, size // 32)
            mbox = (max(0, top - margin), max(0, left - margin), min(size, top + obj + margin), min(size, left + obj + margin))
            mask = _shape_mask("square", mbox, size)
            c_old, c_new = rng.choice(len(names), 2, replace=False)
            s_old, s_new = _SHAPES[int(rng.integers(2))], _SHAPES[int(rng.integers(2))]
            old_obj = _shape_mask(s_old, box, size)[..., None]
            new_obj = _shape_mask(s_new, box, size)[..., None]
            with_old = np.where(old_obj, np.array(_COLORS[names[c_old]], dtype=np.float64), bg)
            with_new = np.where(new_obj, np.array(_COLORS[names[c_new]], dtype=np.float64), bg)
            if task == "add":
                source, target = bg, with_new
                instruction = f"Add a {names[c_new]} {s_new} in the marked area."
                caption = f"a {names[c_new]} {s_new}"
            elif task == "remove":
                source, target = with_old, bg
                instruction = f"Remove the {names[c_old]} {s_old}."
                caption = "an empty textured background"
            else:
                source, target = with_old, with_new
                instruction = f"Replace the {names[c_old]} {s_old} with a {names[c_new]} {s_new}."
                caption = f"a {names[c_new]} {s_new}"
            _write_png(source, task_dir / SOURCE_DIR / image_path)
            _write_png(target, task_dir / GROUND_TRUTH_DIR / image_path)
            _write_png(mask.astype(np.float64) * 255.0, task_dir / MASK_DIR / image_path)
            entries.append({"image_path": image_path, "instruction": instruction, "caption": caption})
        task_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(task_dir / METADATA_FILE, entries)
    return tasks_root


def _write_json_atomic(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


__all__ = ["write_compbench_example_dir"]
