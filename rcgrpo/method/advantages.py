"""Reward standardization and group advantages (SPEC §6).

    z(r)  = (r − mean) / (std + 1e-8)                  over the whole minibatch (all groups, all ranks)
    r_i   = w_task·z(R_task)_i + w_acd·z(R_acd)_i
    A_i   = (r_i − mean_G r) / (std_G r + 1e-8)       per group; A = 0 for a group with std < 1e-6

Standard deviations are population deviations (divide by n), so a group of two still has one.
"""
from __future__ import annotations

import torch

STD_EPS = 1e-8
ZERO_STD = 1e-6
ADVANTAGE_MODES = ("std", "quasi_norm")


def check_rewards(rewards: torch.Tensor, *, name: str = "rewards") -> torch.Tensor:
    """A 1-D finite float tensor, or ValueError naming the problem."""
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name} contain NaN or inf at positions {idx[:8]}")
    return rewards


def standardize(rewards: torch.Tensor, *, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                name: str = "rewards") -> torch.Tensor:
    """z(r) = (r − mean)/(std + 1e-8); pass global `mean`/`std` when the minibatch spans processes."""
    rewards = check_rewards(rewards, name=name)
    if mean is None:
        mean = rewards.mean()
    if std is None:
        std = rewards.std(correction=0) if rewards.numel() > 1 else rewards.new_zeros(())
    return (rewards - mean) / (std + STD_EPS)


def combine_rewards(task: torch.Tensor, acd: torch.Tensor | None = None, *, w_task: float = 1.0,
                    w_acd: float = 0.5, task_stats=None, acd_stats=None) -> torch.Tensor:
    """r = w_task·z(R_task) + w_acd·z(R_acd). `*_stats` are optional global (mean, std) pairs."""
    r = w_task * standardize(task, **_stats(task_stats), name="task rewards")
    if acd is not None and w_acd != 0:
        if acd.shape != task.shape:
            raise ValueError(f"ACD rewards {tuple(acd.shape)} must match task rewards {tuple(task.shape)}")
        r = r + w_acd * standardize(acd, **_stats(acd_stats), name="ACD rewards")
    return r


def group_advantages(rewards: torch.Tensor, group_size: int, *, mode: str = "std", p: float = 0.8) -> torch.Tensor:
    """Advantages `[N]` for rewards `[N]` laid out as N/group_size consecutive groups
    (rewards `[n_groups, group_size]` give advantages of that shape).

    mode="std": A = (r − mean_G)/(std_G + 1e-8). mode="quasi_norm" (Neighbor GRPO): the deviation
    is divided by the p-quasi-norm (mean |r − mean_G|^p)^(1/p) instead of the standard deviation.
    Groups whose std is below 1e-6 get A = 0.
    """
    if isinstance(rewards, torch.Tensor) and rewards.dim() == 2 and rewards.shape[1] == group_size:
        return group_advantages(rewards.reshape(-1), group_size, mode=mode, p=p).view(rewards.shape)
    rewards = check_rewards(rewards)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int ≥ 2, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, correction=0)
    if mode == "std":
        denom = std + STD_EPS
    else:
        denom = centered.abs().pow(p).mean(dim=1, keepdim=True).pow(1.0 / p) + STD_EPS
    adv = torch.where(std < ZERO_STD, torch.zeros_like(centered), centered / denom)
    return adv.reshape(-1)


def _stats(pair):
    if pair is None:
        return {}
    mean, std = pair
    return {"mean": mean, "std": std}
