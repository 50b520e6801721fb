"""MiniBench experiment runs as independent, resumable processes (the study and the confirmatory ablation).

A run is a `RunSpec`: a name, the `RCGRPOConfig` overrides on top of the `minibench` preset, the task
reward ("task": MiniBench's programmatic reward, or "random": the control's seeded noise), a seed, and
the evaluation (split, examples per task, eval seed). `execute(spec, root)` trains and evaluates it:

    root/runs/<name>/              the trainer's run directory; checkpoints every `checkpoint_every` steps,
                                   so a killed run resumes from its newest complete checkpoint
    root/runs/<name>/eval/         the official CompBench metrics of its edits (`rcgrpo.eval`) + task reward
    root/runs/<name>/eval-ema/     the same with the EMA of the LoRA weights (when `ema_decay` > 0)
    root/runs/<name>/result.json   written last, atomically: spec, learning curve, training summary, metrics

A run with `max_steps = 0` is the base model's evaluation. A run whose `result.json` holds the same spec
is done and skipped. `run_pool(specs, root, parallel=2)` runs pending specs as `python -m
rcgrpo.minibench.runs SPEC.json` processes, each with one thread (`OMP_NUM_THREADS=1`), `parallel` at a
time, and reports each result as it lands; a stop loses at most the steps since a run's last checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..io.files import atomic_write_text

REWARDS = ("task", "random")
RESULT = "result.json"


@dataclass
class RunSpec:
    """One training run (or, with max_steps 0, the base model's evaluation)."""

    name: str
    seed: int = 0
    reward: str = "task"  # "task" (MiniBench reward) or "random" (the control)
    overrides: dict = field(default_factory=dict)  # RCGRPOConfig fields over the `minibench` preset
    eval_split: str = "val"
    eval_per_task: int = 16
    eval_seed: int = 0
    clip_model: str = "tiny-clip"
    eval_size: int = 512  # CompBench's metric resolution

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"run name {self.name!r}: expected a plain directory name")
        if self.reward not in REWARDS:
            raise ValueError(f"run {self.name!r}: reward {self.reward!r}, expected one of {REWARDS}")
        self.train_config(Path("/nonexistent"))  # unknown or invalid fields raise here, before any work

    def train_config(self, run_dir: Path):
        from ..train.config import preset

        values = dict(checkpoint_every=50, keep_checkpoints=1, sample_every=0, report_to="none", device="cpu",
                      seed=self.seed, eval_size=0)
        values.update(self.overrides)
        values["output_dir"] = str(run_dir)
        if values.get("max_steps", 1) == 0:
            values["max_steps"] = 1  # validated as a training config; the base run trains nothing
        return preset("minibench", **values)

    @property
    def max_steps(self) -> int:
        from ..train.config import PRESETS

        return int(self.overrides.get("max_steps", PRESETS["minibench"]["max_steps"]))

    def to_dict(self) -> dict:
        return asdict(self)


def eval_data_dir(root: Path, spec: RunSpec) -> Path:
    """The split's evaluation set in the CompBench layout (written once, shared by every run)."""
    from .export import write_minibench

    path = Path(root) / "data" / f"{spec.eval_split}-{spec.eval_per_task}x3-seed{spec.eval_seed}"
    if not (path / "minibench.json").is_file():
        write_minibench(path, per_task=spec.eval_per_task, seed=spec.eval_seed, split=spec.eval_split)
    return path


def read_result(root: Path, spec: RunSpec) -> dict | None:
    """The finished result of `spec` under `root`, or None (absent, or written for another spec)."""
    path = Path(root) / "runs" / spec.name / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("spec") == spec.to_dict() else None


def execute(spec: RunSpec, root: Path, *, log: Callable[[str], None] = print) -> dict:
    """Train (resuming from a checkpoint when one exists) and evaluate `spec`; returns and writes its result."""
    import torch

    from ..editors.loading import load_editor
    from ..rewards.registry import reward_funcs_from_config
    from ..train.data import build_datasets
    from ..train.checkpoints import list_checkpoints
    from ..train.trainer import RCGRPOTrainer
    from .scoring import RandomReward, evaluate_edits

    spec.validate()
    done = read_result(root, spec)
    if done is not None:
        return done
    root = Path(root)
    run_dir = root / "runs" / spec.name
    started = time.time()
    data_dir = eval_data_dir(root, spec)
    config = spec.train_config(run_dir)
    editor = load_editor(config.model, device="cpu")
    result: dict = {"spec": spec.to_dict(), "threads": torch.get_num_threads()}
    curve_set = curve_dataset(spec, config.resolution)
    train_set, _ = build_datasets(config)
    rewards = [("random_reward", RandomReward(spec.seed))] if spec.reward == "random" \
        else reward_funcs_from_config(config)
    if spec.max_steps == 0:
        result["eval"] = evaluate_edits(editor, spec, data_dir, run_dir / "eval")
        # step 0 of every learning curve: the base model on the curve sample (the LoRA starts at zero)
        trainer = RCGRPOTrainer(editor, config, rewards, train_set, eval_dataset=curve_set)
        result["curve_base"] = {"step": 0, "eval/task_reward": trainer.evaluate()}
    else:
        trainer = RCGRPOTrainer(editor, config, rewards, train_set, eval_dataset=curve_set)
        if run_dir.is_dir() and list_checkpoints(run_dir):
            trainer.resume(run_dir)
            log(f"{spec.name}: resuming at step {trainer.step}")
        trainer.train()
        result["train"] = train_summary(run_dir)
        result["eval"] = evaluate_edits(editor, spec, data_dir, run_dir / "eval")
        if config.ema_decay > 0:
            with trainer.evaluation_weights(ema=True):
                result["eval_ema"] = evaluate_edits(editor, spec, data_dir, run_dir / "eval-ema")
    result["wall_s"] = time.time() - started
    atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2, allow_nan=False))
    return result


def curve_dataset(spec: RunSpec, size: int):
    """The learning curve's sample: half as many examples per task as the evaluation set, of the same
    split with the next seed (so never the examples the final metrics are computed on)."""
    from .tasks import MiniBenchDataset

    return MiniBenchDataset(per_task=max(1, spec.eval_per_task // 2), split=spec.eval_split,
                            seed=spec.eval_seed + 1, size=size)


def train_summary(run_dir: Path) -> dict:
    """From metrics.jsonl: the learning curve (eval reward every `eval_every` steps), step means of the
    diagnostics, and the training time."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def mean(key):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    curve = [{"step": r["step"], **{k: r[k] for k in r if k.startswith("eval/")}} for r in rows
             if any(k.startswith("eval/") for k in r)]
    keys = ("reward_mean", "reward_std_within_group", "reward_std_between_groups", "background_drift",
            "approx_kl", "leap_rms_edit", "leap_rms_background", "explore_rms_edit", "explore_rms_background",
            "low_variance_fraction", "reference_reward_gap", "grad_norm")
    return {"steps": len(rows), "curve": curve, "means": {k: mean(k) for k in keys},
            "reward_first": rows[0]["reward_mean"] if rows else None,
            "reward_last": rows[-1]["reward_mean"] if rows else None,
            "time_s": sum(r.get("time_s") or 0.0 for r in rows)}


def run_pool(specs: list[RunSpec], root: Path, *, parallel: int = 2, log: Callable[[str], None] = print,
             on_result: Callable[[RunSpec, dict], None] | None = None) -> list[dict]:
    """Run every pending spec in its own one-thread process, `parallel` at a time; the results in spec order.
    A failed run raises after the others have finished (its log is `runs/<name>/run.log`)."""
    root = Path(root)
    for spec in specs:
        spec.validate()
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be distinct, got {names}")
    for spec in specs:  # each evaluation set is written once, before the processes could race for it
        eval_data_dir(root, spec)
    pending = [s for s in specs if read_result(root, s) is None]
    running: list[tuple[RunSpec, subprocess.Popen, float]] = []
    failed: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    while pending or running:
        while pending and len(running) < parallel:
            spec = pending.pop(0)
            run_dir = root / "runs" / spec.name
            run_dir.mkdir(parents=True, exist_ok=True)
            spec_file = run_dir / "spec.json"
            atomic_write_text(spec_file, json.dumps(spec.to_dict(), indent=2))
            with open(run_dir / "run.log", "a") as fh:
                proc = subprocess.Popen([sys.executable, "-m", "rcgrpo.minibench.runs", str(root), str(spec_file)],
                                        stdout=fh, stderr=subprocess.STDOUT, env=env)
            running.append((spec, proc, time.time()))
            log(f"started {spec.name}")
        time.sleep(2.0)
        for item in list(running):
            spec, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            result = read_result(root, spec)
            if proc.returncode != 0 or result is None:
                failed.append(spec.name)
                log(f"FAILED {spec.name} (exit {proc.returncode}); see {root / 'runs' / spec.name / 'run.log'}")
                continue
            log(f"finished {spec.name} in {time.time() - t0:.0f} s")
            if on_result is not None:
                on_result(spec, result)
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)}")
    return [read_result(root, s) for s in specs]


def main(argv: list[str] | None = None) -> int:
    """`python -m rcgrpo.minibench.runs ROOT SPEC.json`: execute one run (what `run_pool` starts)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m rcgrpo.minibench.runs ROOT SPEC.json", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = RunSpec(**json.loads(Path(argv[1]).read_text()))
    execute(spec, Path(argv[0]), log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
