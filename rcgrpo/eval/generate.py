"""Generating the edits that `rcgrpo eval` scores: one per CompBench example, resumable."""
from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from ..io.files import atomic_file
from .compbench import CompBenchDataset, CompBenchRecord


def output_path(outputs_root: Path, rec: CompBenchRecord) -> Path:
    """Where the edit of `rec` is written: `outputs_root/<task>/<image_path with .png suffix>`."""
    return outputs_root.joinpath(rec.task, *Path(rec.image_path).with_suffix(".png").parts)


def find_existing_output(outputs_root: Path, rec: CompBenchRecord) -> Path | None:
    """The edit of `rec` in a directory of existing outputs: `<task>/<image_path>` as named, or as .png."""
    exact = outputs_root.joinpath(rec.task, *Path(rec.image_path).parts)
    if exact.is_file():
        return exact
    png = output_path(outputs_root, rec)
    return png if png.is_file() else None


def example_seed(seed: int, example_id: str) -> int:
    """A per-example generator seed that does not depend on the order or subset of examples."""
    return (int(seed) * 1_000_003 + zlib.crc32(example_id.encode("utf-8"))) % (2**63 - 1)


def _atomic_save_png(img, path: Path) -> None:
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")


def generate_edits(dataset: CompBenchDataset, outputs_root, pipe, *, steps: int, guidance_scale: float = 2.5,
                   resolution: int | None = None, seed: int = 0, max_sequence_length: int | None = None,
                   log: Callable[[str], None] = print) -> tuple[int, int]:
    """Edit every example with `pipe` (a FluxKontextPipeline) into `outputs_root`; existing outputs are
    kept (resume). `resolution`: edit at resolution×resolution (source resized, no auto-resize); None lets
    the pipeline choose. Returns (generated, skipped)."""
    from PIL import Image

    outputs_root = Path(outputs_root)
    generated = skipped = 0
    start = time.time()
    total = len(dataset.records)
    for n, rec in enumerate(dataset.records, 1):
        path = output_path(outputs_root, rec)
        if path.is_file():
            skipped += 1
            continue
        example = dataset.load(rec)
        image = example.source
        kwargs: dict[str, Any] = {}
        if resolution is not None:
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
            kwargs.update(height=resolution, width=resolution, max_area=resolution * resolution, _auto_resize=False)
        if max_sequence_length is not None:
            kwargs["max_sequence_length"] = max_sequence_length
        generator = torch.Generator(device="cpu").manual_seed(example_seed(seed, rec.id))
        result = pipe(image=image, prompt=rec.instruction, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pil", **kwargs)
        _atomic_save_png(result.images[0], path)
        generated += 1
        if log is not None and (generated == 1 or n == total or generated % 10 == 0):
            log(f"generated {generated} edit(s) ({n}/{total} examples, {time.time() - start:.1f} s)")
    return generated, skipped


__all__ = ["example_seed", "find_existing_output", "generate_edits", "output_path"]
