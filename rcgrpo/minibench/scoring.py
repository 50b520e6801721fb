"""How MiniBench runs are scored: the official CompBench metrics of an editor's edits plus the task reward
of each edit (`evaluate_edits`), and the random-reward control (`RandomReward`)."""
from __future__ import annotations

from pathlib import Path

METRIC_KEYS = ("task_reward", "LC-I", "LC-T", "PSNR", "SSIM", "LPIPS")


class RandomReward:
    """The control's task reward: uniform noise in [0, 1], reproducible from the seed and the call count."""

    name = "random_reward"

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def __call__(self, edited, sources, masks, instructions, metadata):
        import torch

        self.calls += 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        return torch.rand(edited.shape[0], generator=gen)


def _task_rewards(results: dict, data_dir: Path) -> dict[str, float]:
    """The MiniBench reward of every evaluated edit, from its spec in the CompBench metadata."""
    import numpy as np
    import torch
    from PIL import Image

    from ..eval.compbench import CompBenchDataset
    from ..io.images import load_image, load_mask
    from .reward import minibench_reward

    dataset = CompBenchDataset(data_dir, require_ground_truth=False)
    records = {r.id: r for r in dataset.records}
    scores = {}
    for row in results["examples"]:
        rec = records[row["id"]]
        source = load_image(rec.source_path)
        mask = load_mask(rec.mask_path)
        with Image.open(row["output"]) as im:
            edited = im.convert("RGB").resize((source.shape[2], source.shape[1]), Image.Resampling.BICUBIC)
        edited = torch.from_numpy(np.asarray(edited, dtype=np.float32) / 255.0).permute(2, 0, 1)
        meta = {"minibench": rec.extra["minibench"], "id": rec.id, "task": rec.task}
        value = minibench_reward(edited[None], source[None], mask[None, None], [rec.instruction], [meta])
        scores[rec.id] = float(value[0])
    return scores


def evaluate_edits(editor, spec, data_dir: Path, out_dir: Path) -> dict:
    """The official CompBench metrics of `editor`'s edits of the evaluation set, plus each edit's task reward."""
    from ..eval.evaluate import evaluate

    defaults = editor.defaults
    results = evaluate(data_dir, out_dir, pipeline=editor, steps=defaults.num_inference_steps,
                       guidance_scale=defaults.guidance_scale, resolution=defaults.resolution,
                       max_sequence_length=defaults.max_sequence_length, seed=spec.eval_seed,
                       clip_model=spec.clip_model, eval_size=spec.eval_size, device="cpu", log=None,
                       model_defaults=defaults)
    rewards = _task_rewards(results, data_dir)
    averages = {m: results["average"].get(m) for m in METRIC_KEYS if m != "task_reward"}
    averages["task_reward"] = sum(rewards.values()) / len(rewards)
    return {"metrics": averages, "per_task": results["per_task"], "task_reward_per_example": rewards,
            "examples": len(rewards), "unavailable": results.get("unavailable", {})}


__all__ = ["METRIC_KEYS", "RandomReward", "evaluate_edits"]
