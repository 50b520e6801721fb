"""The paper's Table 2 ablation and Fig. 5 on MiniBench, under one fixed budget (`rcgrpo ablate`).

Protocol (fixed before any run; the defaults of `AblationConfig`):
- the base model is the shipped tiny editor (`tiny-editor`); the task reward is MiniBench's
  programmatic reward (`minibench`, EditScore's role here);
- variants, each trained from the base for the same number of steps on the MiniBench train split:
      global         Neighbor GRPO's global perturbation, σ = α_edit, task reward only
      rdp            Region-Decoupled Perturbation (α_edit, α_base), task reward only
      rdp_acd        RDP + ACD (w_acd = 0.5)
      random_reward  control: RDP, the task reward replaced by seeded uniform noise
- seeds 0, 1, 2 (each seed sets the training data order, noises and anchors; variants of one seed
  see the same data, so differences are paired by seed);
- budget: 60 optimizer steps per run, 2 groups of G = 8 candidates per step, B = 4 anchors, T = 8 Euler
  steps with the first 4 transitions trained, LoRA rank 8, AdamW lr 5e-4, α_edit of the preset (σ of
  global; 0.3 until the 2026-12-07 study chose 0.6), α_base 0.02, w_acd 0.5 (the `minibench` preset
  otherwise); the 60-step budget was chosen from a 3-step timing pilot before any ablation result was
  seen (the confirmatory run's regime file overrides budget and α_edit);
- evaluation: the base editor and every run on one held-out MiniBench set in the CompBench layout
  (`write_minibench` of `eval_split`, default the val split, seed 0), generated with the same seed: CompBench's official metrics
  (`rcgrpo.eval`: LC-I and LC-T with the shipped tiny CLIP, background PSNR, SSIM; LPIPS when its
  weights are available) and the task reward of each edit;
- training diagnostics (Fig. 5): the per-candidate background drift and the per-group reward std of
  every step, global vs RDP, as ECDFs pooled over seeds.

Each run is an independent one-thread process (`rcgrpo.minibench.runs`), `parallel` at a time, resumable
from its checkpoints; a finished run is never rerun. `regime` names a YAML file of `RCGRPOConfig`
overrides (the regime chosen on the validation split), applied to every variant over the fields below.
`eval_split` picks the evaluation split (val, or test for the one confirmatory run): with "test" the
regime file must be committed, and `protocol.protocol_commit` records the commit that last changed it.

`results.json` holds everything; `results.md` the tables: mean ± sd over seeds per variant, and paired
differences by seed (mean ± sd and t = mean / (sd / sqrt(n))), plus each run's learning curve.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..io.files import atomic_write_text
from ..train.config import PRESETS
from .scoring import METRIC_KEYS, RandomReward, evaluate_edits  # noqa: F401 - public names of rcgrpo ablate

VARIANTS = ("global", "rdp", "rdp_acd", "random_reward")
TRAIN_KEYS = ("reward_std_within_group", "background_drift")
PAIRS = (("rdp", "base"), ("rdp", "global"), ("rdp", "random_reward"), ("rdp_acd", "rdp"), ("rdp_acd", "base"),
         ("rdp_acd", "random_reward"), ("global", "base"), ("random_reward", "base"))


def _opt(default, text: str, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


_PRESET = PRESETS["minibench"]


@dataclass
class AblationConfig:
    """The options of `rcgrpo ablate` (the protocol of the module docstring). Training settings default to
    the `minibench` preset of `RCGRPOConfig` (the one `make demo` trains)."""

    output_dir: str = _opt("runs/ablate", "where runs/, eval/, results.json, results.md and fig5.png go")
    model: str = _opt(_PRESET["model"], "base model (tiny-editor is the shipped MiniBench editor)")
    variants: list[str] = _opt(list(VARIANTS), "variants to train: " + ", ".join(VARIANTS))
    seeds: list[int] = _opt([0, 1, 2], "training seeds (each variant runs once per seed)")
    max_steps: int = _opt(60, "optimizer steps per run (the budget; the demo's preset trains 40)")
    group_size: int = _opt(_PRESET["group_size"], "G")
    num_anchors: int = _opt(_PRESET["num_anchors"], "B")
    groups_per_step: int = _opt(_PRESET["groups_per_step"], "groups per step")
    num_inference_steps: int = _opt(_PRESET["num_inference_steps"], "T: Euler steps of rollouts and evaluation")
    train_timesteps: str = _opt(_PRESET["train_timesteps"], "transitions trained per rollout (first n, high noise first)")
    learning_rate: float = _opt(_PRESET["learning_rate"], "AdamW learning rate")
    lora_rank: int = _opt(_PRESET["lora_rank"], "LoRA rank (alpha = rank)")
    alpha_edit: float = _opt(_PRESET["alpha_edit"], "α_edit (also σ of the global variant)")
    alpha_base: float = _opt(_PRESET["alpha_base"], "α_base of RDP")
    w_acd: float = _opt(_PRESET["w_acd"], "w_acd of rdp_acd")
    train_size: int = _opt(_PRESET["train_size"], "MiniBench train-split examples")
    eval_per_task: int = _opt(16, "evaluation examples per task (add, remove, replace)")
    eval_seed: int = _opt(0, "seed of the evaluation set and of the evaluation noises")
    eval_split: Literal["val", "test"] = _opt("val", "evaluation split: val (choosing settings; the old 'heldout') "
                                              "or test (once, for the confirmatory run)")
    eval_every: int = _opt(0, "validation task reward every N steps during training (learning curves; 0: off)")
    regime: str = _opt("", "YAML file of RCGRPOConfig overrides applied to every variant (the chosen regime)")
    parallel: int = _opt(2, "runs at a time, one thread each")
    clip_model: str = _opt("tiny-clip", "CLIP for LC-I / LC-T")
    eval_size: int = _opt(512, "metric resolution (CompBench's 512)")

    def validate(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"--variants: expected some of {', '.join(VARIANTS)}, got {self.variants}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds: expected distinct seeds, got {self.seeds}")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"--eval-split: expected val or test, got {self.eval_split!r}")
        if self.regime:
            self.regime_overrides()
        for name in ("max_steps", "group_size", "num_anchors", "groups_per_step", "num_inference_steps", "lora_rank",
                     "train_size", "eval_per_task", "parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an int ≥ 1, got {getattr(self, name)}")


    def regime_overrides(self) -> dict:
        """The RCGRPOConfig overrides of the `regime` file ({} without one)."""
        if not self.regime:
            return {}
        from ..train.config import RCGRPOConfig

        return RCGRPOConfig.read_yaml(self.regime)


def variant_overrides(variant: str, cfg: AblationConfig) -> dict:
    return {
        "global": dict(perturbation="global", w_acd=0.0),
        "rdp": dict(perturbation="rdp", w_acd=0.0),
        "rdp_acd": dict(perturbation="rdp", w_acd=cfg.w_acd),
        "random_reward": dict(perturbation="rdp", w_acd=0.0),
    }[variant]


def run_specs(cfg: AblationConfig) -> list:
    """The protocol's runs: the base model's evaluation, then every variant × seed."""
    from .runs import RunSpec

    common = dict(eval_split=cfg.eval_split, eval_per_task=cfg.eval_per_task, eval_seed=cfg.eval_seed,
                  clip_model=cfg.clip_model, eval_size=cfg.eval_size)
    train = dict(model=cfg.model, train_size=cfg.train_size, group_size=cfg.group_size, num_anchors=cfg.num_anchors,
                 groups_per_step=cfg.groups_per_step, num_inference_steps=cfg.num_inference_steps,
                 train_timesteps=cfg.train_timesteps, alpha_edit=cfg.alpha_edit, alpha_base=cfg.alpha_base,
                 lora_rank=cfg.lora_rank, lora_alpha=float(cfg.lora_rank), learning_rate=cfg.learning_rate,
                 max_steps=cfg.max_steps, eval_every=cfg.eval_every)
    train.update(cfg.regime_overrides())
    specs = [RunSpec(name="base", overrides=dict(model=train["model"], max_steps=0), **common)]
    for seed in cfg.seeds:
        for variant in cfg.variants:
            overrides = {**train, **variant_overrides(variant, cfg)}
            specs.append(RunSpec(name=f"{variant}-seed{seed}", seed=seed, overrides=overrides,
                                 reward="random" if variant == "random_reward" else "task", **common))
    return specs


def run_ablation(cfg: AblationConfig, *, log=print) -> dict:
    """Run the protocol (resuming finished and checkpointed runs); writes and returns the results."""
    from ..train.diagnostics import plot_fig5
    from .runs import run_pool

    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    protocol = protocol_record(cfg)
    specs = run_specs(cfg)
    log(f"{len(specs)} runs ({sum(s.max_steps == 0 for s in specs)} base), {cfg.parallel} at a time, "
        f"evaluated on {3 * cfg.eval_per_task} {cfg.eval_split} examples")
    results_by_run = run_pool(specs, out, parallel=cfg.parallel, log=log)
    base = results_by_run[0]["eval"]
    runs = []
    for spec, result in zip(specs[1:], results_by_run[1:]):
        variant = spec.name.rsplit("-seed", 1)[0]
        runs.append({"variant": variant, "seed": spec.seed, "train": result["train"], **result["eval"],
                     "wall_s": result["wall_s"]})
    results = summarize(cfg, base, runs)
    results["protocol"] = {**results["protocol"], **protocol}
    results["wall_s"] = time.time() - started
    fig_runs = {v: [out / "runs" / f"{v}-seed{s}" for s in cfg.seeds] for v in cfg.variants if v != "random_reward"}
    if fig_runs:
        results["fig5"] = plot_fig5(fig_runs, out / "fig5.png")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False))
    atomic_write_text(out / "results.md", format_markdown(results))
    return results


def protocol_record(cfg: AblationConfig) -> dict:
    """What the results record of the protocol: the split, the number of evaluation examples and, for the
    test split, the commit that fixed the regime file (which must be committed and unchanged since)."""
    record = {"split": cfg.eval_split, "test_examples": 3 * cfg.eval_per_task if cfg.eval_split == "test" else None,
              "eval_examples": 3 * cfg.eval_per_task, "regime_overrides": cfg.regime_overrides(),
              "protocol_commit": None}
    if cfg.regime:
        record["protocol_commit"] = _committed(Path(cfg.regime))
    if cfg.eval_split == "test" and record["protocol_commit"] is None:
        raise ValueError("--eval-split test: the protocol must be fixed first: commit the --regime file "
                         "(settings, seeds and budget) before the confirmatory run")
    return record


def _committed(path: Path) -> str | None:
    """The commit that last changed `path`, when the file is tracked and has no uncommitted change."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=path.resolve().parent, capture_output=True, text=True)

    log = git("log", "-1", "--format=%H", "--", path.name)
    dirty = git("status", "--porcelain", "--", path.name)
    if log.returncode or not log.stdout.strip() or dirty.stdout.strip():
        return None
    return log.stdout.strip()


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarize(cfg: AblationConfig, base: dict, runs: list[dict]) -> dict:
    table = {"base": {m: {"mean": base["metrics"].get(m), "sd": None, "n": 1} for m in METRIC_KEYS}}
    for variant in cfg.variants:
        rows = [r for r in runs if r["variant"] == variant]
        entry = {}
        for m in METRIC_KEYS:
            mean, sd = mean_sd([r["metrics"].get(m) for r in rows])
            entry[m] = {"mean": mean, "sd": sd, "n": len(rows)}
        for m in TRAIN_KEYS:
            mean, sd = mean_sd([(r["train"].get("means") or {}).get(m) for r in rows])
            entry[f"train/{m}"] = {"mean": mean, "sd": sd, "n": len(rows)}
        table[variant] = entry
    paired = {}
    for a, b in PAIRS:
        if a not in cfg.variants or (b != "base" and b not in cfg.variants):
            continue
        diffs = {}
        for m in METRIC_KEYS + tuple(f"train/{k}" for k in TRAIN_KEYS):
            per_seed = []
            for seed in cfg.seeds:
                ra = _value(runs, a, seed, m)
                rb = base["metrics"].get(m) if b == "base" else _value(runs, b, seed, m)
                if ra is not None and rb is not None:
                    per_seed.append(ra - rb)
            mean, sd = mean_sd(per_seed)
            t = mean / (sd / math.sqrt(len(per_seed))) if mean is not None and sd and len(per_seed) > 1 else None
            diffs[m] = {"per_seed": per_seed, "mean": mean, "sd": sd, "t": t}
        paired[f"{a} - {b}"] = diffs
    curves = {f"{r['variant']}-seed{r['seed']}": r["train"].get("curve", []) for r in runs}
    return {"protocol": asdict(cfg), "table": table, "paired": paired, "base": base, "runs": runs,
            "learning_curves": curves}


def _value(runs, variant, seed, metric):
    for r in runs:
        if r["variant"] == variant and r["seed"] == seed:
            if metric.startswith("train/"):
                return (r["train"].get("means") or {}).get(metric[len("train/"):])
            return r["metrics"].get(metric)
    return None


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(entry: dict, digits: int) -> str:
    if entry["mean"] is None:
        return "n/a"
    return _fmt(entry["mean"], digits) + ("" if entry["sd"] is None else f" ± {entry['sd']:.{digits}f}")


DIGITS = {"task_reward": 4, "LC-I": 4, "LC-T": 2, "PSNR": 2, "SSIM": 4, "LPIPS": 4,
          "train/reward_std_within_group": 4, "train/background_drift": 5}


def format_markdown(results: dict) -> str:
    # the settings in force: the regime file's overrides over the ablation's defaults
    p = {**results["protocol"], **(results["protocol"].get("regime_overrides") or {})}
    cols = list(METRIC_KEYS) + [f"train/{k}" for k in TRAIN_KEYS]
    lines = ["# MiniBench ablation (Table 2, Fig. 5)", "",
             f"Base `{p['model']}`; {len(p['seeds'])} seeds ({', '.join(map(str, p['seeds']))}); "
             f"{p['max_steps']} steps × {p['groups_per_step']} groups of G = {p['group_size']}, B = {p['num_anchors']}, "
             f"T = {p['num_inference_steps']}, {p['train_timesteps']} train transitions; LoRA r = {p['lora_rank']}, "
             f"lr {p['learning_rate']:g}; α_edit {p['alpha_edit']} (global σ = α_edit), α_base {p['alpha_base']}, "
             f"w_acd {p['w_acd']} (rdp_acd). Held-out: {3 * p['eval_per_task']} MiniBench examples of the "
             f"{p.get('eval_split', 'heldout')} split "
             f"(seed {p['eval_seed']}), metrics at {p['eval_size']} px as CompBench computes them, CLIP "
             f"`{p['clip_model']}`. Train columns: means over steps of the training logs."
             + (f" Regime (`{p['regime']}`, commit {str(p.get('protocol_commit'))[:10]}): "
                f"`{results['protocol']['regime_overrides']}`." if p.get("regime") else ""), "",
             "| variant | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for variant, entry in results["table"].items():
        cells = [_cell(entry[c], DIGITS[c]) if c in entry else "—" for c in cols]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences by seed (mean ± sd over seeds; t = mean / (sd/√n)):", "",
              "| difference | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, diffs in results["paired"].items():
        cells = []
        for c in cols:
            d = diffs[c]
            if d["mean"] is None:
                cells.append("n/a")
            else:
                cells.append(f"{d['mean']:+.{DIGITS[c]}f} ± {d['sd']:.{DIGITS[c]}f}"
                             + (f" (t {d['t']:.1f})" if d["t"] is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    unavailable = results["base"].get("unavailable") or {}
    if unavailable:
        lines += ["", "Unavailable: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())]
    if results.get("fig5"):
        lines += ["", "![Fig. 5](fig5.png)"]
    lines += ["", f"Wall time: {results.get('wall_s', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


__all__ = ["AblationConfig", "RandomReward", "VARIANTS", "evaluate_edits", "format_markdown", "protocol_record",
           "run_ablation", "run_specs", "summarize"]
