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

import argparse
import json
import math
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .compbench import TASKS, CompBenchDataset, CompBenchRecord
from .rewards import (DEFAULT_CLIP_MODEL, PSNR_CAP_DB, ClipEncoder, WeightsUnavailableError, background_psnr,
                      background_ssim, masked_background)

METRICS = ("LC-I", "LC-T", "PSNR", "SSIM", "LPIPS")
HIGHER_IS_BETTER = {"LC-I": True, "LC-T": True, "PSNR": True, "SSIM": True, "LPIPS": False}
EVAL_SIZE = 512
TINY_RESOLUTION = 32

__all__ = [
    "EVAL_SIZE",
    "METRICS",
    "SqueezeLPIPS",
    "add_eval_arguments",
    "compute_example_metrics",
    "evaluate",
    "format_markdown",
    "generate_edits",
    "load_lpips_weights",
    "official_crop_box",
    "run_eval",
]


# ----------------------------------------------------------------------------------------------------
# LPIPS (SqueezeNet) without torchvision


class _Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def _squeezenet11_features() -> list[nn.Module]:
    """torchvision's `squeezenet1_1().features`, layer for layer (same indices, same parameter names)."""
    return [
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _Fire(256, 48, 192, 192), _Fire(384, 48, 192, 192),
        _Fire(384, 64, 256, 256), _Fire(512, 64, 256, 256),
    ]


class _SqueezeSlices(nn.Module):
    SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13))

    def __init__(self):
        super().__init__()
        layers = _squeezenet11_features()
        slices = []
        for start, stop in self.SLICES:
            seq = nn.Sequential()
            for i in range(start, stop):
                seq.add_module(str(i), layers[i])
            slices.append(seq)
        self.slices = nn.ModuleList(slices)

    def forward(self, x) -> list[torch.Tensor]:
        outs = []
        for s in self.slices:
            x = s(x)
            outs.append(x)
        return outs


class _NetLin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.model(x)


class SqueezeLPIPS(nn.Module):
    """LPIPS with the SqueezeNet-1.1 backbone, the network of torchmetrics'
    `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")` with the same state-dict keys
    (`net.slices.*`, `lin0..lin6.model.1.weight`), built without torchvision. `forward(a, b)` takes
    `[B, 3, H, W]` images in [−1, 1] and returns `[B]` distances. Weights come from `load_lpips_weights`
    (safetensors); a freshly constructed module is random (for tests)."""

    CHANNELS = (64, 128, 256, 384, 384, 512, 512)

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.net = _SqueezeSlices()
        for i, ch in enumerate(self.CHANNELS):
            self.add_module(f"lin{i}", _NetLin(ch))
        self.eval()
        self.requires_grad_(False)

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        feats0 = self.net((in0 - self.shift) / self.scale)
        feats1 = self.net((in1 - self.shift) / self.scale)
        total = 0.0
        for i, (f0, f1) in enumerate(zip(feats0, feats1)):
            n0 = f0 / torch.sqrt(1e-8 + (f0**2).sum(dim=1, keepdim=True))
            n1 = f1 / torch.sqrt(1e-8 + (f1**2).sum(dim=1, keepdim=True))
            total = total + getattr(self, f"lin{i}")((n0 - n1) ** 2).mean(dim=(2, 3), keepdim=True)
        return total.reshape(in0.shape[0])


def load_lpips_weights(path) -> SqueezeLPIPS:
    """A `SqueezeLPIPS` with weights from a safetensors file (ValueError naming the file otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--lpips-weights: no such file {str(path)!r}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--lpips-weights: {str(path)!r} is not a valid safetensors file ({exc})") from None
    net = SqueezeLPIPS()
    expected = set(net.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"--lpips-weights: {str(path)!r} is not an LPIPS-squeeze state dict "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}); export it as the module docstring of rcgrpo.evaluation shows"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--lpips-weights: {str(path)!r} has tensors of the wrong shape ({str(exc).splitlines()[-1]})") from None
    return net.eval()


def _torchmetrics_lpips(device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="squeeze", reduction="mean").to(device)
    net = metric.net

    def lpips(a, b):
        return net(a, b).reshape(a.shape[0])

    return lpips


# ----------------------------------------------------------------------------------------------------
# Per-example metrics


def official_crop_box(mask_img) -> tuple[int, int, int, int] | None:
    """`(left, top, right, bottom)` = (min x, min y, max x, max y) of the mask pixels > 0, the box that
    CompBench's `eval_all.py` passes to `PIL.Image.crop` (whose right/bottom are exclusive). None when the
    mask is empty."""
    arr = np.asarray(mask_img)
    ys, xs = np.where(arr > 0)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _pil_to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@torch.no_grad()
def compute_example_metrics(source, edited, mask, ground_truth, captions: Sequence[str], *, size: int = EVAL_SIZE,
                            clip: ClipEncoder | None = None, lpips: Callable | None = None,
                            device=None, psnr_cap_db: float = PSNR_CAP_DB) -> dict[str, float]:
    """The CompBench metrics of one example from PIL images (see the module docstring).

    Metrics whose model is None (clip, lpips) are left out; LC-I is NaN without a ground truth.
    """
    from PIL import Image

    device = torch.device(device) if device is not None else torch.device("cpu")
    src = source.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    out = edited.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    msk = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
    gt = ground_truth.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) if ground_truth is not None else None

    mask_t = torch.from_numpy(np.asarray(msk, dtype=np.float32) / 255.0)[None, None].to(device)
    src_t = _pil_to_tensor(src)[None].to(device)
    out_t = _pil_to_tensor(out)[None].to(device)
    result: dict[str, float] = {
        "PSNR": float(background_psnr(out_t, src_t, mask_t, cap_db=psnr_cap_db)[0]),
        "SSIM": float(background_ssim(out_t, src_t, mask_t)[0]),
    }
    if lpips is not None:
        bg_src, bg_out = masked_background(src_t, mask_t), masked_background(out_t, mask_t)
        result["LPIPS"] = float(lpips(bg_out * 2 - 1, bg_src * 2 - 1).reshape(-1)[0])
    if clip is not None:
        box = official_crop_box(msk)
        if box is not None and box[2] > box[0] and box[3] > box[1]:
            crop = _pil_to_tensor(out.crop(box))
            captions = [c for c in captions if c] or [" "]
            img_emb = clip.image_embeddings([crop])
            txt_emb = clip.text_embeddings(list(captions))
            result["LC-T"] = float((100.0 * (img_emb * txt_emb).sum(-1)).clamp_min(0.0).mean())
            if gt is not None:
                emb = clip.image_embeddings([crop, _pil_to_tensor(gt.crop(box))])
                result["LC-I"] = float((emb[0] * emb[1]).sum())
            else:
                result["LC-I"] = float("nan")
        else:
            result["LC-T"] = 0.0
            result["LC-I"] = 0.0
    return result


# ----------------------------------------------------------------------------------------------------
# Generation


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_save_png(img, path: Path) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


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


# ----------------------------------------------------------------------------------------------------
# The evaluation


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
        return _torchmetrics_lpips(device), None, "squeeze (torchmetrics)"
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
    from .pipeline import default_device

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
                from .pipeline import load_lora

                load_lora(pipeline, lora)
            _atomic_write_bytes(output_dir / "generation.json", json.dumps(generation, indent=2).encode("utf-8"))
            from .testing import TINY_TEXT_LEN

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
    from .pipeline import load_pipeline

    if tiny:
        pipe, _ = load_pipeline(None, device=str(device))
        return pipe
    local = Path(str(model)).expanduser()
    if not local.exists():
        from huggingface_hub import try_to_load_from_cache

        from .rewards import _hub_reachable

        cached = try_to_load_from_cache(str(model), "model_index.json")
        if not isinstance(cached, str):
            reachable, why = _hub_reachable()
            if not reachable:
                raise WeightsUnavailableError(
                    f"--model {model!r} is not a local path, not in the local Hugging Face cache, and cannot be "
                    f"downloaded: {why}; download it elsewhere and pass its local path")
    pipe, _ = load_pipeline(str(model), device=str(device))
    return pipe


# ----------------------------------------------------------------------------------------------------
# Output


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    digits = 2 if metric in ("LC-T", "PSNR") else 3
    if round(value, digits) == 0:
        value = 0.0  # no "-0.000"
    return f"{value:.{digits}f}"


def format_markdown(results: dict) -> str:
    """The results as a Markdown table in the layout of the paper's Table 1."""
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in METRICS}
    lines = ["# CompBench evaluation", ""]
    gen = results.get("settings", {}).get("generation", {})
    if gen.get("mode") == "generated":
        lines.append(f"Edits: model `{gen.get('model')}`" + (f" + LoRA `{gen['lora']}`" if gen.get("lora") else "")
                     + f", {gen.get('steps')} steps, guidance {gen.get('guidance_scale')}, seed {gen.get('seed')}"
                     + (f", {gen['resolution']} px" if gen.get("resolution") else "") + ".")
    elif gen:
        lines.append(f"Edits: existing outputs in `{gen.get('outputs')}`.")
    settings = results.get("settings", {})
    lines.append(f"Metrics at {settings.get('eval_size', EVAL_SIZE)} px; background metrics with the edit region "
                 f"zeroed; PSNR capped at {settings.get('psnr_cap_db', PSNR_CAP_DB):g} dB.")
    lines.append("")
    lines.append("| Task | N | " + " | ".join(f"{m} {arrows[m]}" for m in METRICS) + " |")
    lines.append("|---|---:|" + "---:|" * len(METRICS))
    for task, row in results["per_task"].items():
        lines.append(f"| {task.capitalize()} | {row['count']} | " + " | ".join(_fmt(m, row[m]) for m in METRICS) + " |")
    avg = results["average"]
    lines.append(f"| **Average** | {avg['count']} | " + " | ".join(_fmt(m, avg[m]) for m in METRICS) + " |")
    if results.get("unavailable"):
        lines.append("")
        lines.append("Unavailable metrics (n/a):")
        for metric, reason in results["unavailable"].items():
            lines.append(f"- {metric}: {reason}")
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir) -> None:
    """`results.json` and `results.md` in `output_dir`, each written atomically (temp file + rename)."""
    output_dir = Path(output_dir)
    _atomic_write_bytes(output_dir / "results.json", json.dumps(results, indent=2, allow_nan=False).encode("utf-8"))
    _atomic_write_bytes(output_dir / "results.md", format_markdown(results).encode("utf-8"))


# ----------------------------------------------------------------------------------------------------
# Command line


def _tasks_arg(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise argparse.ArgumentTypeError(f"--tasks: expected a comma-separated subset of {','.join(TASKS)}, got {text!r}")
    return tasks


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rcgrpo eval` options."""
    parser.add_argument("--data", required=True, help="CompBench directory (holding tasks/<task>/metadata.json)")
    parser.add_argument("--output-dir", required=True, help="where outputs/, results.json and results.md go")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="FluxKontextPipeline hub id or local path to generate edits with")
    src.add_argument("--tiny", action="store_true", help="generate with the tiny offline test pipeline")
    parser.add_argument("--lora", default=None, help="diffusers-format LoRA (directory with pytorch_lora_weights.safetensors)")
    parser.add_argument("--outputs", default=None, help="score existing edits at DIR/<task>/<image_path> instead of generating")
    parser.add_argument("--tasks", type=_tasks_arg, default=None, help="comma-separated tasks (default add,remove,replace)")
    parser.add_argument("--steps", type=_positive_int, default=28, help="sampling steps (default 28)")
    parser.add_argument("--guidance-scale", type=float, default=2.5, help="Kontext guidance (default 2.5)")
    parser.add_argument("--resolution", type=_positive_int, default=None,
                        help=f"edit at N×N px (default: the pipeline's choice; {TINY_RESOLUTION} with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (per example: seed and example id)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="at most N examples per task")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help=f"CLIP hub id or local path (default {DEFAULT_CLIP_MODEL})")
    parser.add_argument("--lpips-weights", default=None, help="LPIPS-squeeze weights (.safetensors; see rcgrpo.evaluation)")
    parser.add_argument("--eval-size", type=_positive_int, default=EVAL_SIZE, help=f"metric resolution (default {EVAL_SIZE}, as CompBench)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--strict", action="store_true", help="fail when CLIP or LPIPS weights are unavailable")


def run_eval(args) -> int:
    """Run `rcgrpo eval` from parsed arguments; prints the Markdown table. Returns 0.

    Bad input (missing files, bad metadata, bad options) raises ValueError / FileNotFoundError (exit 2 in
    the CLI); failures while running raise other exceptions (exit 1).
    """
    results = evaluate(args.data, args.output_dir, model=args.model, tiny=args.tiny, lora=args.lora,
                       outputs_dir=args.outputs, tasks=args.tasks, steps=args.steps,
                       guidance_scale=args.guidance_scale, resolution=args.resolution, seed=args.seed,
                       limit=args.limit, clip_model=args.clip_model, lpips_weights=args.lpips_weights,
                       strict=args.strict, eval_size=args.eval_size, device=args.device)
    print(format_markdown(results), end="")
    return 0
