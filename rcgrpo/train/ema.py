"""An exponential moving average of the LoRA weights (config `ema_decay`, `ema_start_step`).

After the optimizer step(s) of training step s (1-based):

    s ≤ ema_start_step:  θ_ema = θ                              (the average starts at the current weights)
    s > ema_start_step:  θ_ema = d · θ_ema + (1 − d) · θ         after each optimizer step (d = ema_decay)

so with `ema_start_step = 0` the average starts at the initial LoRA (the base model, since peft's B
matrices start at 0) and with `inner_epochs > 1` it moves once per optimizer step. The average is kept
in fp32 on the parameters' device. It is what the trainer evaluates (`RCGRPOTrainer.evaluate`, the
before/after line of `rcgrpo train --report`, `eval/task_reward_ema` of `eval_every`), it is saved beside
the raw LoRA in the same diffusers format (`<output_dir>/lora_ema/`), and a checkpoint stores it, so a
resumed run averages exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class LoraEMA:
    """The EMA of `params` (named: `names[i]` is the name of `params[i]`)."""

    def __init__(self, names: list[str], params: list[torch.Tensor], *, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay!r}")
        if len(names) != len(params):
            raise ValueError(f"{len(names)} names for {len(params)} parameters")
        self.names = list(names)
        self.params = list(params)
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0  # optimizer steps averaged in (after the start)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average again at the current weights."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach().float())
        self.updates = 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the current weights after an optimizer step of training step `step` (1-based)."""
        if step <= self.start_step:
            for s, p in zip(self.shadow, self.params):
                s.copy_(p.detach().float())
            return
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the parameters for the block (the raw ones restored after it)."""
        backup = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    p.copy_(s.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """{"tensors": name → fp32 CPU tensor, "updates": int} (what a checkpoint stores)."""
        return {"tensors": {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)},
                "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict, updates: int = 0, *, source: str = "checkpoint") -> None:
        """Restore the average from `state_dict()["tensors"]`; ValueError naming missing or misshapen keys."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"{source}: the EMA lacks weights for {missing[:4]}")
        for name, s in zip(self.names, self.shadow):
            value = tensors[name]
            if tuple(value.shape) != tuple(s.shape):
                raise ValueError(f"{source}: EMA weight {name!r} has shape {tuple(value.shape)}, expected {tuple(s.shape)}")
            s.copy_(value.float())
        self.updates = int(updates)


__all__ = ["LoraEMA"]
