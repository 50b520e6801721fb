"""Profile MiniBench training steps: time per trainer phase, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_minibench_step.py --max-steps 6 [--json out.json]
        [--torch-profile N]   (also print the N most expensive ops of the last step from torch.profiler)

It trains the `minibench` preset (the `make demo` settings) as `rcgrpo train --preset minibench` does,
in a temporary directory, listening to the trainer's phases (`trainer.phases.add_listener`). Each phase
gets its wall time and its CPU time (`time.process_time`: what this process computed, which other jobs
on a shared machine do not inflate, unlike the wall time). Phase times are inclusive (`acd` lies inside
`rollout`; `anchor_forward`, `distances`, `optimizer` inside `update`); `other` is the step minus its
top-level phases (text encoding of new instructions, metric packing, Python). Forward hooks split out
the transformer's forwards (`rollout/transformer`, which holds `acd`; `diagnostics/transformer`) and the
VAE encoding of the source image (`rollout/vae_encode`); `update/backward` is the update minus its
marked sub-phases. The first step is reported apart (warm-up: first calls, caches) and excluded from
the means. On code from before the post-update pass was a phase, its `policy_kl` pass is timed as
`diagnostics`.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict

import torch

TOP_LEVEL = ("rollout", "decode", "reward", "advantages", "update", "diagnostics")
ORDER = ("rollout", "rollout/transformer", "acd", "rollout/vae_encode", "decode", "reward", "advantages", "update",
         "anchor_forward", "update/backward", "distances", "optimizer", "diagnostics", "diagnostics/transformer",
         "other")


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class PhaseTimer:
    """Inclusive (wall, CPU) seconds per phase name, per step; forward hooks add the transformer's and the
    VAE encoder's forwards inside each top-level phase (`<phase>/transformer`, `rollout/vae_encode`)."""

    def __init__(self):
        self.open: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []

    def _add(self, name: str, start: tuple[float, float]) -> None:
        wall, cpu = _now()
        self.wall[name] += wall - start[0]
        self.cpu[name] += cpu - start[1]

    def phase_start(self, name: str) -> None:
        self.open[name].append(_now())
        if name in TOP_LEVEL:
            self.stack.append(name)

    def phase_end(self, name: str, error) -> None:
        if self.open[name]:
            self._add(name, self.open[name].pop())
        if name in TOP_LEVEL and self.stack:
            self.stack.pop()

    def hook(self, module, label: str) -> None:
        starts = []
        module.register_forward_pre_hook(lambda *_: starts.append(_now()))
        module.register_forward_hook(lambda *_: self._add(f"{self.stack[-1] if self.stack else 'other'}/{label}",
                                                          starts.pop()))

    def take(self) -> tuple[dict, dict]:
        out = (dict(self.wall), dict(self.cpu))
        self.wall, self.cpu = defaultdict(float), defaultdict(float)
        return out


def _complete(phases: dict, total: float) -> dict:
    phases["other"] = total - sum(phases.get(p, 0.0) for p in TOP_LEVEL)
    phases["update/backward"] = phases.get("update", 0.0) - sum(
        phases.get(k, 0.0) for k in ("anchor_forward", "distances", "optimizer"))
    phases["total"] = total
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    parser.add_argument("--torch-profile", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import rcgrpo.minibench  # noqa: F401 - registers tiny-editor, the minibench dataset and reward
    from rcgrpo.editors.loading import load_editor
    from rcgrpo.rewards.registry import reward_funcs_from_config
    from rcgrpo.train.config import preset
    from rcgrpo.train.data import build_datasets
    from rcgrpo.train.trainer import RCGRPOTrainer

    profiler = None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset("minibench", max_steps=args.max_steps, output_dir=os.path.join(tmp, "run"), report_to="none",
                     checkpoint_every=0, sample_every=0, device="cpu")
        train_set, eval_set = build_datasets(cfg)
        editor = load_editor(cfg.model, device="cpu")
        pipe = editor.pipe
        trainer = RCGRPOTrainer(editor, cfg, reward_funcs_from_config(cfg), train_set, eval_set)
        timer = PhaseTimer()
        trainer.phases.add_listener(timer)
        timer.hook(pipe.transformer, "transformer")
        timer.hook(pipe.vae.encoder, "vae_encode")
        if not hasattr(trainer.update, "diagnostics"):  # code before the post-update pass became a phase
            inner = trainer.update.policy_kl

            def timed(*a, **k):
                timer.phase_start("diagnostics")
                try:
                    return inner(*a, **k)
                finally:
                    timer.phase_end("diagnostics", None)

            trainer.update.policy_kl = timed
        steps = []
        for step in range(args.max_steps):
            if args.torch_profile and step == args.max_steps - 1:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.__enter__()
            wall0, cpu0 = _now()
            trainer.train_step()
            wall1, cpu1 = _now()
            trainer.step += 1
            if profiler is not None:
                profiler.__exit__(None, None, None)
            wall, cpu = timer.take()
            steps.append({"step": step + 1, "wall": _complete(wall, wall1 - wall0), "cpu": _complete(cpu, cpu1 - cpu0)})
            print(json.dumps({"step": step + 1, "wall_s": round(wall1 - wall0, 3), "cpu_s": round(cpu1 - cpu0, 3)}),
                  flush=True)
    measured = steps[1:] or steps
    mean = {kind: {n: sum(s[kind].get(n, 0.0) for s in measured) / len(measured) for n in (*ORDER, "total")}
            for kind in ("wall", "cpu")}
    names = [n for n in ORDER if any(n in s["wall"] for s in measured)]
    print(f"\nmean over steps 2..{len(steps)}: seconds per step (wall, CPU) and share of the step's CPU time")
    for n in names:
        label = f"  {n}" if n not in TOP_LEVEL and n != "other" else n
        print(f"{label:<26} {mean['wall'][n]:7.3f} {mean['cpu'][n]:7.3f}  {100 * mean['cpu'][n] / mean['cpu']['total']:5.1f}%")
    print(f"{'total':<26} {mean['wall']['total']:7.3f} {mean['cpu']['total']:7.3f}")
    print(f"load average at the end: {os.getloadavg()}")
    if profiler is not None:
        print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=args.torch_profile))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"steps": steps, "mean": mean, "load": os.getloadavg()}, fh, indent=1)


if __name__ == "__main__":
    main()
