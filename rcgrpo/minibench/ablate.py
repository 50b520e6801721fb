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
  steps with the first 4 transitions trained, LoRA rank 8, AdamW lr 5e-4, α_edit 0.3 (σ of global),
  α_base 0.02, w_acd 0.5 (the `minibench` preset otherwise); chosen from a 3-step timing pilot
  (about 1 s per step here), before any ablation result was seen;
- evaluation: the base editor and every run on one held-out MiniBench set in the CompBench layout
  (`write_minibench` of `eval_split`, default the val split, seed 0), generated with the same seed: CompBench's official metrics
  (`rcgrpo.eval`: LC-I and LC-T with the shipped tiny CLIP, background PSNR, SSIM; LPIPS when its
  weights are available) and the task reward of each edit;
- training diagnostics (Fig. 5): the per-candidate background drift and the per-group reward std of
  every step, global vs RDP, as ECDFs pooled over seeds.

`results.json` holds everything; `results.md` the tables: mean ± sd over seeds per variant, and paired
differences by seed (mean ± sd and t = mean / (sd / sqrt(n))).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..io.files import atomic_write_text
from ..train.config import PRESETS, preset

VARIANTS = ("global", "rdp", "rdp_acd", "random_reward")
METRIC_KEYS = ("task_reward", "LC-I", "LC-T", "PSNR", "SSIM", "LPIPS")
TRAIN_KEYS = ("reward_std_within_group", "background_drift")
PAIRS = (("rdp", "global"), ("rdp_acd", "rdp"), ("rdp_acd", "base"), ("rdp", "random_reward"),
         ("rdp_acd", "random_reward"))


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
    eval_split: Literal["val", "test"] = _opt("val", "held-out split evaluated: val (choosing settings; the old "
                                              "'heldout') or test (once, for the final comparison)")
    eval_per_task: int = _opt(16, "held-out examples per task (add, remove, replace)")
    eval_seed: int = _opt(0, "seed of the held-out set and of the evaluation noises")
    clip_model: str = _opt("tiny-clip", "CLIP for LC-I / LC-T")
    eval_size: int = _opt(512, "metric resolution (CompBench's 512)")

    def validate(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"--variants: expected some of {', '.join(VARIANTS)}, got {self.variants}")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"--eval-split: expected val or test, got {self.eval_split!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds: expected distinct seeds, got {self.seeds}")
        for name in ("max_steps", "group_size", "num_anchors", "groups_per_step", "num_inference_steps", "lora_rank",
                     "train_size", "eval_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an int ≥ 1, got {getattr(self, name)}")


class RandomReward:
    """The control's task reward: uniform noise in [0, 1], reproducible from the seed and the call count."""

    name = "random_reward"

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def __call__(self, edited, sources, masks, instructions, metadata):
        import torch

        self.calls += 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        return torch.rand(edited.shape[0], generator=gen)


def variant_overrides(variant: str, cfg: AblationConfig) -> dict:
    return {
        "global": dict(perturbation="global", w_acd=0.0),
        "rdp": dict(perturbation="rdp", w_acd=0.0),
        "rdp_acd": dict(perturbation="rdp", w_acd=cfg.w_acd),
        "random_reward": dict(perturbation="rdp", w_acd=0.0),
    }[variant]


def _train_config(cfg: AblationConfig, variant: str, seed: int, run_dir: Path, defaults, n_single: int):
    return preset("minibench", model=cfg.model, train_size=cfg.train_size, eval_size=0,
                  resolution=defaults.resolution, max_sequence_length=defaults.max_sequence_length,
                  guidance_scale=defaults.guidance_scale, group_size=cfg.group_size, num_anchors=cfg.num_anchors,
                  groups_per_step=cfg.groups_per_step, num_inference_steps=cfg.num_inference_steps,
                  train_timesteps=cfg.train_timesteps, alpha_edit=cfg.alpha_edit, alpha_base=cfg.alpha_base,
                  acd_layers=n_single, lora_rank=cfg.lora_rank, lora_alpha=float(cfg.lora_rank),
                  learning_rate=cfg.learning_rate, max_steps=cfg.max_steps, seed=seed, output_dir=str(run_dir),
                  checkpoint_every=0, keep_checkpoints=1, sample_every=0, report_to="none", device="cpu",
                  **variant_overrides(variant, cfg))


def _task_rewards(results: dict, data_dir: Path) -> dict[str, float]:
    """The MiniBench reward of every evaluated edit, from its spec in the CompBench metadata."""
    import numpy as np
    import torch
    from PIL import Image

    from ..eval.compbench import CompBenchDataset
    from ..io.images import load_image, load_mask
    from .reward import minibench_reward

    dataset = CompBenchDataset(data_dir, require_ground_truth=False)
    records = {r.id: r for r in dataset.records}
    scores = {}
    for row in results["examples"]:
        rec = records[row["id"]]
        source = load_image(rec.source_path)
        mask = load_mask(rec.mask_path)
        with Image.open(row["output"]) as im:
            edited = im.convert("RGB").resize((source.shape[2], source.shape[1]), Image.Resampling.BICUBIC)
        edited = torch.from_numpy(np.asarray(edited, dtype=np.float32) / 255.0).permute(2, 0, 1)
        meta = {"minibench": rec.extra["minibench"], "id": rec.id, "task": rec.task}
        value = minibench_reward(edited[None], source[None], mask[None, None], [rec.instruction], [meta])
        scores[rec.id] = float(value[0])
    return scores


def _evaluate(pipe, defaults, cfg: AblationConfig, data_dir: Path, out_dir: Path) -> dict:
    from ..eval.evaluate import evaluate

    results = evaluate(data_dir, out_dir, pipeline=pipe, steps=cfg.num_inference_steps,
                       guidance_scale=defaults.guidance_scale, resolution=defaults.resolution,
                       max_sequence_length=defaults.max_sequence_length, seed=cfg.eval_seed,
                       clip_model=cfg.clip_model, eval_size=cfg.eval_size, device="cpu", log=None,
                       model_defaults=defaults)
    rewards = _task_rewards(results, data_dir)
    averages = {m: results["average"].get(m) for m in METRIC_KEYS if m != "task_reward"}
    averages["task_reward"] = sum(rewards.values()) / len(rewards)
    return {"metrics": averages, "per_task": results["per_task"], "task_reward_per_example": rewards,
            "unavailable": results.get("unavailable", {})}


def _train_summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"steps": len(rows), "reward_std_within_group": mean("reward_std_within_group"),
            "background_drift": mean("background_drift"), "reward_first": rows[0]["reward_mean"] if rows else None,
            "reward_last": rows[-1]["reward_mean"] if rows else None, "time_s": sum(r["time_s"] for r in rows)}


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def run_ablation(cfg: AblationConfig, *, log=print) -> dict:
    """Run the protocol; writes and returns the results (see the module docstring)."""
    from ..flux.attention import attention_modules
    from ..flux.pipeline import load_pipeline
    from ..rewards.registry import reward_funcs_from_config
    from ..train.data import build_datasets
    from ..train.diagnostics import plot_fig5
    from ..train.trainer import RCGRPOTrainer
    from .export import write_minibench

    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data_dir = out / f"eval-data-{cfg.eval_split}"
    if not (data_dir / "minibench.json").is_file():
        write_minibench(data_dir, per_task=cfg.eval_per_task, seed=cfg.eval_seed, split=cfg.eval_split)
    pipe, defaults = load_pipeline(cfg.model, device="cpu")
    n_single = len(pipe.transformer.single_transformer_blocks) or len(attention_modules(pipe.transformer))
    log(f"base model {cfg.model}: evaluating on {3 * cfg.eval_per_task} examples of the {cfg.eval_split} split")
    base = _evaluate(pipe, defaults, cfg, data_dir, out / "eval" / "base")
    del pipe
    runs = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            run_dir = out / "runs" / f"{variant}-seed{seed}"
            t0 = time.time()
            pipe, defaults = load_pipeline(cfg.model, device="cpu")
            config = _train_config(cfg, variant, seed, run_dir, defaults, n_single)
            train_set, _ = build_datasets(config)
            rewards = [("random_reward", RandomReward(seed))] if variant == "random_reward" \
                else reward_funcs_from_config(config)
            trainer = RCGRPOTrainer(pipe, config, rewards, train_set)
            trainer.train()
            train_s = time.time() - t0
            evaluation = _evaluate(trainer.pipe, defaults, cfg, data_dir, out / "eval" / f"{variant}-seed{seed}")
            runs.append({"variant": variant, "seed": seed, "train": _train_summary(run_dir), **evaluation,
                         "train_wall_s": train_s, "wall_s": time.time() - t0})
            log(f"{variant} seed {seed}: task reward {evaluation['metrics']['task_reward']:.4f}, "
                f"PSNR {_fmt(evaluation['metrics']['PSNR'])}, {time.time() - t0:.0f} s")
            del trainer, pipe
    results = summarize(cfg, base, runs)
    results["wall_s"] = time.time() - started
    fig_runs = {v: [out / "runs" / f"{v}-seed{s}" for s in cfg.seeds] for v in cfg.variants if v != "random_reward"}
    if fig_runs:
        results["fig5"] = plot_fig5(fig_runs, out / "fig5.png")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False))
    atomic_write_text(out / "results.md", format_markdown(results))
    return results


def summarize(cfg: AblationConfig, base: dict, runs: list[dict]) -> dict:
    table = {"base": {m: {"mean": base["metrics"].get(m), "sd": None, "n": 1} for m in METRIC_KEYS}}
    for variant in cfg.variants:
        rows = [r for r in runs if r["variant"] == variant]
        entry = {}
        for m in METRIC_KEYS:
            mean, sd = mean_sd([r["metrics"].get(m) for r in rows])
            entry[m] = {"mean": mean, "sd": sd, "n": len(rows)}
        for m in TRAIN_KEYS:
            mean, sd = mean_sd([r["train"].get(m) for r in rows])
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
    return {"protocol": asdict(cfg), "table": table, "paired": paired, "base": base, "runs": runs}


def _value(runs, variant, seed, metric):
    for r in runs:
        if r["variant"] == variant and r["seed"] == seed:
            if metric.startswith("train/"):
                return r["train"].get(metric[len("train/"):])
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
    p = results["protocol"]
    cols = list(METRIC_KEYS) + [f"train/{k}" for k in TRAIN_KEYS]
    lines = ["# MiniBench ablation (Table 2, Fig. 5)", "",
             f"Base `{p['model']}`; {len(p['seeds'])} seeds ({', '.join(map(str, p['seeds']))}); "
             f"{p['max_steps']} steps × {p['groups_per_step']} groups of G = {p['group_size']}, B = {p['num_anchors']}, "
             f"T = {p['num_inference_steps']}, {p['train_timesteps']} train transitions; LoRA r = {p['lora_rank']}, "
             f"lr {p['learning_rate']:g}; α_edit {p['alpha_edit']} (global σ = α_edit), α_base {p['alpha_base']}, "
             f"w_acd {p['w_acd']} (rdp_acd). Held-out: {3 * p['eval_per_task']} MiniBench examples of the "
             f"{p.get('eval_split', 'heldout')} split "
             f"(seed {p['eval_seed']}), metrics at {p['eval_size']} px as CompBench computes them, CLIP "
             f"`{p['clip_model']}`. Train columns: means over steps of the training logs.", "",
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


__all__ = ["AblationConfig", "RandomReward", "VARIANTS", "format_markdown", "run_ablation", "summarize"]
