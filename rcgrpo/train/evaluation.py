"""Evaluation during and after training: the task reward of deterministic edits (one fixed noise per
example), with the raw LoRA or its EMA, sharded over ranks for `eval_every`; sample grids.

    evaluate(trainer, dataset, seed, ema)   mean task reward over a dataset (SPEC §6's task reward)
    periodic_evaluation(trainer)            eval/task_reward (and eval/task_reward_ema), global over ranks
    save_samples(trainer)                   samples/step-N.png (+ an ACD heatmap), also logged as images
"""
from __future__ import annotations

import contextlib

import torch

from .scoring import check_reward


def evaluation_weights(ema, use_ema: bool | None = None):
    """A context with the LoRA weights evaluation uses: the EMA (`rcgrpo.train.ema.LoraEMA`) when `use_ema`
    is True, or None and there is an EMA; the raw weights otherwise."""
    use = ema is not None if use_ema is None else use_ema
    if use and ema is None:
        raise ValueError("no EMA of the LoRA weights: config ema_decay is 0")
    return ema.applied() if use else contextlib.nullcontext()


@torch.no_grad()
def edit_example(trainer, item, index: int, *, seed: int = 12345):
    """(image [3,H,W], task reward) of the edit of one example from the noise `seed + index` draws."""
    edited, sources, masks, instructions, metadata = trainer.rollouts.single(item, index, seed=seed + index)
    total = 0.0
    for name, fn, w in trainer.reward_funcs:
        total += w * float(check_reward(fn(edited, sources, masks, instructions, metadata), 1, name)[0])
    return edited[0].cpu(), total


@torch.no_grad()
def evaluate(trainer, dataset, *, seed: int = 12345, ema: bool | None = None) -> float | None:
    """Mean task reward of the deterministic edits of `dataset` with the weights `evaluation_weights` gives."""
    if dataset is None or len(dataset) == 0:
        return None
    with evaluation_weights(trainer.ema, ema):
        scores = [edit_example(trainer, dataset[i], i, seed=seed)[1] for i in range(len(dataset))]
    return sum(scores) / len(scores)


@torch.no_grad()
def periodic_evaluation(trainer) -> dict:
    """`eval/task_reward` (raw weights) and, with the EMA on, `eval/task_reward_ema` over the evaluation set,
    its examples sharded over ranks and summed (every rank joins the one collective)."""
    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    data = trainer.eval_dataset
    n = len(data)
    keys = [("eval/task_reward", False)] + ([("eval/task_reward_ema", True)] if trainer.ema is not None else [])
    sums = []
    for _, use_ema in keys:
        with evaluation_weights(trainer.ema, use_ema):
            sums.append(sum(edit_example(trainer, data[i], i)[1] for i in range(rank, n, world)))
    totals = trainer.collectives.sum(torch.tensor(sums)).tolist()
    return {key: total / n for (key, _), total in zip(keys, totals)}


def save_samples(trainer) -> None:
    """Rank 0: source | edit of the first four evaluation (else training) examples, and the ACD heatmap of
    the first, under `output_dir/samples/`, also logged to the trackers as images."""
    from ..io.images import image_grid, load_image, save_image
    from .data import as_edit_example, resize_example
    from .report import save_example_heatmap, upscale_for_display

    data = trainer.eval_dataset if trainer.eval_dataset is not None and len(trainer.eval_dataset) \
        else trainer.train_dataset
    tiles = []
    for index in range(min(4, len(data))):
        image, *_ = as_edit_example(data[index], index)
        edited, _ = edit_example(trainer, data[index], index)
        if image.shape[1:] != edited.shape[1:]:
            image, _ = resize_example(image, torch.ones(image.shape[1:]), edited.shape[1])
        tiles += [image, edited]
    out = trainer.output_dir / "samples"
    grid = image_grid([upscale_for_display(t, 128) for t in tiles], columns=2)
    save_image(grid, out / f"step-{trainer.step:06d}.png")
    images = {"samples/edits": _hwc_uint8(grid)}
    if trainer.recorder is not None:
        path = out / f"acd-step-{trainer.step:06d}.png"
        save_example_heatmap(trainer, data[0], 0, path)
        images["samples/acd"] = _hwc_uint8(load_image(path))
    trainer.run_log.log_images(images, trainer.step)


def _hwc_uint8(image: torch.Tensor):
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")


__all__ = ["edit_example", "evaluate", "evaluation_weights", "periodic_evaluation", "save_samples"]
