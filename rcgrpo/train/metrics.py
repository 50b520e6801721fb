"""Step metrics over all ranks' groups: what `metrics.jsonl` and the trackers receive.

Each rank packs its groups into fixed-size rows (one row per slot this rank owns, unused rows marked
invalid), the rows of all ranks are gathered, and every rank computes the same metrics from all of
them. So 2 processes × 1 group log exactly what 1 process × 2 groups logs.

Per step (flat keys, SPEC §10 plus diagnostics; "task reward" is the weighted sum of the reward functions):
    reward_mean                 mean task reward over every candidate of every group
    reward_std_within_group     mean over groups of the population std of the task reward (its
                                per-group values in reward_std_within_group_values, for Fig. 5c)
    reward_std_between_groups   population std over groups of the groups' mean task rewards
    low_variance_fraction       fraction of groups whose task-reward std is below the low-variance
                                threshold (config low_variance_threshold, whether or not the filter is on)
    filtered_groups             groups the low-variance filter gave no update (0 when it is off)
    reference_reward_gap        mean over groups of (task reward of candidate 0 − the group's mean)
    acd_mean                    mean R_acd over every candidate
    background_drift            mean over perturbed candidates of the latent background drift to the
                                reference (per candidate in background_drift_values, for Fig. 5b)
    explore_rms_edit / _background   RMS over the perturbed candidates' final latents of their difference
                                to the reference candidate 0, inside / outside the mask (the rollout's
                                exploration: how different the group's candidates are where it matters)
    reward/<name>               mean of each reward function
    loss, policy_loss, kl_loss, clip_fraction, policy_entropy, pi_old_anchor: means over groups;
    ratio_min / ratio_max: extremes over groups
    after the update, on the same batch (`SurrogateUpdate.diagnostics`; None with log_policy_kl off):
    policy_kl, approx_kl, clip_frac_high, clip_frac_low: means over groups (each group weighs the same
                                number of anchors × transitions × candidates, so this is the uniform mean)
    leap_rms_edit / _background RMS of x̄_θ − x̄_old over every anchor transition of every group, inside /
                                outside the mask (how far one update moves the anchors' one-step predictions)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

STAT_NAMES = ("loss", "policy_loss", "kl_loss", "ratio_mean", "ratio_max", "ratio_min", "clip_fraction",
              "policy_entropy", "pi_old_anchor")
# per-group values of the post-update pass (`SurrogateUpdate.diagnostics`) and of the rollout's exploration
DIAG_NAMES = ("policy_kl", "approx_kl", "clip_frac_high", "clip_frac_low", "leap_sq_edit", "leap_n_edit",
              "leap_sq_background", "leap_n_background", "explore_sq_edit", "explore_n_edit",
              "explore_sq_background", "explore_n_background")


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
    diag: dict[str, float] = field(default_factory=dict)  # DIAG_NAMES (missing: not measured)
    filtered: bool = False  # the low-variance filter gave this group no update


def masked_square_sums(diff: torch.Tensor, mask: torch.Tensor, prefix: str) -> dict[str, float]:
    """`{prefix}_sq_edit`, `{prefix}_n_edit`, `{prefix}_sq_background`, `{prefix}_n_background`: Σ M·diff²,
    Σ M over every row of `diff [..., D]` (element mask `mask [D]` in [0, 1]), and the same with 1 − M."""
    diff = diff.detach().float()
    mask = mask.to(device=diff.device, dtype=torch.float32)
    sq = diff.square().reshape(-1, diff.shape[-1]).sum(0)  # [D]
    rows = diff.numel() // diff.shape[-1]
    return {f"{prefix}_sq_edit": float((sq * mask).sum()), f"{prefix}_n_edit": rows * float(mask.sum()),
            f"{prefix}_sq_background": float((sq * (1.0 - mask)).sum()),
            f"{prefix}_n_background": rows * float((1.0 - mask).sum())}


def exploration_sums(final_states: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """`masked_square_sums` (prefix "explore") of the perturbed candidates' final latents minus the
    reference's: `final_states [G, N_img, C]`, element mask `[N_img·C]`."""
    final = final_states.detach().float().reshape(final_states.shape[0], -1)
    return masked_square_sums(final[1:] - final[:1], mask, "explore")


class RowLayout:
    """The fixed layout of one group's row: valid, slot, filtered, task, acd, drift, advantages, components,
    stats, diagnostics."""

    def __init__(self, group_size: int, reward_names: list[str]):
        g = group_size
        self.group_size = g
        self.reward_names = list(reward_names)
        sizes = [("valid", 1), ("slot", 1), ("filtered", 1), ("task", g), ("acd", g), ("drift", g - 1), ("advantages", g)]
        sizes += [(f"reward/{n}", g) for n in self.reward_names]
        sizes += [(f"stat/{n}", 1) for n in STAT_NAMES]
        sizes += [(f"diag/{n}", 1) for n in DIAG_NAMES]
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
            for name in DIAG_NAMES:
                row[self.slices[f"diag/{name}"]] = float(g.diag.get(name, float("nan")))
            row[self.slices["filtered"]] = float(bool(g.filtered))
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
                stats={n: float(row[self.slices[f"stat/{n}"]].item()) for n in STAT_NAMES},
                diag={n: v for n in DIAG_NAMES if math.isfinite(v := float(row[self.slices[f"diag/{n}"]].item()))},
                filtered=row[self.slices["filtered"]].item() == 1.0))
        return sorted(groups, key=lambda g: g.slot)


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def _rms(groups: list[GroupSummary], prefix: str, region: str) -> float | None:
    """sqrt(Σ sq / Σ n) over the groups that measured `{prefix}_sq_{region}`."""
    pairs = [(g.diag[f"{prefix}_sq_{region}"], g.diag[f"{prefix}_n_{region}"]) for g in groups
             if f"{prefix}_sq_{region}" in g.diag and f"{prefix}_n_{region}" in g.diag]
    count = sum(n for _, n in pairs)
    return math.sqrt(sum(sq for sq, _ in pairs) / count) if count > 0 else None


def step_metrics(groups: list[GroupSummary], reward_names: list[str], *, low_variance_threshold: float = 0.0) -> dict:
    """The group-derived metrics of one step (see the module docstring); None where nothing was measured."""
    task = torch.cat([g.task for g in groups]) if groups else torch.zeros(0)
    within = [float(g.task.std(correction=0)) for g in groups]
    group_means = torch.stack([g.task.mean() for g in groups]) if groups else torch.zeros(0)
    diag = {n: [g.diag.get(n) for g in groups] for n in ("policy_kl", "approx_kl", "clip_frac_high", "clip_frac_low")}
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
        "reward_std_between_groups": float(group_means.std(correction=0)) if groups else None,
        "low_variance_fraction": sum(w < low_variance_threshold for w in within) / len(within) if within else None,
        "filtered_groups": sum(1 for g in groups if g.filtered),
        "reference_reward_gap": _mean([float(g.task[0] - g.task.mean()) for g in groups]),
        "explore_rms_edit": _rms(groups, "explore", "edit"),
        "explore_rms_background": _rms(groups, "explore", "background"),
        "policy_kl": _mean(diag["policy_kl"]),
        "approx_kl": _mean(diag["approx_kl"]),
        "clip_frac_high": _mean(diag["clip_frac_high"]),
        "clip_frac_low": _mean(diag["clip_frac_low"]),
        "leap_rms_edit": _rms(groups, "leap", "edit"),
        "leap_rms_background": _rms(groups, "leap", "background"),
    }
    for name in reward_names:
        metrics[f"reward/{name}"] = float(torch.cat([g.components[name] for g in groups]).mean()) if groups else None
    return metrics


def progress_fields(metrics: dict) -> dict[str, str]:
    """What the progress bar shows of a step: the task reward, `approx_kl` and the within-group std.

    Those two say whether a step can teach anything: `approx_kl` (½·mean (log ρ)² over every candidate
    after the update) shows whether the update moved the policy at all, where KL(π_old‖π_θ) reads ~1e-13
    once the surrogate's softmax is one-hot; `reward_std_within_group` shows whether the group explores
    enough for its ranking to carry signal (near 0, group standardization turns reward noise into
    full-size advantages). The rest is in metrics.jsonl and the trackers.
    """
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    return {"reward": fmt(metrics.get("reward_mean"), ".4f"), "approx_kl": fmt(metrics.get("approx_kl"), ".1e"),
            "std_in": fmt(metrics.get("reward_std_within_group"), ".4f")}


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


__all__ = ["DIAG_NAMES", "GroupSummary", "MovingAverage", "RowLayout", "STAT_NAMES", "exploration_sums",
           "masked_square_sums", "progress_fields", "step_metrics"]
