"""`results.json` and `results.md` of `rcgrpo eval`: the paper's Table 1 layout."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..io.files import atomic_write_text
from ..rewards.background import PSNR_CAP_DB
from .metrics import EVAL_SIZE, HIGHER_IS_BETTER, METRICS


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
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2, allow_nan=False))
    atomic_write_text(output_dir / "results.md", format_markdown(results))


__all__ = ["format_markdown", "write_results"]
