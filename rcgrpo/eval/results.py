"""Aggregation and the files of `rcgrpo eval`: `results.json` and `results.md` (the paper's Table 1 layout).

The aggregation is the official script's: per task the mean over its scored examples (NaN values, i.e.
LC-I without a ground truth, left out), and the average row is the macro average over tasks (the mean
of the task means, its "Local Editing" row), not the mean over all examples. The official script prints
3 decimals; `official_rounding` gives its numbers in both of its modes: the default one rounds the task
means, `--resume` rounds every image's metrics to 3 decimals first (its per-image CSV) and averages
those.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io.files import atomic_write_text
from ..rewards.background import PSNR_CAP_DB
from .metrics import EVAL_SIZE, HIGHER_IS_BETTER, METRICS


def _values(rows, metric) -> list[float]:
    return [r[metric] for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _round3(value: float | None) -> float | None:
    return None if value is None else float(np.round(value, 3))


def aggregate(examples: list[dict], tasks: Sequence[str]) -> tuple[dict, dict]:
    """(per_task, average): `{task: {"count", metric: mean}}` and the macro average over tasks."""
    per_task = {}
    for task in tasks:
        rows = [r for r in examples if r["task"] == task]
        per_task[task] = {"count": len(rows), **{m: _mean(_values(rows, m)) for m in METRICS}}
    average = {"count": len(examples), "tasks": len(per_task)}
    for m in METRICS:
        average[m] = _mean([row[m] for row in per_task.values() if row[m] is not None])
    return per_task, average


def official_rounding(examples: list[dict], tasks: Sequence[str]) -> dict:
    """The official script's printed numbers: `{"default": {...}, "resume": {...}}`, each with `per_task`
    and `average` rounded to 3 decimals as that mode rounds them."""
    out = {}
    for mode in ("default", "resume"):
        per_task = {}
        for task in tasks:
            rows = [r for r in examples if r["task"] == task]
            row = {}
            for m in METRICS:
                vals = _values(rows, m)
                if mode == "resume":
                    vals = [round(v, 3) for v in vals]
                row[m] = _round3(_mean(vals))
            per_task[task] = row
        average = {m: _round3(_mean([r[m] for r in per_task.values() if r[m] is not None])) for m in METRICS}
        out[mode] = {"per_task": per_task, "average": average}
    return out


def conventions(settings: dict) -> list[str]:
    """The official conventions these numbers follow (and where they depart), one line each."""
    size = settings.get("eval_size", EVAL_SIZE)
    cap = settings.get("psnr_cap_db", PSNR_CAP_DB)
    capped = settings.get("psnr_capped", 0)
    return [
        f"Sizes: source, edit, mask and ground truth are each resized to {size}×{size} on their own (PIL bicubic, "
        "the mask nearest), as CompBench's eval_all.py does; their sizes need not agree.",
        "Background metrics: both images times (1 − mask/255); PSNR (data range 1) and SSIM (torchmetrics, 11×11 "
        "Gaussian, σ 1.5) and LPIPS (SqueezeNet, inputs 2x − 1) of the edit against the source.",
        f"PSNR cap: identical backgrounds have PSNR +inf, which the official script keeps (a task mean with one "
        f"such example is inf); here they count as {cap:g} dB ({capped} example(s) capped).",
        "Edit region: the box (min x, min y, max x, max y) of the resized mask > 0 given to PIL's crop (last row "
        "and column left out); no box (empty or 1-pixel masks) gives LC-T = LC-I = 0.",
        "CLIP: crops preprocessed as transformers 4's PIL CLIPImageProcessor (8-bit crop, PIL bicubic, short side S "
        "and long side int(S·long/short), S = 224 for ViT-L/14, center crop); LC-T = torchmetrics' CLIPScore, max(100·cos, 0), captions tokenized without truncation and "
        "sliced to 77 tokens (the end-of-text token is lost beyond that), \" \" when there is no caption; LC-I = "
        "cosine of the edit's and the ground truth's crop features (n/a without a ground truth).",
        "Average: the macro average over tasks (mean of the task means, the official \"Local Editing\" row), not "
        "the mean over examples.",
        "Rounding: the numbers above are unrounded means. The official script prints 3 decimals: by default it "
        "rounds the task means; with --resume it rounds every image's metrics to 3 decimals first and averages "
        "those (see the table below).",
        "Skipped examples: the official script skips an example whose source, mask or edit is missing or "
        "unreadable without saying so; they are counted and listed below (--fail-on-skipped makes them an error).",
    ]


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    digits = 2 if metric in ("LC-T", "PSNR") else 3
    if round(value, digits) == 0:
        value = 0.0  # no "-0.000"
    return f"{value:.{digits}f}"


def _fmt3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_markdown(results: dict) -> str:
    """The results as Markdown: the paper's Table 1 layout, the conventions, the official rounding,
    the skipped examples and notes."""
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in METRICS}
    lines = ["# CompBench evaluation", ""]
    settings = results.get("settings", {})
    gen = settings.get("generation", {})
    if gen.get("mode") == "generated":
        lines.append(f"Edits: model `{gen.get('model')}`" + (f" + LoRA `{gen['lora']}`" if gen.get("lora") else "")
                     + f", {gen.get('steps')} steps, guidance {gen.get('guidance_scale')}, seed {gen.get('seed')}, "
                     + f"{gen.get('height')}×{gen.get('width')} px; {gen.get('generated', 0)} generated, "
                     + f"{gen.get('regenerated_stale', 0)} regenerated (stale), {gen.get('reused', 0)} reused.")
    elif gen:
        lines.append(f"Edits: existing outputs in `{gen.get('outputs')}`.")
    lines.append(f"Metrics as CompBench's official eval_all.py computes them, at {settings.get('eval_size', EVAL_SIZE)} px.")
    lines.append("")
    lines.append("| Task | N | " + " | ".join(f"{m} {arrows[m]}" for m in METRICS) + " |")
    lines.append("|---|---:|" + "---:|" * len(METRICS))
    for task, row in results["per_task"].items():
        lines.append(f"| {task.capitalize()} | {row['count']} | " + " | ".join(_fmt(m, row[m]) for m in METRICS) + " |")
    avg = results["average"]
    lines.append(f"| **Average** | {avg['count']} | " + " | ".join(_fmt(m, avg[m]) for m in METRICS) + " |")
    if results.get("unavailable"):
        lines += ["", "Unavailable metrics (n/a):"]
        lines += [f"- {metric}: {reason}" for metric, reason in results["unavailable"].items()]
    lines += ["", "## Conventions", ""]
    lines += [f"- {c}" for c in results.get("conventions", [])]
    rounding = results.get("official_rounding")
    if rounding:
        lines += ["", "As the official script prints them (3 decimals):", "",
                  "| Mode | Task | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
        for mode, label in (("default", "default"), ("resume", "--resume")):
            block = rounding[mode]
            for task, row in block["per_task"].items():
                lines.append(f"| {label} | {task.capitalize()} | " + " | ".join(_fmt3(row[m]) for m in METRICS) + " |")
            lines.append(f"| {label} | **Average** | " + " | ".join(_fmt3(block['average'][m]) for m in METRICS) + " |")
    skipped = results.get("skipped", [])
    total = results.get("average", {}).get("count", 0) + len(skipped)
    lines += ["", "## Skipped examples", ""]
    if skipped:
        lines.append(f"{len(skipped)} of {total} example(s) skipped (not scored, not in the means):")
        lines += [f"- `{s['id']}`: {s['reason']}" for s in skipped]
    else:
        lines.append(f"None: all {total} example(s) scored.")
    notes = results.get("notes", [])
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- `{n['id']}`: {n['note']}" for n in notes]
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir) -> None:
    """`results.json` and `results.md` in `output_dir`, each written atomically (temp file + rename)."""
    output_dir = Path(output_dir)
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2, allow_nan=False))
    atomic_write_text(output_dir / "results.md", format_markdown(results))


__all__ = ["aggregate", "conventions", "format_markdown", "official_rounding", "write_results"]
