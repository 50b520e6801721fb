"""Writing a held-out MiniBench set in the official CompBench layout (`rcgrpo minibench make`).

    write_minibench(output_dir, per_task, seed, size=64, tasks=TASKS, overwrite=False, split="val") -> Path

writes

    <output_dir>/minibench.json                      what was generated (seed, per_task, size, tasks, counts)
    <output_dir>/tasks/<task>/metadata.json          [{"image_path", "instruction", "caption", ...}, ...]
    <output_dir>/tasks/<task>/input_image/<name>.png     source (RGB, 8 bit)
    <output_dir>/tasks/<task>/edited_image/<name>.png    ground-truth edit
    <output_dir>/tasks/<task>/mask/<name>.png            edit mask (L, 0 / 255; 255 = edit region)

which `rcgrpo.eval.compbench.CompBenchDataset` reads, so `rcgrpo eval --data <output_dir>` runs on it
unchanged. The examples are those of `MiniBenchDataset(per_task=per_task, split=split, seed=seed,
size=size, tasks=tasks)` with split "val" (the default; "heldout" is its old name) or "test", so the set is
a function of (split, seed, per_task, size, tasks) and never shares an example seed with the train split or
the other held-out split. `<name>` is the generator's example id (`val-<task>-<index>`, `test-<task>-<index>`).
Each metadata entry also carries `minibench` (the example's spec, which the programmatic reward
`minibench_reward` scores eval outputs with), `minibench_id`, `seed` (the example seed) and `split`;
CompBenchDataset keeps these extra keys in the example's metadata.

The whole tree is written into a temporary sibling folder and swapped in when complete
(`rcgrpo.io.files.atomic_directory`): a reader sees the old set or the new one, never a partial one.
An existing `output_dir` is replaced only when it is empty, or holds an earlier MiniBench export and
`overwrite=True`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io.files import atomic_directory, atomic_write_text
from ..io.images import to_pil
from .tasks import TASKS, MiniBenchDataset, canonical_split

DEFAULT_EXPORT_SIZE = 64  # the tiny editor's resolution
MANIFEST = "minibench.json"
FORMAT = "rcgrpo-minibench-compbench"


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {str(output_dir)!r} exists and is not a directory")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    manifest = output_dir / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"--output-dir {str(output_dir)!r} is not empty and holds no MiniBench export "
                         f"({MANIFEST}); choose a new or empty directory")
    if not overwrite:
        raise ValueError(f"--output-dir {str(output_dir)!r} already holds a MiniBench export; pass --overwrite "
                         "to replace it")


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _mask_image(mask):
    from PIL import Image

    arr = np.where(mask.detach().cpu().numpy() > 0.5, 255, 0).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def write_minibench(output_dir, per_task: int, seed: int, size: int = DEFAULT_EXPORT_SIZE,
                    tasks: Sequence[str] = TASKS, overwrite: bool = False, split: str = "val") -> Path:
    """Write `per_task` examples of each task of the held-out `split` ("val" or "test"; base seed `seed`,
    `size`×`size` px) in the CompBench layout under `output_dir` (see the module docstring); returns
    `output_dir`."""
    try:
        split = canonical_split(split)
    except ValueError:
        split = None
    if split not in ("val", "test"):
        raise ValueError("--split must be val or test (the train split is for training only)")
    if isinstance(per_task, bool) or not isinstance(per_task, (int, np.integer)) or per_task < 1:
        raise ValueError(f"--per-task must be a positive int, got {per_task!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--seed must be a non-negative int, got {seed!r}")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    tasks = tuple(dict.fromkeys(tasks))
    if bad or not tasks:
        raise ValueError(f"--tasks must be a comma-separated subset of {','.join(TASKS)}, got {','.join(map(str, tasks))!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"--size must be an int of at least 16 (pixels), got {size!r}")
    size = int(size)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)

    dataset = MiniBenchDataset(per_task=int(per_task), split=split, seed=int(seed), size=size, tasks=tasks,
                               cache=False)
    spec_version = None
    entries: dict[str, list[dict]] = {t: [] for t in tasks}
    with atomic_directory(output_dir) as tmp:
        for ex in dataset:
            name = f"{ex.example_id}.png"
            task_dir = Path(tmp) / "tasks" / ex.task
            for folder, img in (("input_image", to_pil(ex.image)), ("edited_image", to_pil(ex.target)),
                                ("mask", _mask_image(ex.mask))):
                (task_dir / folder).mkdir(parents=True, exist_ok=True)
                (task_dir / folder / name).write_bytes(_png_bytes(img))
            spec_version = ex.spec.get("version")
            entries[ex.task].append({"image_path": name, "instruction": ex.instruction, "caption": ex.caption,
                                     "minibench_id": ex.example_id, "seed": ex.metadata["seed"],
                                     "split": ex.metadata["split"], "minibench": ex.spec})
        for task, rows in entries.items():
            atomic_write_text(Path(tmp) / "tasks" / task / "metadata.json", json.dumps(rows, indent=1) + "\n")
        manifest = {"format": FORMAT, "split": split, "seed": int(seed), "per_task": int(per_task), "size": size,
                    "tasks": list(tasks), "counts": {t: len(rows) for t, rows in entries.items()},
                    "spec_version": spec_version,
                    "command": f"rcgrpo minibench make --output-dir DIR --split {split} --per-task {int(per_task)} "
                               f"--seed {int(seed)} --size {size} --tasks {','.join(tasks)}"}
        atomic_write_text(Path(tmp) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return output_dir


__all__ = ["DEFAULT_EXPORT_SIZE", "MANIFEST", "write_minibench"]
