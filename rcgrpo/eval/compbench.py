"""CompBench local-editing data (add / remove / replace) in the official directory layout.

The layout written by CompBench's `download_from_hf.py` and read by its `eval_all.py`:

    <root>/tasks/<task>/metadata.json        [{"image_path": ..., "instruction": ..., "caption": ...}, ...]
    <root>/tasks/<task>/input_image/<image_path>    source image
    <root>/tasks/<task>/edited_image/<image_path>   ground-truth edit
    <root>/tasks/<task>/mask/<image_path>           edit mask (L; white = edit region)

with `<task>` in add, remove, replace. `image_path` is relative to each of the three folders, in the
official data a nested path such as `001ca3cb/0/00003.png`; plain file names work the same way. `root`
may be the folder holding `tasks/` or the `tasks/` folder itself. Entries may name the image with
`image_name` instead of `image_path` (as `eval_all.py` accepts). A path that starts with the folder name
(`input_image/x.png`) is taken relative to the task folder; absolute paths and `..` are rejected. When a
mask or ground truth is not found under the exact name, the same name with a `.png` suffix is tried
(masks are PNG in the official data).

`CompBenchDataset(root)` validates every file up front (existence, readability of the header, matching
sizes) and raises `CompBenchError` (a ValueError) naming the file and the example. `rcgrpo eval` reads the
data as the official script does instead: `allow_missing=True` keeps examples whose source or mask is
missing (the official script skips them; `rcgrpo eval` lists them) and `check_sizes=False` accepts a mask
or ground truth whose size differs from the source (the official script resizes each image to the
evaluation size on its own). `dataset[i]` is a
`CompBenchExample` with the source image and mask loaded; it is usable as the trainer's dataset
(`len`, indexing; an example has `image` `[3, H, W]`, `mask` `[H, W]`, `instruction`, `id` and
`metadata` with `caption` and `reference` (the ground-truth path, for LC-I)) and by
`rcgrpo.eval`. For training at a fixed size pass `resolution=`; without ground truths,
`require_ground_truth=False`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .constants import TASKS

SOURCE_DIR = "input_image"
GROUND_TRUTH_DIR = "edited_image"
MASK_DIR = "mask"
METADATA_FILE = "metadata.json"

__all__ = [
    "TASKS",
    "CompBenchDataset",
    "CompBenchError",
    "CompBenchExample",
    "CompBenchRecord",
    "find_tasks_root",
]


class CompBenchError(ValueError):
    """A CompBench directory, metadata file or example is missing or inconsistent."""


@dataclass(frozen=True)
class CompBenchRecord:
    """One example's text and file paths (nothing loaded)."""

    id: str  # "<task>/<image_path>"
    task: str
    image_path: str  # relative path as written in metadata.json
    instruction: str
    caption: str
    source_path: Path
    mask_path: Path
    ground_truth_path: Path | None
    extra: dict = field(default_factory=dict, compare=False)  # other metadata fields

    def missing_files(self) -> list[str]:
        """Which of the source image and the mask are missing ("source image", "mask"), in that order."""
        return [what for what, path in (("source image", self.source_path), ("mask", self.mask_path))
                if not path.is_file()]


@dataclass
class CompBenchExample:
    """One example, loaded: `source` (PIL RGB), `mask` (`[H, W]` float in [0, 1], 1 = edit region; an 8-bit
    mask is /255 unless its maximum is 1, a 0/1 mask)."""

    id: str
    task: str
    image_path: str
    source: Any  # PIL.Image.Image (RGB)
    mask: torch.Tensor
    instruction: str
    caption: str
    ground_truth_path: Path | None
    source_path: Path
    mask_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.instruction

    @property
    def image(self) -> torch.Tensor:
        """The source image as `[3, H, W]` float in [0, 1] (what the trainer reads)."""
        return self.source_tensor()

    @property
    def example_id(self) -> str:
        return self.id

    @property
    def metadata(self) -> dict:
        """The per-example metadata rewards read (see `reward_metadata`)."""
        return self.reward_metadata()

    def source_tensor(self) -> torch.Tensor:
        """`[3, H, W]` float in [0, 1]."""
        return torch.from_numpy(np.asarray(self.source, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def load_ground_truth(self):
        """The ground-truth edit as a PIL RGB image (CompBenchError when there is none)."""
        if self.ground_truth_path is None:
            raise CompBenchError(f"example {self.id}: no ground-truth image")
        return _open_rgb(self.ground_truth_path, self.id, "ground-truth image")

    def reward_metadata(self) -> dict:
        """The per-example metadata rewards read: id, task, caption, reference (ground-truth path)."""
        return {"id": self.id, "task": self.task, "caption": self.caption,
                "reference": str(self.ground_truth_path) if self.ground_truth_path else None, **self.extra}

    def to_dict(self) -> dict:
        """`{"id", "task", "image", "source_image", "mask", "prompt", "instruction", "caption",
        "ground_truth_path", "metadata"}` (image: `[3, H, W]` tensor in [0, 1], source_image: PIL,
        mask: `[H, W]` tensor)."""
        return {"id": self.id, "task": self.task, "image": self.source_tensor(), "source_image": self.source,
                "mask": self.mask,
                "prompt": self.instruction, "instruction": self.instruction, "caption": self.caption,
                "ground_truth_path": self.ground_truth_path, "metadata": self.reward_metadata()}


def _open_rgb(path: Path, example_id: str, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise CompBenchError(f"example {example_id}: {what} not found: {str(path)!r}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CompBenchError(f"example {example_id}: {what} {str(path)!r} is not a readable image ({exc})") from None


def _image_size(path: Path, example_id: str, what: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise CompBenchError(f"example {example_id}: {what} {str(path)!r} is not a readable image ({exc})") from None


def find_tasks_root(root) -> Path:
    """The folder holding `<task>/metadata.json`: `root/tasks` or `root` itself."""
    root = Path(root)
    if not root.exists():
        raise CompBenchError(f"CompBench directory not found: {str(root)!r}")
    if not root.is_dir():
        raise CompBenchError(f"CompBench path {str(root)!r} is not a directory")
    if (root / "tasks").is_dir():
        return root / "tasks"
    if any((root / t / METADATA_FILE).is_file() for t in TASKS):
        return root
    raise CompBenchError(
        f"no CompBench tasks under {str(root)!r}: expected {str(root)}/tasks/<task>/{METADATA_FILE} "
        f"with <task> in {', '.join(TASKS)}"
    )


def _relative(image_path: str, meta_file: Path, index: int) -> PurePosixPath:
    rel = PurePosixPath(image_path.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise CompBenchError(
            f"{meta_file} entry {index}: image_path {image_path!r} must be a relative path inside the task folder"
        )
    if rel.parts[0] in (SOURCE_DIR, GROUND_TRUTH_DIR, MASK_DIR) and len(rel.parts) > 1:
        rel = PurePosixPath(*rel.parts[1:])
    return rel


def _resolve(folder: Path, rel: PurePosixPath) -> Path | None:
    path = folder.joinpath(*rel.parts)
    if path.is_file():
        return path
    alt = path.with_suffix(".png")
    if alt != path and alt.is_file():
        return alt
    return None


def _read_metadata(meta_file: Path) -> list:
    try:
        text = meta_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise CompBenchError(f"cannot read {str(meta_file)!r} ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CompBenchError(f"{str(meta_file)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise CompBenchError(f"{str(meta_file)!r} must hold a JSON list of entries, got {type(data).__name__}")
    return data


class CompBenchDataset:
    """CompBench local-editing examples from the official layout (see the module docstring).

    `tasks`: task names to read (default: those of add/remove/replace that exist; at least one must).
    `limit`: at most this many examples per task (metadata order). `require_ground_truth`: every example
    must have its `edited_image/` file (needed for evaluation; training can pass False).
    `resolution`: `None` keeps sizes; an int or `(height, width)` resizes sources (bicubic) and masks
    (nearest) when loaded. `check_sizes`: read every image header up front and require equal sizes.
    `allow_missing`: keep examples whose source or mask file is missing (their `source_path` /
    `mask_path` are where the file should be; `CompBenchRecord.missing_files()` names them).
    """

    def __init__(self, root, *, tasks: Sequence[str] | None = None, limit: int | None = None,
                 require_ground_truth: bool = True, resolution: int | tuple[int, int] | None = None,
                 check_sizes: bool = True, allow_missing: bool = False):
        self.root = Path(root)
        self.tasks_root = find_tasks_root(self.root)
        if tasks is None:
            tasks = [t for t in TASKS if (self.tasks_root / t / METADATA_FILE).is_file()]
        else:
            tasks = list(tasks)
            for t in tasks:
                if not isinstance(t, str) or not t or "/" in t or t in (".", ".."):
                    raise CompBenchError(f"invalid task name {t!r}")
                if not (self.tasks_root / t / METADATA_FILE).is_file():
                    raise CompBenchError(f"task {t!r}: {str(self.tasks_root / t / METADATA_FILE)!r} not found")
        if not tasks:
            raise CompBenchError(f"no tasks to read under {str(self.tasks_root)!r}")
        if limit is not None and limit < 1:
            raise CompBenchError(f"limit must be at least 1, got {limit}")
        if resolution is not None:
            resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
            if len(resolution) != 2 or min(resolution) < 1:
                raise CompBenchError(f"resolution must be a positive int or (height, width), got {resolution!r}")
        self.tasks = tuple(tasks)
        self.resolution = resolution
        self.allow_missing = bool(allow_missing)
        self.records: list[CompBenchRecord] = []
        seen: set[str] = set()
        for task in self.tasks:
            for rec in self._read_task(task, limit, require_ground_truth, check_sizes):
                if rec.id in seen:
                    raise CompBenchError(f"duplicate example {rec.id} in {str(self.tasks_root / task / METADATA_FILE)!r}")
                seen.add(rec.id)
                self.records.append(rec)
        if not self.records:
            raise CompBenchError(f"no examples in {str(self.tasks_root)!r} for tasks {', '.join(self.tasks)}")

    def _read_task(self, task: str, limit, require_ground_truth: bool, check_sizes: bool) -> Iterable[CompBenchRecord]:
        task_dir = self.tasks_root / task
        meta_file = task_dir / METADATA_FILE
        entries = _read_metadata(meta_file)
        if limit is not None:
            entries = entries[:limit]
        for idx, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise CompBenchError(f"{str(meta_file)!r} entry {idx} must be a JSON object, got {type(entry).__name__}")
            image_path = entry.get("image_path", entry.get("image_name"))
            if not isinstance(image_path, str) or not image_path.strip():
                raise CompBenchError(f"{str(meta_file)!r} entry {idx} has no 'image_path' string")
            instruction = entry.get("instruction")
            if not isinstance(instruction, str) or not instruction.strip():
                raise CompBenchError(f"{str(meta_file)!r} entry {idx} ({image_path}) has no 'instruction' string")
            caption = entry.get("caption") or ""
            if not isinstance(caption, str):
                raise CompBenchError(f"{str(meta_file)!r} entry {idx} ({image_path}): 'caption' must be a string")
            rel = _relative(image_path, meta_file, idx)
            example_id = f"{task}/{rel.as_posix()}"
            source = task_dir.joinpath(SOURCE_DIR, *rel.parts)
            if not source.is_file() and not self.allow_missing:
                raise CompBenchError(f"example {example_id}: source image not found: {str(source)!r}")
            mask = _resolve(task_dir / MASK_DIR, rel)
            if mask is None:
                if not self.allow_missing:
                    raise CompBenchError(f"example {example_id}: mask not found: {str(task_dir.joinpath(MASK_DIR, *rel.parts))!r}")
                mask = task_dir.joinpath(MASK_DIR, *rel.parts)
            gt = _resolve(task_dir / GROUND_TRUTH_DIR, rel)
            if gt is None and require_ground_truth:
                raise CompBenchError(
                    f"example {example_id}: ground-truth image not found: {str(task_dir.joinpath(GROUND_TRUTH_DIR, *rel.parts))!r}"
                )
            if check_sizes and source.is_file():
                size = _image_size(source, example_id, "source image")
                for path, what in ((mask, "mask"), (gt, "ground-truth image")):
                    if path is not None and path.is_file():
                        other = _image_size(path, example_id, what)
                        if other != size:
                            raise CompBenchError(
                                f"example {example_id}: {what} {str(path)!r} is {other[0]}x{other[1]} but the source "
                                f"image is {size[0]}x{size[1]} (width x height)"
                            )
            extra = {k: v for k, v in entry.items() if k not in ("image_path", "image_name", "instruction", "caption")}
            yield CompBenchRecord(id=example_id, task=task, image_path=rel.as_posix(), instruction=instruction,
                                  caption=caption, source_path=source, mask_path=mask, ground_truth_path=gt, extra=extra)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> CompBenchExample:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        rec = self.records[index]
        return self.load(rec)

    def load_source(self, rec: CompBenchRecord):
        """The source image of `rec` as a PIL RGB image at its own size (`resolution` is not applied)."""
        return _open_rgb(rec.source_path, rec.id, "source image")

    def load(self, rec: CompBenchRecord) -> CompBenchExample:
        from PIL import Image

        source = _open_rgb(rec.source_path, rec.id, "source image")
        try:
            with Image.open(rec.mask_path) as im:
                mask_img = im.convert("L")
        except OSError as exc:
            raise CompBenchError(f"example {rec.id}: mask {str(rec.mask_path)!r} is not a readable image ({exc})") from None
        if mask_img.size != source.size:
            raise CompBenchError(f"example {rec.id}: mask {str(rec.mask_path)!r} is {mask_img.size[0]}x{mask_img.size[1]} "
                                 f"but the source image is {source.size[0]}x{source.size[1]}")
        if self.resolution is not None:
            height, width = self.resolution
            source = source.resize((width, height), Image.Resampling.BICUBIC)
            mask_img = mask_img.resize((width, height), Image.Resampling.NEAREST)
        values = np.asarray(mask_img, dtype=np.float32)
        # 0/255 masks, or 0/1 ones (maximum 1: 1 = edit, as `rcgrpo.io.images` reads masks)
        mask = torch.from_numpy(values if values.size and values.max() == 1 else values / 255.0)
        return CompBenchExample(id=rec.id, task=rec.task, image_path=rec.image_path, source=source, mask=mask,
                                instruction=rec.instruction, caption=rec.caption, ground_truth_path=rec.ground_truth_path,
                                source_path=rec.source_path, mask_path=rec.mask_path, extra=dict(rec.extra))

    def task_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.records:
            counts[rec.task] = counts.get(rec.task, 0) + 1
        return counts
