"""Step metrics over all ranks' groups: what `metrics.jsonl` and the trackers receive.

Each rank packs its groups into fixed-size rows (one row per slot this rank owns, unused rows marked
invalid), the rows of all ranks are gathered, and every rank computes the same metrics from all of
them. So 2 processes × 1 group log exactly what 1 process × 2 groups logs.

Per step (flat keys, SPEC §10 plus diagnostics):
    reward_mean                 mean task reward over every candidate of every group
    reward_std_within_group     mean over groups of the population std of the task reward (its
                                per-group values in reward_std_within_group_values, for Fig. 5c)
    acd_mean                    mean R_acd over every candidate
    background_drift            mean over perturbed candidates of the latent background drift to the
                                reference (per candidate in background_drift_values, for Fig. 5b)
    reward/<name>               mean of each reward function
    loss, policy_loss, kl_loss, clip_fraction, policy_entropy, pi_old_anchor: means over groups;
    ratio_min / ratio_max: extremes over groups
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

STAT_NAMES = ("loss", "policy_loss", "kl_loss", "ratio_mean", "ratio_max", "ratio_min", "clip_fraction",
              "policy_entropy", "pi_old_anchor")


@dataclass
class GroupSummary:
    """What the step metrics need of one group."""

    slot: int
    task: torch.Tensor  # [G]
    acd: torch.Tensor | None  # [G]
    drift: torch.Tensor  # [G − 1]
    advantages: torch.Tensor  # [G]
    components: dict[str, torch.Tensor]  # reward name → [G]
    stats: dict[str, float] = field(default_factory=dict)  # STAT_NAMES, averaged over inner epochs


class RowLayout:
    """The fixed layout of one group's row: valid, slot, task, acd, drift, advantages, components, stats."""

    def __init__(self, group_size: int, reward_names: list[str]):
        g = group_size
        self.group_size = g
        self.reward_names = list(reward_names)
        sizes = [("valid", 1), ("slot", 1), ("task", g), ("acd", g), ("drift", g - 1), ("advantages", g)]
        sizes += [(f"reward/{n}", g) for n in self.reward_names]
        sizes += [(f"stat/{n}", 1) for n in STAT_NAMES]
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, size in sizes:
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.width = offset

    def pack(self, groups: list[GroupSummary], rows: int) -> torch.Tensor:
        """`[rows, width]` float64: the groups, then invalid rows (a rank's slots are fixed, its groups not)."""
        out = torch.zeros(rows, self.width, dtype=torch.float64)
        for i, g in enumerate(groups):
            row = out[i]
            row[self.slices["valid"]] = 1.0
            row[self.slices["slot"]] = float(g.slot)
            row[self.slices["task"]] = g.task.double()
            row[self.slices["acd"]] = g.acd.double() if g.acd is not None else float("nan")
            row[self.slices["drift"]] = g.drift.double()
            row[self.slices["advantages"]] = g.advantages.double()
            for name in self.reward_names:
                row[self.slices[f"reward/{name}"]] = g.components[name].double()
            for name in STAT_NAMES:
                row[self.slices[f"stat/{name}"]] = float(g.stats.get(name, float("nan")))
        return out

    def unpack(self, rows: torch.Tensor) -> list[GroupSummary]:
        """The valid rows as groups, in slot order."""
        groups = []
        for row in rows:
            if row[self.slices["valid"]].item() != 1.0:
                continue
            acd = row[self.slices["acd"]]
            groups.append(GroupSummary(
                slot=int(row[self.slices["slot"]].item()), task=row[self.slices["task"]],
                acd=None if bool(torch.isnan(acd).all()) else acd, drift=row[self.slices["drift"]],
                advantages=row[self.slices["advantages"]],
                components={n: row[self.slices[f"reward/{n}"]] for n in self.reward_names},
                stats={n: float(row[self.slices[f"stat/{n}"]].item()) for n in STAT_NAMES}))
        return sorted(groups, key=lambda g: g.slot)


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def step_metrics(groups: list[GroupSummary], reward_names: list[str]) -> dict:
    """The group-derived metrics of one step (see the module docstring); None where nothing was measured."""
    task = torch.cat([g.task for g in groups]) if groups else torch.zeros(0)
    within = [float(g.task.std(correction=0)) for g in groups]
    drift = torch.cat([g.drift for g in groups]).tolist() if groups else []
    adv = torch.cat([g.advantages for g in groups]) if groups else torch.zeros(0)
    acd = [g.acd for g in groups if g.acd is not None]
    stat = {n: [g.stats.get(n) for g in groups] for n in STAT_NAMES}
    finite = {n: [v for v in vals if v is not None and math.isfinite(v)] for n, vals in stat.items()}
    metrics = {
        "loss": _mean(stat["loss"]),
        "policy_loss": _mean(stat["policy_loss"]),
        "kl_loss": _mean(stat["kl_loss"]),
        "reward_mean": float(task.mean()) if task.numel() else None,
        "reward_std_within_group": _mean(within),
        "reward_std_within_group_values": within,
        "acd_mean": float(torch.cat(acd).mean()) if acd else None,
        "background_drift": _mean(drift),
        "background_drift_values": drift,
        "advantage_abs_mean": float(adv.abs().mean()) if adv.numel() else None,
        "advantage_max": float(adv.max()) if adv.numel() else None,
        "ratio_mean": _mean(stat["ratio_mean"]),
        "ratio_max": max(finite["ratio_max"], default=None),
        "ratio_min": min(finite["ratio_min"], default=None),
        "clip_fraction": _mean(stat["clip_fraction"]),
        "policy_entropy": _mean(stat["policy_entropy"]),
        "pi_old_anchor": _mean(stat["pi_old_anchor"]),
    }
    for name in reward_names:
        metrics[f"reward/{name}"] = float(torch.cat([g.components[name] for g in groups]).mean()) if groups else None
    return metrics


class MovingAverage:
    """Exponential moving average (`decay` per update), bias-corrected like Adam's moments."""

    def __init__(self, decay: float = 0.9, value: float = 0.0, count: int = 0):
        self.decay, self.value, self.count = decay, value, count

    def update(self, x: float | None) -> float | None:
        if x is None or not math.isfinite(x):
            return self.current
        self.value = self.decay * self.value + (1 - self.decay) * x
        self.count += 1
        return self.current

    @property
    def current(self) -> float | None:
        return self.value / (1 - self.decay**self.count) if self.count else None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self.value, "count": self.count}


__all__ = ["GroupSummary", "MovingAverage", "RowLayout", "STAT_NAMES", "step_metrics"]
