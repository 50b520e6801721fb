"""The training report: reward curve, before/after edits and ACD heatmaps of held-out examples.

Every figure carries a title and labels: `reward_curve.png` (task reward per step with a moving mean;
ACD and background drift), `before_after.png` (one row per held-out example, columns source / base /
base + LoRA with the rewards under each edit, the edit mask outlined on the source) and `acd_<id>.png`
(`rcgrpo.editors.heatmap.save_acd_figure`: source, attention density with a colour bar, overlay). Small
images are drawn enlarged with nearest-neighbour so their pixels can be read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io.files import atomic_file, atomic_write_text
from ..io.figures import save_labelled_grid


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def plot_reward_curve(metrics: list[dict], path) -> Path | None:
    """PNG of the mean task reward (and ACD) per step."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    reward = [m.get("reward_mean") for m in metrics]
    few = len(reward) <= 20
    axes[0].plot(steps, reward, lw=1, alpha=0.5 if not few else 1.0, marker="o" if few else None, ms=3,
                 label="per step")
    window = max(1, len(reward) // 10)
    if window > 1:
        smooth = [sum(reward[max(0, i - window + 1) : i + 1]) / len(reward[max(0, i - window + 1) : i + 1])
                  for i in range(len(reward))]
        axes[0].plot(steps, smooth, lw=2, label=f"moving mean ({window} steps)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("task reward (group mean)")
    axes[0].set_title("task reward", fontsize=10)
    axes[0].legend(fontsize=8)
    acd = [m.get("acd_mean") for m in metrics]
    if any(a is not None for a in acd):
        axes[1].plot(steps, [a if a is not None else float("nan") for a in acd], color="tab:red", lw=1, label="ACD")
        axes[1].set_ylabel("ACD (mean)", color="tab:red")
    drift = [m.get("background_drift") for m in metrics]
    ax2 = axes[1].twinx()
    ax2.plot(steps, [d if d is not None else float("nan") for d in drift], color="tab:gray", lw=1)
    ax2.set_ylabel("background drift (latent MSE)", color="tab:gray")
    axes[1].set_xlabel("step")
    axes[1].set_title("ACD (red) and background drift (gray)", fontsize=10)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"RC-GRPO training: {len(metrics)} logged steps (last step {steps[-1]})", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


@torch.no_grad()
def write_training_report(trainer, *, before: float | None, after: float | None, seconds: float,
                          max_examples: int = 4) -> Path:
    """`output_dir/report/`: reward_curve.png, before_after.png, acd_*.png and report.md."""
    out = trainer.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(trainer.output_dir / "metrics.jsonl")
    plot_reward_curve(metrics, out / "reward_curve.png")
    dataset = trainer.eval_dataset if trainer.eval_dataset is not None and len(trainer.eval_dataset) else trainer.train_dataset
    tiles, masks, rows = [], [], []
    for index in range(min(max_examples, len(dataset))):
        image, mask, instruction, example_id, _ = trainer.edit_input(dataset[index], index)
        trainer.transformer.disable_adapters()
        try:
            base_img, base_reward = trainer.edit_example(dataset[index], index)
        finally:
            trainer.transformer.enable_adapters()
        with trainer.evaluation_weights():  # the EMA of the LoRA when it is on, as trainer.evaluate
            tuned_img, tuned_reward = trainer.edit_example(dataset[index], index)
        tiles.append([image, base_img, tuned_img])
        masks.append(mask)
        rows.append((example_id, instruction, base_reward, tuned_reward))
        if trainer.recorder is not None:
            save_example_heatmap(trainer, dataset[index], index, out / f"acd_{example_id}.png")
    if tiles:
        save_before_after(tiles, masks, rows, out / "before_after.png", step=trainer.step)
    lines = [
        "# RC-GRPO training report",
        "",
        f"- steps: {trainer.step}, training time: {seconds:.1f} s",
        f"- held-out task reward: before {_fmt(before)}, after {_fmt(after)}",
        f"- config: perturbation={trainer.config.perturbation}, G={trainer.config.group_size}, "
        f"B={trainer.config.num_anchors}, T={trainer.config.num_inference_steps}, w_acd={trainer.config.w_acd}, "
        f"lr={trainer.config.learning_rate}",
        "",
        "![reward curve](reward_curve.png)",
        "",
        "Before/after edits (columns: source, base model, base + LoRA):",
        "",
        "![before and after](before_after.png)",
        "",
        "| example | instruction | reward before | reward after |",
        "|---|---|---|---|",
    ]
    lines += [f"| {eid} | {instr} | {b:.4f} | {a:.4f} |" for eid, instr, b, a in rows]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out


def save_before_after(tiles: list[list[torch.Tensor]], masks: list[torch.Tensor], rows: list[tuple], path, *,
                      step: int | None = None) -> Path:
    """The before/after figure: a row per example (source with its mask outlined, base, base + LoRA), the
    example and instruction on the left, the task reward under each edit."""
    def short(text: str, n: int = 28) -> str:
        return text if len(text) <= n else text[: n - 1] + "…"

    captions = [["", f"reward {b:.4f}", f"reward {a:.4f} ({a - b:+.4f})"] for _, _, b, a in rows]
    labels = [f"{eid}\n{short(instr)}" for eid, instr, _, _ in rows]
    title = "Held-out edits before and after RC-GRPO" + (f" (step {step})" if step is not None else "")
    return save_labelled_grid(tiles, path, column_labels=["source", "base", "base + LoRA"], row_labels=labels,
                              captions=captions, title=title, outlines=[[m, None, None] for m in masks])


def save_example_heatmap(trainer, item, index: int, path) -> None:
    """ACD figure (mean over layers and steps) of the deterministic edit `trainer.edit_example` makes:
    source, attention density with a colour bar, overlay (`rcgrpo.editors.heatmap.save_acd_figure`)."""
    from ..editors.heatmap import save_acd_figure

    image, mask, instruction, example_id, _ = trainer.edit_input(item, index)
    height, width = image.shape[1:]
    token_mask = trainer.editor.token_mask(mask, height, width)
    weights = trainer.acd_text_weights(instruction, image[None].to(trainer.device, trainer.transformer.dtype))
    with trainer.recorder.capture(token_mask.to(trainer.device), text_weights=weights) as cap:
        trainer.edit_example(item, index)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_acd_figure(image, path, cap, mask=mask, title=f"ACD of {example_id}: {instruction!r} (step {trainer.step})")


def upscale_for_display(image: torch.Tensor, min_side: int = 256) -> torch.Tensor:
    """Nearest-neighbour upscale of a small `[C, H, W]` image so a report shows its pixels."""
    factor = max(1, min_side // max(image.shape[-2:]))
    if factor == 1:
        return image
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"
