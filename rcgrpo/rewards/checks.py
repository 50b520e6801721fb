"""What every reward takes and returns: argument checks, output checks, readable names.

    reward(edited, sources, masks, instructions, metadata) -> Tensor[B] float32

edited, sources `[B, 3, H, W]` float in [0, 1]; masks `[B, 1, H, W]` in [0, 1] (1 = edit region);
instructions `list[str]` and metadata `list[dict]` of length B.
"""
from __future__ import annotations

from typing import Callable

import torch

RewardFn = Callable[..., torch.Tensor]


def check_reward_inputs(edited, sources, masks, instructions, metadata, *, name: str = "reward",
                        need_sources: bool = True) -> int:
    """Check the common reward arguments; returns the batch size B. Raises ValueError naming `name`."""
    if not isinstance(edited, torch.Tensor) or edited.dim() != 4 or edited.shape[1] != 3:
        shape = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
        raise ValueError(f"{name}: `edited` must be a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not edited.is_floating_point():
        raise ValueError(f"{name}: `edited` must be a float tensor in [0, 1], got dtype {edited.dtype}")
    batch, _, height, width = edited.shape
    if need_sources or sources is not None:
        if not isinstance(sources, torch.Tensor) or tuple(sources.shape) != tuple(edited.shape):
            shape = tuple(sources.shape) if isinstance(sources, torch.Tensor) else type(sources).__name__
            raise ValueError(f"{name}: `sources` must have the shape of `edited` {tuple(edited.shape)}, got {shape}")
        if not sources.is_floating_point():
            raise ValueError(f"{name}: `sources` must be a float tensor in [0, 1], got dtype {sources.dtype}")
    if masks is not None:
        if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (batch, 1, height, width):
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(f"{name}: `masks` must be a tensor [B, 1, H, W] = {(batch, 1, height, width)}, got {shape}")
    if instructions is not None and len(instructions) != batch:
        raise ValueError(f"{name}: got {len(instructions)} instructions for a batch of {batch} images")
    if metadata is not None and len(metadata) != batch:
        raise ValueError(f"{name}: got {len(metadata)} metadata entries for a batch of {batch} images")
    return batch


def check_reward_output(values, batch: int, name: str) -> torch.Tensor:
    """Validate a reward's output: a 1-D float tensor of `batch` finite values. Returns it as float32.

    Raises ValueError naming the reward and what was expected.
    """
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"reward {name!r} returned {type(values).__name__}; expected a float tensor of shape [{batch}]")
    if not values.is_floating_point():
        raise ValueError(f"reward {name!r} returned dtype {values.dtype}; expected a floating-point tensor of shape [{batch}]")
    if values.dim() != 1 or values.shape[0] != batch:
        raise ValueError(f"reward {name!r} returned shape {tuple(values.shape)}; expected [{batch}] (one value per image)")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"reward {name!r} returned non-finite values at indices {bad[:8]}"
            f" ({values[bad[0]].item()} at index {bad[0]}); rewards must be finite"
        )
    return values.float()


def reward_name(fn) -> str:
    """A readable name for a reward callable: its `name` attribute, function name or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return "reward" if name == "<lambda>" else name
    return type(fn).__name__


__all__ = ["RewardFn", "check_reward_inputs", "check_reward_output", "reward_name"]
