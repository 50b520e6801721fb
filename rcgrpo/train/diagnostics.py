"""Training diagnostics: the paper's Fig. 5 (ECDFs of background drift and of within-group reward std,
several runs side by side) and ACD heatmaps, from training logs.

A training log is a `metrics.jsonl` file (one JSON object per step). Per step it may hold
- `background_drift_values`: list of floats, per perturbed candidate the mean squared latent difference
  to the reference candidate outside the mask (falls back to the scalar `background_drift`);
- `reward_std_within_group_values`: list of floats, one per group (falls back to the scalar
  `reward_std_within_group`).

    rcgrpo diagnostics --run global=runs/global --run rdp=runs/rdp --output fig5.png

A run is a metrics.jsonl file or a directory holding one; several files for one label are pooled.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..io.files import atomic_file

DRIFT_KEY = "background_drift"
STD_KEY = "reward_std_within_group"

__all__ = ["ecdf", "load_run_diagnostics", "plot_acd_heatmaps", "plot_fig5"]


def _metrics_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {str(path)!r} (expected a metrics.jsonl file or a run directory)")
    return path


def _values(record: dict, key: str, file: Path, line: int) -> list[float]:
    raw = record.get(f"{key}_values")
    if raw is None:
        raw = record.get(key)
        if raw is None:
            return []
        raw = [raw]
    if not isinstance(raw, list):
        raise ValueError(f"{file}:{line}: '{key}_values' must be a list of numbers, got {type(raw).__name__}")
    out = []
    for v in raw:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{file}:{line}: '{key}_values' holds a non-number {v!r}")
        if math.isfinite(float(v)):
            out.append(float(v))
    return out


def load_run_diagnostics(paths) -> dict[str, np.ndarray]:
    """`{"background_drift": array, "reward_std_within_group": array}` pooled over one or more
    metrics.jsonl files (or run directories). Blank lines are skipped; a bad line is a ValueError naming
    the file and line; non-finite values are dropped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    drift: list[float] = []
    std: list[float] = []
    for p in paths:
        file = _metrics_file(p)
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{file}:{lineno}: not a JSON object ({exc})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{file}:{lineno}: expected a JSON object per line")
                drift.extend(_values(record, DRIFT_KEY, file, lineno))
                std.extend(_values(record, STD_KEY, file, lineno))
    return {DRIFT_KEY: np.asarray(drift, dtype=np.float64), STD_KEY: np.asarray(std, dtype=np.float64)}


def ecdf(values) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF: sorted values x and F(x_i) = i / n, i = 1..n."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    y = np.arange(1, x.size + 1, dtype=np.float64) / max(x.size, 1)
    return x, y


def _atomic_savefig(fig, path: Path, dpi: int) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")


def plot_fig5(runs: Mapping[str, object], output, *, log_drift: bool = True, dpi: int = 120) -> dict:
    """Fig. 5: ECDF of background drift (left) and of within-group reward std (right), one curve per run.

    `runs`: `{label: metrics.jsonl path, run dir, or a list of them}` (e.g. {"global": ..., "rdp": ...}).
    Writes a PNG to `output`; returns per-run summary statistics (count, median, mean per quantity).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("plot_fig5: give at least one run")
    data = {label: load_run_diagnostics(paths) for label, paths in runs.items()}
    if all(d[DRIFT_KEY].size == 0 and d[STD_KEY].size == 0 for d in data.values()):
        raise ValueError(f"plot_fig5: no '{DRIFT_KEY}' or '{STD_KEY}' values in the logs of {', '.join(runs)}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    titles = {DRIFT_KEY: "background drift (outside the mask)", STD_KEY: "within-group reward std"}
    summary: dict[str, dict] = {}
    for ax, key in zip(axes, (DRIFT_KEY, STD_KEY)):
        for label, d in data.items():
            vals = d[key]
            summary.setdefault(label, {})[key] = {
                "count": int(vals.size),
                "median": float(np.median(vals)) if vals.size else None,
                "mean": float(vals.mean()) if vals.size else None,
            }
            if vals.size == 0:
                continue
            x, y = ecdf(vals)
            ax.step(x, y, where="post", label=f"{label} (n={vals.size})")
        if key == DRIFT_KEY and log_drift and any((d[key] > 0).any() for d in data.values() if d[key].size):
            ax.set_xscale("log")
        ax.set_title(titles[key])
        ax.set_xlabel(key)
        ax.set_ylabel("ECDF")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.tight_layout()
    _atomic_savefig(fig, Path(output), dpi)
    plt.close(fig)
    return summary


def plot_acd_heatmaps(mass, grid: tuple[int, int], output, *, token_mask=None, image=None,
                      titles: Sequence[str] | None = None, dpi: int = 120) -> None:
    """ACD heatmaps: the text-to-image attention mass `a(u)` (SPEC §7) on the token grid.

    `mass`: `[image_len]`, `[calls, image_len]` (each call a panel) or `[calls, B, image_len]` (first
    example); `grid`: `(rows, cols)` with rows·cols = image_len. `token_mask` (`[image_len]`) is drawn as
    a contour, `image` (`[3, H, W]` in [0, 1] or PIL) as the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = torch.as_tensor(mass).detach().float().cpu()
    if mass.dim() == 3:
        mass = mass[:, 0]
    if mass.dim() == 1:
        mass = mass[None]
    rows, cols = grid
    if mass.dim() != 2 or mass.shape[1] != rows * cols:
        raise ValueError(f"plot_acd_heatmaps: mass of shape {tuple(mass.shape)} does not fit the {rows}x{cols} token grid")
    panels = mass.shape[0] + (1 if image is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3), squeeze=False)
    axes = axes[0]
    k = 0
    if image is not None:
        if isinstance(image, torch.Tensor):
            image = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        axes[0].imshow(image)
        axes[0].set_title("image")
        axes[0].axis("off")
        k = 1
    tm = None if token_mask is None else torch.as_tensor(token_mask).float().reshape(rows, cols).numpy()
    for i in range(mass.shape[0]):
        ax = axes[k + i]
        im = ax.imshow(mass[i].reshape(rows, cols).numpy(), cmap="magma")
        if tm is not None and 0 < tm.max() and tm.min() < 1:
            ax.contour(tm, levels=[0.5], colors="cyan", linewidths=1)
        ax.set_title(titles[i] if titles and i < len(titles) else f"call {i}")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    _atomic_savefig(fig, Path(output), dpi)
    plt.close(fig)
