"""Saving and restoring a trainer's state: checkpoints (complete or absent), resumes, the final LoRA.

    save_checkpoint(trainer)            rank 0 writes output_dir/checkpoint-<step>/ (the others wait)
    load_checkpoint(trainer, path)      LoRA, EMA, optimizer, scheduler, RNG, counters; {field: (saved, new)}
    save_lora(trainer, directory, ema)  the LoRA (or its EMA) in the editor family's diffusers format

A resume refuses a change of the model or of the LoRA's shape (`RESUME_FIXED`) and applies every other
change of the config, the learning rate, betas and weight decay included.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoints import prune_checkpoints, read_checkpoint, set_rng_state, write_checkpoint, write_lora
from .config import resume_changes
from .evaluation import evaluation_weights
from .lora import lora_state_dict
from .metrics import MovingAverage
from .tracking import config_for_saving


def save_lora(trainer, directory, *, ema: bool = False) -> Path:
    """`directory/pytorch_lora_weights.safetensors` (atomically) by the editor's `save_lora`: the LoRA, or
    its EMA with `ema=True`."""
    with evaluation_weights(trainer.ema, ema):
        state = {k: v.clone() for k, v in lora_state_dict(trainer.transformer).items()}  # the swapped-in weights
    return write_lora(directory, state, save=trainer.editor.save_lora)


def save_checkpoint(trainer) -> Path | None:
    """Write `output_dir/checkpoint-<step>/` completely or not at all (rank 0); keep the last N."""
    trainer.accelerator.wait_for_everyone()
    final = None
    if trainer.accelerator.is_main_process:
        state = {"step": trainer.step, "nonfinite_in_row": trainer.nonfinite_in_row,
                 "skipped_groups": trainer.total_skipped[0], "skipped_examples": trainer.total_skipped[1],
                 "reward_ema": trainer.reward_ema.state_dict(), "config": config_for_saving(trainer.config)}
        final = write_checkpoint(trainer.output_dir, trainer.step, lora_state=lora_state_dict(trainer.transformer),
                                 optimizer_state=trainer.optimizer.state_dict(),
                                 scheduler_state=trainer.lr_scheduler.state_dict(), trainer_state=state,
                                 ema_state=trainer.ema.state_dict() if trainer.ema is not None else None)
        prune_checkpoints(trainer.output_dir, trainer.config.keep_checkpoints)
    trainer.accelerator.wait_for_everyone()
    return final


def load_checkpoint(trainer, path) -> dict:
    """Restore LoRA, EMA, optimizer, scheduler, RNG, step and counters from a complete checkpoint
    directory; returns the config changes applied ({field: (saved, new)})."""
    from peft.utils import set_peft_model_state_dict

    ckpt = read_checkpoint(path)
    fixed, changed = resume_changes(ckpt.state.get("config", {}), trainer.config)
    if fixed:
        what = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in fixed.items())
        raise ValueError(f"--resume {str(ckpt.path)!r}: the checkpoint was trained with other settings that a "
                         f"resume cannot change ({what}); start a new run instead")
    result = set_peft_model_state_dict(trainer.transformer, ckpt.lora, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {str(ckpt.path)!r} has LoRA keys this model lacks: {unexpected[:4]}")
    for p in trainer.lora_parameters:
        p.data = p.data.float()
    if trainer.ema is not None:
        if ckpt.ema is None:  # EMA switched on at resume: it starts at the checkpoint's weights
            trainer.ema.reset()
        else:
            trainer.ema.load_state_dict(ckpt.ema["tensors"], ckpt.ema["updates"], source=f"checkpoint {str(ckpt.path)!r}")
    trainer.optimizer.load_state_dict(ckpt.optimizer)
    trainer.lr_scheduler.load_state_dict(ckpt.scheduler)
    apply_optimizer_config(trainer.optimizer, trainer.lr_scheduler, trainer.config)
    set_rng_state(ckpt.rng)
    trainer.step = int(ckpt.state["step"])
    trainer.nonfinite_in_row = int(ckpt.state.get("nonfinite_in_row", 0))
    trainer.total_skipped = [int(ckpt.state.get("skipped_groups", 0)), int(ckpt.state.get("skipped_examples", 0))]
    trainer.reward_ema = MovingAverage(**ckpt.state.get("reward_ema", {}))
    return changed


def apply_optimizer_config(optimizer, scheduler, config) -> None:
    """After loading optimizer and scheduler states, use `config`'s learning rate, betas and weight decay
    (a saved optimizer state carries the old ones)."""
    scheduler.base_lrs = [config.learning_rate for _ in optimizer.param_groups]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas] if hasattr(scheduler, "lr_lambdas") \
        else [1.0] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, factors):
        group["lr"] = config.learning_rate * factor
        group["initial_lr"] = config.learning_rate
        group["betas"] = (config.adam_beta1, config.adam_beta2)
        group["weight_decay"] = config.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


__all__ = ["apply_optimizer_config", "load_checkpoint", "save_checkpoint", "save_lora"]
