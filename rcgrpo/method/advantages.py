"""Reward standardization, group advantages and the low-variance group filter (SPEC §6).

    z(r)  = (r − mean) / (std + 1e-8)                  over the whole minibatch (all groups, all ranks)
    r_i   = w_task·z(R_task)_i + w_acd·z(R_acd)_i
    A_i   = (r_i − mean_G r) / (std_G r + 1e-8)       per group; A = 0 for a group with std < 1e-6
                                                      (advantage_std = "group", the default)
    A_i   = (r_i − mean_G r) / (S + 1e-8)             advantage_std = "global", with
    S     = sqrt( Σ_groups Σ_i (r_i − mean_G r)² / n )  over the n candidates of all ranks' kept groups

"global" keeps the groups' relative spread: a group whose rewards differ by 1e-3 gets advantages
1e-3 / S instead of ±1 (group standardization turns noise into full-size advantages). S is the RMS of
the group-centered rewards, so the advantages have unit variance over the step. (Flow-GRPO's global
std divides by the std of the raw rewards, which also counts the spread between groups' means.)

Low-variance filter: a group whose task reward (the weighted sum of the reward functions, before any
standardization) has a population std over its G candidates below a threshold carries no usable
ranking (`low_variance_groups`); with `filter_low_variance` the trainer gives it no update and leaves it
out of S and of the loss's mean over groups.

Standard deviations are population deviations (divide by n), so a group of two still has one.
"""
from __future__ import annotations

import math

import torch

STD_EPS = 1e-8
ZERO_STD = 1e-6
ADVANTAGE_MODES = ("std", "quasi_norm")
ADVANTAGE_STD = ("group", "global")


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


def _check_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`rewards [N]` (checked) viewed as `[N / group_size, group_size]`."""
    rewards = check_rewards(rewards)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int ≥ 2, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def centered_square_sum(rewards: torch.Tensor, group_size: int) -> tuple[float, int]:
    """(Σ (r_i − mean_G r)², n) over the groups of `rewards [N]`: the local part of the global S."""
    groups = _check_groups(rewards, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    return float(centered.double().square().sum()), int(centered.numel())


def global_std_advantages(rewards: torch.Tensor, group_size: int, global_std: float) -> torch.Tensor:
    """A_i = (r_i − mean_G r) / (S + 1e-8) `[N]`, S = `global_std` (the RMS of the group-centered rewards
    over the whole step, see the module docstring). S < 1e-6 (no group varies) gives A = 0."""
    groups = _check_groups(rewards, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if not float(global_std) >= ZERO_STD:
        return torch.zeros_like(centered).reshape(-1)
    return (centered / (float(global_std) + STD_EPS)).reshape(-1)


def low_variance_groups(task_rewards: torch.Tensor, group_size: int, threshold: float) -> torch.Tensor:
    """bool `[N / group_size]`: groups whose task rewards `[N]` have a population std < `threshold`."""
    groups = _check_groups(task_rewards, group_size)
    return groups.std(dim=1, correction=0) < float(threshold)


def step_advantages(combined: torch.Tensor, task: torch.Tensor, group_size: int, *, mode: str = "std", p: float = 0.8,
                    std: str = "group", low_variance_threshold: float | None = None,
                    reduce_sum=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages `[N]`, kept `[N / group_size]` bool) of one rank's groups in a step.

    `combined` are the standardized, weighted rewards r `[N]`, `task` the raw task rewards `[N]` (the
    low-variance test). With a `low_variance_threshold` (the filter on), groups whose task std is below
    it get A = 0 and are not kept. `std="group"`: `group_advantages(mode, p)`; `std="global"`: A = (r −
    mean_G r) / S with S over the kept groups of every rank, `reduce_sum` (a float64 tensor → its sum over
    ranks; identity when None) called once whatever the local groups, so every rank joins it.
    """
    if std not in ADVANTAGE_STD:
        raise ValueError(f"advantage std must be one of {ADVANTAGE_STD}, got {std!r}")
    n_groups = combined.numel() // group_size
    keep = torch.ones(n_groups, dtype=torch.bool)
    if low_variance_threshold is not None and n_groups:
        keep = ~low_variance_groups(task, group_size, low_variance_threshold)
    if std == "global":
        kept = combined.reshape(n_groups, group_size)[keep].reshape(-1)
        local = torch.tensor(centered_square_sum(kept, group_size) if kept.numel() else (0.0, 0), dtype=torch.float64)
        sq, n = (reduce_sum(local) if reduce_sum is not None else local).tolist()
        adv = global_std_advantages(combined, group_size, math.sqrt(sq / n) if n else 0.0) if n_groups else combined
    else:
        adv = group_advantages(combined, group_size, mode=mode, p=p) if n_groups else combined
    return (adv.reshape(n_groups, group_size) * keep[:, None].to(adv.dtype)).reshape(-1), keep


def _stats(pair):
    if pair is None:
        return {}
    mean, std = pair
    return {"mean": mean, "std": std}
