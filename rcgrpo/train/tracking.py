"""What a run records: `metrics.jsonl` (always) and the ecosystem's trackers through accelerate.

    run_log = RunLog(output_dir, accelerator, config)
    run_log.start(step)            # main process: metrics.jsonl cut back to `step`, trackers initialised
    run_log.log(metrics)           # one JSON line (flat keys, SPEC §10) + grouped scalars to the trackers
    run_log.log_images({...}, step)
    run_log.finish()

Trackers are accelerate's (`Accelerator(log_with=config.trackers())`, `accelerator.init_trackers`,
`accelerator.log`): TensorBoard, Weights & Biases, MLflow. They receive the config as hyperparameters,
scalars under grouped names (`reward/…`, `policy/…`, `acd/…`, `rollout/…`, `perf/…`, `run/…`) and the
sample edits and ACD heatmaps as images. On resume from step N, metrics.jsonl keeps only steps ≤ N and
TensorBoard purges events after N (`purge_step`), so no step is logged twice. Only the main process
writes; the others call the same methods, which do nothing there.
"""
from __future__ import annotations

import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..io.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
PROJECT_NAME = "rcgrpo"
TRACKER_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",)}

# flat metrics.jsonl key → tracker name (keys not listed: run/<key>; lists are not sent to trackers)
_GROUPS = {
    "reward_mean": "reward/mean", "reward_std_within_group": "reward/std_within_group", "reward_ema": "reward/ema",
    "acd_mean": "acd/mean", "background_drift": "rollout/background_drift",
    "loss": "policy/loss", "policy_loss": "policy/policy_loss", "kl_loss": "policy/kl_to_base",
    "policy_kl": "policy/kl", "ratio_mean": "policy/ratio_mean", "ratio_max": "policy/ratio_max",
    "ratio_min": "policy/ratio_min", "clip_fraction": "policy/clip_fraction", "policy_entropy": "policy/entropy",
    "pi_old_anchor": "policy/pi_old_anchor", "advantage_abs_mean": "policy/advantage_abs_mean",
    "advantage_max": "policy/advantage_max", "grad_norm": "policy/grad_norm", "lr": "policy/lr",
    "time_s": "perf/step_s", "rollout_time_s": "perf/rollout_s",
    "approx_kl": "policy/approx_kl", "clip_frac_high": "policy/clip_frac_high", "clip_frac_low": "policy/clip_frac_low",
    "leap_rms_edit": "policy/leap_rms_edit", "leap_rms_background": "policy/leap_rms_background",
    "explore_rms_edit": "rollout/explore_rms_edit", "explore_rms_background": "rollout/explore_rms_background",
    "reward_std_between_groups": "reward/std_between_groups", "low_variance_fraction": "reward/low_variance_fraction",
    "filtered_groups": "reward/filtered_groups", "reference_reward_gap": "reward/reference_gap",
}


def tracker_name(key: str) -> str:
    if key in _GROUPS:
        return _GROUPS[key]
    return key if "/" in key else f"run/{key}"


def check_trackers(names: list[str]) -> None:
    """ValueError naming a tracker whose package is not installed (before any work starts)."""
    for name in names:
        if not any(importlib.util.find_spec(m.split(".")[0]) is not None for m in TRACKER_MODULES[name]):
            raise ValueError(f"--report-to {name}: the {TRACKER_MODULES[name][0]!r} package is not installed "
                             f"(pip install {TRACKER_MODULES[name][0]}), or pass --report-to none")


def hyperparameters(config_dict: dict) -> dict:
    """The config as tracker hyperparameters: scalars kept, lists joined, None as "none"."""
    out = {}
    for key, value in config_dict.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif value is None:
            value = "none"
        out[key] = value
    return out


RUN_INFO_FILE = "run_info.json"
RESOLVED_CONFIG_FILE = "config.yaml"


def versions() -> dict:
    """Python and the versions of the packages a run depends on (None when not installed)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("rcgrpo", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Path) -> str | None:
    """The commit of the git checkout holding `path` (with "-dirty" for uncommitted changes), or None."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def config_for_saving(config) -> dict:
    """The config's values as written to the run directory and checkpoints (reward-server credentials redacted)."""
    from ..rewards.editscore import redact_url

    values = config.to_dict()
    if values.get("editscore_url"):
        values["editscore_url"] = redact_url(values["editscore_url"])
    return values


class SavedConfig:
    """The config as written to the run directory (`config_for_saving`)."""

    def __init__(self, config):
        self.values = config_for_saving(config)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.values, sort_keys=False)


def write_run_info(output_dir, config, *, world_size: int, device, step: int) -> None:
    """`config.yaml` (the resolved config) and `run_info.json` (versions, git commit of rcgrpo, command
    line, processes, device, start time) in the run directory; a resume appends to run_info's history."""
    output_dir = Path(output_dir)
    atomic_write_text(output_dir / RESOLVED_CONFIG_FILE, config.to_yaml())
    info_path = output_dir / RUN_INFO_FILE
    history = []
    if info_path.is_file():
        try:
            history = json.loads(info_path.read_text()).get("starts", [])
        except ValueError:
            history = []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step, "argv": sys.argv,
                    "world_size": world_size, "device": str(device), "host": platform.node(),
                    "versions": versions(), "rcgrpo_git_commit": git_commit(Path(__file__).resolve().parent)})
    atomic_write_text(info_path, json.dumps({"starts": history}, indent=2))


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the lines of `path` with `"step" ≤ step` (and drop a torn last line); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(k + "\n" for k in kept))
    return dropped


class RunLog:
    def __init__(self, output_dir, accelerator, config_dict: dict):
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator
        self.config_dict = config_dict
        self.is_main = accelerator.is_main_process
        self.started = False

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def start(self, step: int) -> None:
        """Cut metrics.jsonl back to `step` and initialise the trackers (purging TensorBoard after `step`)."""
        if self.is_main:
            truncate_metrics(self.metrics_path, step)
        init_kwargs = {"tensorboard": {"purge_step": step + 1}} if step > 0 else {}
        if self.accelerator.log_with:
            self.accelerator.init_trackers(PROJECT_NAME, config=hyperparameters(self.config_dict),
                                           init_kwargs=init_kwargs)
        self.started = True

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        line = json.dumps(metrics, allow_nan=False, default=_json_default)
        with open(self.metrics_path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
        if self.started and self.accelerator.log_with:
            scalars = {tracker_name(k): float(v) for k, v in metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
            self.accelerator.log(scalars, step=int(metrics["step"]))

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """`{name: [H, W, 3] uint8}` to every tracker that takes images."""
        if not (self.is_main and self.started):
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({k: [v] for k, v in images.items()}, step=step)

    def finish(self) -> None:
        if self.started and self.accelerator.log_with:
            self.accelerator.end_training()
        self.started = False


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(value)


__all__ = ["METRICS_FILE", "RESOLVED_CONFIG_FILE", "RUN_INFO_FILE", "RunLog", "SavedConfig", "check_trackers",
           "config_for_saving", "git_commit",
           "hyperparameters", "tracker_name", "truncate_metrics", "versions", "write_run_info"]
