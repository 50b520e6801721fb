"""`rcgrpo eval`: CompBench local-editing evaluation (add / remove / replace), as the official script does it.

1. Edits: generated with a FluxKontextPipeline (`--model` hub id or local path, or `--tiny` for the
   offline test model; `--lora DIR` loads diffusers-format LoRA weights) into
   `OUT/outputs/<task>/<image_path>` (PNG), skipping examples whose output already exists (resumable;
   `OUT/generation.json` records the settings, and a resume with different settings is refused). With
   `--outputs DIR`, existing edits at `DIR/<task>/<image_path>` are scored instead (the layout of the
   official `editing_results/<model>_local/<task>/`).
2. Metrics, per example, following CompBench's `eval_all.py`: source, edit and ground truth resized to
   512×512 (PIL bicubic), the mask to 512×512 (nearest) and read as L/255; background images are
   `image · (1 − mask)`; PSNR and SSIM (torchmetrics, data range 1) and LPIPS (SqueezeNet, inputs in
   [−1, 1]) of the edited vs source background; the crop box is `(min x, min y, max x, max y)` of the mask
   pixels > 0 used as a PIL crop box (so, as in the official script, the last row and column are left
   out); LC-T = CLIPScore = max(100·cos, 0) of the edited crop vs the caption (" " when empty); LC-I =
   cosine of CLIP image embeddings of the edited and ground-truth crops; a mask whose box is empty gives
   LC-T = LC-I = 0. CLIP is ViT-L/14 (`openai/clip-vit-large-patch14`) unless `--clip-model` says
   otherwise; its preprocessing is done with torch ops (`rcgrpo.rewards.clip_preprocess`).
3. Results: the mean per task and the macro average over tasks, written atomically to
   `OUT/results.json` and `OUT/results.md` (the layout of the paper's Table 1: LC-I, LC-T, PSNR, SSIM,
   LPIPS).

Deviations, all reported in results.json: PSNR of identical backgrounds (+inf) is capped at 100 dB;
when CLIP or LPIPS weights are not available (offline, no torchvision), those metrics are reported as
unavailable with the reason instead of failing the run (`--strict` makes it an error). LPIPS uses
torchmetrics' LearnedPerceptualImagePatchSimilarity when torchvision and its weights are available, or
`--lpips-weights FILE.safetensors`: the state dict of that metric's network, exported on a machine that
has torchvision with

    from safetensors.torch import save_file
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    net = LearnedPerceptualImagePatchSimilarity(net_type="squeeze").net
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, "lpips_squeeze.safetensors")

and evaluated here by `SqueezeLPIPS`, a torchvision-free copy of the same network.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..io.files import atomic_write_text
from ..io.hub import WeightsUnavailableError
from ..rewards.background import PSNR_CAP_DB
from ..rewards.clip import DEFAULT_CLIP_MODEL, ClipEncoder
from .compbench import CompBenchDataset
from .generate import find_existing_output, generate_edits, output_path
from .lpips import load_lpips_weights, torchmetrics_lpips
from .metrics import EVAL_SIZE, HIGHER_IS_BETTER, METRICS, compute_example_metrics
from .results import write_results

TINY_RESOLUTION = 32


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _build_clip(clip, clip_model, device, strict: bool) -> tuple[ClipEncoder | None, str | None]:
    if clip is not None:
        return clip, None
    if not clip_model:
        return None, "no CLIP model given"
    try:
        return ClipEncoder(clip_model, device=device), None
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
        reason = (f"torchmetrics' LPIPS (squeeze) could not be built: {first}; "
                  "it needs torchvision and its ImageNet SqueezeNet weights, or pass --lpips-weights FILE.safetensors")
        if strict:
            raise WeightsUnavailableError(reason) from None
        return None, reason, ""


def evaluate(data, output_dir, *, pipeline=None, model: str | None = None, tiny: bool = False,
             lora: str | None = None, outputs_dir=None, tasks: Sequence[str] | None = None, steps: int = 28,
             guidance_scale: float = 2.5, resolution: int | None = None, seed: int = 0, limit: int | None = None,
             clip_model: str | None = DEFAULT_CLIP_MODEL, clip: ClipEncoder | None = None,
             lpips_weights: str | None = None, lpips_net: Callable | None = None, strict: bool = False,
             eval_size: int = EVAL_SIZE, device=None, log: Callable[[str], None] | None = print) -> dict:
    """Generate (or take) edits for a CompBench directory and score them; returns the results dict that is
    also written to `output_dir/results.json` (and `results.md`).

    Edits come from `outputs_dir` (existing edits, `<task>/<image_path>`), or are generated into
    `output_dir/outputs` with `pipeline` (an already-built FluxKontextPipeline), `model` (hub id or local
    path), or `tiny=True` (the offline test pipeline). `clip` / `lpips_net` inject ready models (tests);
    otherwise `clip_model` and `lpips_weights` (or torchmetrics' LPIPS) are loaded, and metrics whose
    weights are unavailable are reported as such (an error with `strict=True`).
    `limit`: at most this many examples per task.
    """
    log = log or (lambda _msg: None)
    output_dir = Path(output_dir)
    if eval_size < 16:
        raise ValueError(f"eval_size must be at least 16 px, got {eval_size}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    dataset = data if isinstance(data, CompBenchDataset) else CompBenchDataset(data, tasks=tasks, limit=limit)
    from ..flux.pipeline import default_device

    dev = default_device(str(device) if device is not None else None)
    output_dir.mkdir(parents=True, exist_ok=True)

    if outputs_dir is not None:
        if not Path(outputs_dir).is_dir():
            raise FileNotFoundError(f"--outputs: no such directory {str(outputs_dir)!r}")
        if pipeline is not None or model or tiny or lora:
            raise ValueError("--outputs scores existing edits; do not combine it with --model, --tiny or --lora")
    else:
        if pipeline is None and not model and not tiny:
            raise ValueError("give --model ID_OR_PATH, --tiny, or --outputs DIR (existing edits to score)")
        if model and tiny:
            raise ValueError("--model and --tiny exclude each other")

    # metric models first: with --strict, missing weights fail before any (slow) generation
    clip_enc, clip_reason = _build_clip(clip, clip_model, dev, strict)
    lpips_fn, lpips_reason, lpips_kind = _build_lpips(lpips_net, lpips_weights, dev, strict)
    unavailable = {}
    if clip_enc is None:
        unavailable["LC-I"] = unavailable["LC-T"] = clip_reason
    if lpips_fn is None:
        unavailable["LPIPS"] = lpips_reason

    generation: dict[str, Any] = {}
    if outputs_dir is not None:
        outputs_root = Path(outputs_dir)
        generation = {"mode": "scored existing outputs", "outputs": str(outputs_root)}
    else:
        outputs_root = output_dir / "outputs"
        if tiny and resolution is None:
            resolution = TINY_RESOLUTION
        generation = {"mode": "generated", "model": "tiny" if tiny else (model or type(pipeline).__name__),
                      "lora": str(lora) if lora else None, "steps": steps, "guidance_scale": guidance_scale,
                      "resolution": resolution, "seed": seed}
        _check_generation_record(output_dir / "generation.json", generation)
        todo = [r for r in dataset.records if not output_path(outputs_root, r).is_file()]
        if todo:
            owns_pipeline = pipeline is None
            if owns_pipeline:
                pipeline = _load_pipeline(model, tiny, dev)
            if lora:
                from ..flux.pipeline import load_lora

                load_lora(pipeline, lora)
            atomic_write_text(output_dir / "generation.json", json.dumps(generation, indent=2))
            from ..testing import TINY_TEXT_LEN

            gen, skipped = generate_edits(dataset, outputs_root, pipeline, steps=steps, guidance_scale=guidance_scale,
                                          resolution=resolution, seed=seed,
                                          max_sequence_length=TINY_TEXT_LEN if tiny else None, log=log)
            if owns_pipeline:  # free the generator's memory before scoring
                del pipeline
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        else:
            gen, skipped = 0, len(dataset.records)
        generation.update(generated=gen, skipped_existing=skipped)
        log(f"edits: {gen} generated, {skipped} already present in {outputs_root}")

    missing = [r for r in dataset.records if find_existing_output(outputs_root, r) is None]
    if missing:
        first = output_path(outputs_root, missing[0])
        raise FileNotFoundError(f"{len(missing)} edited image(s) missing under {str(outputs_root)!r}, "
                                f"e.g. {str(first)!r} for example {missing[0].id}")

    from PIL import Image

    per_example = []
    start = time.time()
    for rec in dataset.records:
        out_file = find_existing_output(outputs_root, rec)
        example = dataset.load(rec)
        with Image.open(rec.mask_path) as im:
            mask_img = im.convert("L")
        try:
            with Image.open(out_file) as im:
                edited = im.convert("RGB")
        except OSError as exc:
            raise ValueError(f"example {rec.id}: edited image {str(out_file)!r} is not a readable image ({exc})") from None
        gt = example.load_ground_truth() if rec.ground_truth_path is not None else None
        metrics = compute_example_metrics(example.source, edited, mask_img, gt, [rec.caption], size=eval_size,
                                          clip=clip_enc, lpips=lpips_fn, device=dev)
        values = {k: metrics.get(k) for k in METRICS}
        values = {k: (None if v is None or math.isnan(v) else v) for k, v in values.items()}  # JSON has no NaN
        per_example.append({"id": rec.id, "task": rec.task, "output": str(out_file), **values})
    log(f"scored {len(per_example)} example(s) in {time.time() - start:.1f} s")

    per_task = {}
    for task in dataset.tasks:
        rows = [r for r in per_example if r["task"] == task]
        per_task[task] = {"count": len(rows), **{m: _mean([r[m] for r in rows]) for m in METRICS}}
    average = {"count": len(per_example), "tasks": len(per_task)}
    for m in METRICS:
        vals = [per_task[t][m] for t in per_task if per_task[t][m] is not None]
        average[m] = float(np.mean(vals)) if vals and len(vals) == len(per_task) else None
    results = {
        "benchmark": "CompBench local editing",
        "metrics": list(METRICS),
        "higher_is_better": HIGHER_IS_BETTER,
        "per_task": per_task,
        "average": average,
        "unavailable": unavailable,
        "settings": {"data": str(dataset.root), "tasks": list(dataset.tasks), "limit_per_task": limit,
                     "eval_size": eval_size, "psnr_cap_db": PSNR_CAP_DB,
                     "clip_model": None if clip_enc is None else getattr(clip_enc, "name", str(clip_model)),
                     "lpips": lpips_kind or None, "outputs": str(outputs_root), **{"generation": generation}},
        "examples": per_example,
    }
    write_results(results, output_dir)
    log(f"wrote {output_dir / 'results.json'} and {output_dir / 'results.md'}")
    return results


def _check_generation_record(path: Path, generation: dict) -> None:
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    keys = ("model", "lora", "steps", "guidance_scale", "resolution", "seed")
    diff = [k for k in keys if previous.get(k) != generation.get(k)]
    if diff:
        details = ", ".join(f"{k}: {previous.get(k)!r} → {generation.get(k)!r}" for k in diff)
        raise ValueError(f"{str(path.parent)!r} holds edits generated with other settings ({details}); "
                         "use a new --output-dir (or delete its outputs/ and generation.json)")


def _load_pipeline(model: str | None, tiny: bool, device):
    from ..flux.pipeline import load_pipeline

    if tiny:
        pipe, _ = load_pipeline(None, device=str(device))
        return pipe
    local = Path(str(model)).expanduser()
    if not local.exists():
        from huggingface_hub import try_to_load_from_cache

        from ..io.hub import hub_reachable

        cached = try_to_load_from_cache(str(model), "model_index.json")
        if not isinstance(cached, str):
            reachable, why = hub_reachable()
            if not reachable:
                raise WeightsUnavailableError(
                    f"--model {model!r} is not a local path, not in the local Hugging Face cache, and cannot be "
                    f"downloaded: {why}; download it elsewhere and pass its local path")
    pipe, _ = load_pipeline(str(model), device=str(device))
    return pipe


__all__ = ["TINY_RESOLUTION", "evaluate"]
