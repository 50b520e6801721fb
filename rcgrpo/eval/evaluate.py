"""`rcgrpo eval`: CompBench local-editing evaluation (add / remove / replace) that gives the numbers of the
official `eval_all.py`, example for example.

1. Edits: generated with `rcgrpo.editors.loading.load_editor(model)` (`tiny`, `tiny-editor`, a local
   path or a hub id; `lora` loads diffusers-format LoRA weights) into `OUT/outputs/<task>/<image_path>`
   (PNG), with a cache keyed on what produced each edit (`rcgrpo.eval.generate`): a stale edit is
   regenerated (`stale_outputs="refuse"`: refused). Steps, guidance, resolution and text length default
   to the model's `ModelDefaults`; when one of them is left to the defaults, the pipeline is loaded to
   learn them even if every edit then turns out fresh (give all four to resume without loading it). With
   `outputs_dir`, existing edits at `DIR/<task>/<image_path>` are scored instead: the official
   `editing_results/<model>/<model>_local/` folder.
2. Metrics per example: `rcgrpo.eval.metrics` (the official steps; CLIP in `rcgrpo.eval.clip_official`).
   An example whose source, mask, edit or ground truth (when present) is missing or unreadable is
   skipped, as the official script does, and listed (`fail_on_skipped=True`, the CLI's default, makes
   it an error naming the example; sources and masks are decoded before any generation). A mask that
   holds only 0 and 1 is read as 1 = edit (as 255), with a `MaskWarning` (the official script would
   read 1 as 1/255).
3. Results: per task and the macro average over tasks (`rcgrpo.eval.results`), written atomically to
   `OUT/results.json` and `OUT/results.md` with the conventions that apply.

When CLIP or LPIPS weights are not available (offline, no torchvision), those metrics are reported as
unavailable with the reason instead of failing the run (`strict=True` makes it an error). LPIPS uses
torchmetrics' network when torchvision and its weights are available, or `lpips_weights` (a safetensors
file from `rcgrpo.eval.lpips.export_lpips_weights`).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..io.files import atomic_write_text
from ..io.hub import WeightsUnavailableError
from ..io.images import MaskWarning
from ..rewards.background import PSNR_CAP_DB
from ..rewards.clip import DEFAULT_CLIP_MODEL, ClipEncoder
from .clip_official import OfficialClip
from .compbench import CompBenchDataset, CompBenchRecord
from .generate import (GenerationSettings, file_sha256, find_existing_output, generate_edits, model_identity,
                       output_path, plan_generation)
from .lpips import load_lpips_weights, torchmetrics_lpips
from .metrics import EVAL_SIZE, HIGHER_IS_BETTER, METRICS, compute_example_metrics
from .results import aggregate, conventions, official_rounding, write_results

STALE_OUTPUTS = ("regenerate", "refuse")


def _build_clip(clip, clip_model, device, strict: bool) -> tuple[OfficialClip | None, str | None]:
    if clip is not None:
        return (OfficialClip(clip) if isinstance(clip, ClipEncoder) else clip), None
    if not clip_model:
        return None, "no CLIP model given"
    try:
        return OfficialClip.load(str(clip_model), device=device), None
    except WeightsUnavailableError as exc:
        if strict:
            raise
        return None, str(exc)


def _build_lpips(lpips_net, lpips_weights, device, strict: bool) -> tuple[Callable | None, str | None, str]:
    if lpips_net is not None:
        return lpips_net, None, "custom"
    if lpips_weights:
        net = load_lpips_weights(lpips_weights).to(device)
        return net, None, f"squeeze (safetensors: {lpips_weights})"
    try:
        return torchmetrics_lpips(device), None, "squeeze (torchmetrics)"
    except Exception as exc:  # noqa: BLE001 - any failure to build it means "unavailable"
        first = str(exc).splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
        reason = (f"torchmetrics' LPIPS (squeeze) could not be built: {first}; it needs torchvision and its "
                  "ImageNet SqueezeNet weights, or pass --lpips-weights FILE.safetensors "
                  "(see rcgrpo.eval.lpips.export_lpips_weights)")
        if strict:
            raise WeightsUnavailableError(reason) from None
        return None, reason, ""


def _check_options(*, eval_size, steps, resolution, max_sequence_length, guidance_scale, stale_outputs,
                   outputs_dir, pipeline, model, lora) -> None:
    if eval_size < 16:
        raise ValueError(f"--eval-size must be at least 16 px, got {eval_size}")
    for name, value in (("steps", steps), ("resolution", resolution), ("max-sequence-length", max_sequence_length)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if stale_outputs not in STALE_OUTPUTS:
        raise ValueError(f"--stale-outputs must be one of {', '.join(STALE_OUTPUTS)}, got {stale_outputs!r}")
    if outputs_dir is not None:
        if pipeline is not None or model or lora:
            raise ValueError("--outputs scores existing edits; do not combine it with --model or --lora")
        if not Path(outputs_dir).is_dir():
            raise FileNotFoundError(f"--outputs: no such directory {str(outputs_dir)!r}")
    elif pipeline is None and not model:
        raise ValueError("give --model tiny|tiny-editor|PATH|HUB_ID to generate edits, or --outputs DIR to score existing ones")


def _open(path: Path, mode: str):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert(mode)


def evaluate(data, output_dir, *, pipeline=None, model: str | None = None, lora: str | None = None,
             outputs_dir=None, tasks: Sequence[str] | None = None, steps: int | None = None,
             guidance_scale: float | None = None, resolution: int | None = None,
             max_sequence_length: int | None = None, seed: int = 0, limit: int | None = None,
             stale_outputs: str = "regenerate", clip_model: str | None = DEFAULT_CLIP_MODEL,
             clip: OfficialClip | ClipEncoder | None = None, lpips_weights: str | None = None,
             lpips_net: Callable | None = None, strict: bool = False, fail_on_skipped: bool = False,
             eval_size: int = EVAL_SIZE, device=None, model_defaults=None,
             log: Callable[[str], None] | None = print) -> dict:
    """Generate (or take) edits for a CompBench directory and score them; returns the results dict that is
    also written to `output_dir/results.json` (and `results.md`). See the module docstring.

    `pipeline`: an already-built Editor or pipeline of a supported family (then `model` only labels it in the cache key, and
    `model_defaults` or every generation setting must be given). `clip` / `lpips_net`: ready models
    (tests). `limit`: at most this many examples per task.
    """
    log = log or (lambda _msg: None)
    output_dir = Path(output_dir)
    _check_options(eval_size=eval_size, steps=steps, resolution=resolution, max_sequence_length=max_sequence_length,
                   guidance_scale=guidance_scale, stale_outputs=stale_outputs, outputs_dir=outputs_dir,
                   pipeline=pipeline, model=model, lora=lora)
    from ..editors.lora import lora_file as find_lora_file

    lora_file = find_lora_file(lora) if (lora and outputs_dir is None) else None
    dataset = data if isinstance(data, CompBenchDataset) else CompBenchDataset(
        data, tasks=tasks, limit=limit, require_ground_truth=False, check_sizes=False, allow_missing=True)
    from ..editors.loading import default_device

    dev = default_device(str(device) if device is not None else None)

    skipped: dict[str, str] = {}
    for rec in dataset.records:
        missing = rec.missing_files()
        if missing:
            paths = {"source image": rec.source_path, "mask": rec.mask_path}
            skipped[rec.id] = "; ".join(f"{what} missing ({paths[what]})" for what in missing)
            continue
        unreadable = _unreadable(rec)  # before any (slow) generation
        if unreadable:
            skipped[rec.id] = unreadable
    _fail_if_skipped(skipped, fail_on_skipped)

    # metric models first: with strict=True, missing weights fail before any (slow) generation
    clip_scorer, clip_reason = _build_clip(clip, clip_model, dev, strict)
    lpips_fn, lpips_reason, lpips_kind = _build_lpips(lpips_net, lpips_weights, dev, strict)
    unavailable = {}
    if clip_scorer is None:
        unavailable["LC-I"] = unavailable["LC-T"] = clip_reason
    if lpips_fn is None:
        unavailable["LPIPS"] = lpips_reason
    output_dir.mkdir(parents=True, exist_ok=True)

    to_score = [r for r in dataset.records if r.id not in skipped]
    if outputs_dir is not None:
        outputs_root = Path(outputs_dir)
        generation: dict[str, Any] = {"mode": "scored existing outputs", "outputs": str(outputs_root)}
        found = {r.id: find_existing_output(outputs_root, r) for r in to_score}
    else:
        outputs_root = output_dir / "outputs"
        generation = _generate(dataset, to_score, outputs_root, output_dir, pipeline=pipeline, model=model,
                               lora_file=lora_file, steps=steps, guidance_scale=guidance_scale,
                               resolution=resolution, max_sequence_length=max_sequence_length, seed=seed,
                               stale_outputs=stale_outputs, device=dev, model_defaults=model_defaults, log=log)
        found = {r.id: (output_path(outputs_root, r) if output_path(outputs_root, r).is_file() else None)
                 for r in to_score}
    for rec in to_score:
        if found[rec.id] is None:
            skipped[rec.id] = f"edit missing ({output_path(outputs_root, rec)})"
    _fail_if_skipped(skipped, fail_on_skipped)

    per_example, notes = [], []
    masks_01: list[str] = []
    capped = 0
    start = time.time()
    for rec in dataset.records:
        if rec.id in skipped:
            continue
        images = {}
        for what, path, mode in (("source image", rec.source_path, "RGB"), ("mask", rec.mask_path, "L"),
                                 ("edit", found[rec.id], "RGB"), ("ground-truth image", rec.ground_truth_path, "RGB")):
            if path is None:  # no ground truth in the data: LC-I n/a, as the official script
                notes.append({"id": rec.id, "note": "no ground-truth image: LC-I n/a"})
                images[what] = None
                continue
            try:
                images[what] = _open(path, mode)
            except _UNREADABLE as exc:
                skipped[rec.id] = f"{what} unreadable ({path}: {_first_line(exc)})"
                break
        if rec.id in skipped:
            _fail_if_skipped(skipped, fail_on_skipped)
            continue
        if images["mask"].getextrema()[1] == 1:  # a 0/1 mask: 1 = edit, as rcgrpo reads masks everywhere
            images["mask"] = images["mask"].point(lambda v: 255 if v else 0)
            masks_01.append(rec.id)
            notes.append({"id": rec.id, "note": "mask of 0/1 values: read as 1 = edit region (255)"})
        gt = images["ground-truth image"]
        example_notes: list[str] = []
        metrics = compute_example_metrics(images["source image"], images["edit"], images["mask"], gt, [rec.caption],
                                          size=eval_size, clip=clip_scorer, lpips=lpips_fn, device=dev,
                                          notes=example_notes)
        capped += any(n.startswith("PSNR") for n in example_notes)
        notes += [{"id": rec.id, "note": n} for n in example_notes]
        values = {k: metrics.get(k) for k in METRICS}
        values = {k: (None if v is None or math.isnan(v) else v) for k, v in values.items()}  # JSON has no NaN
        per_example.append({"id": rec.id, "task": rec.task, "output": str(found[rec.id]), **values})
    log(f"scored {len(per_example)} example(s) in {time.time() - start:.1f} s"
        + (f"; {len(skipped)} skipped" if skipped else ""))
    if masks_01:
        warnings.warn(f"{len(masks_01)} mask(s) hold only the values 0 and 1 (e.g. {masks_01[0]}): read as 0/1 "
                      "masks, 1 = edit region (as 255); CompBench's eval_all.py would read 1 as 1/255 and count "
                      "the edit region as background", MaskWarning, stacklevel=2)

    per_task, average = aggregate(per_example, dataset.tasks)
    settings = {"data": str(dataset.root), "tasks": list(dataset.tasks), "limit_per_task": limit,
                "eval_size": eval_size, "psnr_cap_db": PSNR_CAP_DB, "psnr_capped": capped, "masks_01": len(masks_01),
                "clip_model": None if clip_scorer is None else clip_scorer.name,
                "lpips": lpips_kind or None, "outputs": str(outputs_root), "generation": generation}
    results = {
        "benchmark": "CompBench local editing",
        "metrics": list(METRICS),
        "higher_is_better": HIGHER_IS_BETTER,
        "per_task": per_task,
        "average": average,
        "official_rounding": official_rounding(per_example, dataset.tasks),
        "conventions": conventions(settings),
        "unavailable": unavailable,
        "skipped": [{"id": r.id, "task": r.task, "reason": skipped[r.id]} for r in dataset.records if r.id in skipped],
        "notes": notes,
        "settings": settings,
        "examples": per_example,
    }
    write_results(results, output_dir)
    log(f"wrote {output_dir / 'results.json'} and {output_dir / 'results.md'}")
    return results


_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreadable(rec: CompBenchRecord) -> str | None:
    """Why the source image or mask of `rec` cannot be decoded ("mask unreadable (...)"), or None."""
    for what, path, mode in (("source image", rec.source_path, "RGB"), ("mask", rec.mask_path, "L")):
        try:
            _open(path, mode)
        except _UNREADABLE as exc:
            return f"{what} unreadable ({path}: {_first_line(exc)})"
    return None


def _fail_if_skipped(skipped: dict[str, str], fail: bool) -> None:
    if fail and skipped:
        first = next(iter(skipped))
        raise FileNotFoundError(f"{len(skipped)} example(s) cannot be scored, e.g. {first}: {skipped[first]} "
                                "(--skip-missing skips them and lists them in results.md)")


def _load_editor(model: str, device):
    from ..editors.loading import load_editor, registered_models

    named = registered_models()
    if model not in named and not Path(str(model)).expanduser().exists():
        from huggingface_hub import try_to_load_from_cache

        from ..io.hub import hub_reachable

        try:
            cached = try_to_load_from_cache(str(model), "model_index.json")
        except ValueError:  # not a valid repo id either
            raise ValueError(f"--model {model!r}: not a local path, a built-in model ({', '.join(named)}) "
                             "or a hub id") from None
        if not isinstance(cached, str):
            reachable, why = hub_reachable()
            if not reachable:
                raise WeightsUnavailableError(
                    f"--model {model!r} is not a local path, not in the local Hugging Face cache, and cannot be "
                    f"downloaded: {why}; download it elsewhere and pass its local path")
    return load_editor(str(model), device=str(device))


def _generate(dataset: CompBenchDataset, records: list[CompBenchRecord], outputs_root: Path, output_dir: Path, *,
              pipeline, model, lora_file, steps, guidance_scale, resolution, max_sequence_length, seed,
              stale_outputs, device, model_defaults, log) -> dict:
    """Plan the cache, load the editor only when needed, generate; returns the `generation` record."""
    from ..editors.loading import editor_for_pipeline, registered_models

    identity = model_identity(model, tuple(registered_models())) if model else f"<{type(pipeline).__name__} object>"
    lora_sha = file_sha256(lora_file) if lora_file else None
    pipe = editor_for_pipeline(pipeline) if pipeline is not None else None
    defaults = model_defaults if model_defaults is not None else (pipe.defaults if pipe is not None else None)
    if defaults is None and None in (steps, guidance_scale, resolution, max_sequence_length):
        log(f"loading {model} (for its default settings)")
        pipe = _load_editor(model, device)
        defaults = pipe.defaults
    pick = lambda given, name: given if given is not None else getattr(defaults, name)  # noqa: E731
    side = pick(resolution, "resolution")
    settings = GenerationSettings(model=identity, lora_sha256=lora_sha, steps=int(pick(steps, "num_inference_steps")),
                                  guidance_scale=float(pick(guidance_scale, "guidance_scale")), seed=int(seed),
                                  height=int(side), width=int(side),
                                  max_sequence_length=int(pick(max_sequence_length, "max_sequence_length")),
                                  negative_prompt=defaults.negative_prompt if defaults is not None else None)
    plan = plan_generation(records, outputs_root, settings)
    if plan.stale and stale_outputs == "refuse":
        rec, why = plan.stale[0]
        raise ValueError(f"{len(plan.stale)} edit(s) in {str(outputs_root)!r} were generated otherwise, e.g. {rec.id} "
                         f"({why}); rerun with --stale-outputs regenerate or use a new --output-dir")
    for rec, why in plan.stale:
        log(f"stale edit {rec.id} ({why}): regenerating")
    if plan.todo:
        if pipe is None:
            log(f"loading {model}")
            pipe = _load_editor(model, device)
        if lora_file is not None:
            pipe.load_lora(lora_file)
        generate_edits(dataset, plan.todo, outputs_root, pipe, settings, plan.keys, log=log)
    if pipeline is None and pipe is not None:  # free the generator's memory before scoring
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record = {"mode": "generated", "model": identity, "lora": str(lora_file) if lora_file else None,
              **settings.to_dict(), "generated": len(plan.missing), "regenerated_stale": len(plan.stale),
              "reused": len(plan.fresh)}
    atomic_write_text(output_dir / "generation.json", json.dumps(record, indent=2))
    log(f"edits: {len(plan.missing)} generated, {len(plan.stale)} regenerated (stale), {len(plan.fresh)} reused "
        f"in {outputs_root}")
    return record


__all__ = ["STALE_OUTPUTS", "evaluate"]
