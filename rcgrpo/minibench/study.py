"""The MiniBench validation study: which regime lets RC-GRPO improve the tiny editor (`rcgrpo study`).

A study is a plan file (YAML, committed before its runs): common settings and named configurations,

    common:                        # RCGRPOConfig overrides every configuration starts from
      max_steps: 400
      eval_every: 50
    eval: {split: val, per_task: 16, seed: 0}
    seed: 0
    configurations:
      a03: {alpha_edit: 0.3}       # name: overrides (RDP, task reward only unless a configuration says so)
      a09: {alpha_edit: 0.9}

Every configuration is one run (`rcgrpo.minibench.runs`: its own one-thread process, resumable), plus
the base model's evaluation; configurations can be appended to the plan and the study rerun: finished
runs are kept. A plan may withdraw configurations it listed (`withdrawn: {name: reason}`, e.g. a stage
stopped for time): they are not run, and stay in the tables with the reason and the learning curve their
run directory reached. `results.json` / `results.md` list every configuration run, none dropped: its overrides,
the final validation task reward and background PSNR (official CompBench metrics on the split) with the
differences to the base, LC-T, the training diagnostics, the learning curve (validation task reward
every `eval_every` steps on a second validation sample), and the wall time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..io.files import atomic_write_text

STUDY_DEFAULTS = dict(perturbation="rdp", w_acd=0.0)  # the study's runs: RDP, task reward only


def read_plan(path) -> dict:
    """The plan file, checked: `configurations` a mapping of names to RCGRPOConfig overrides."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--plan {str(path)!r} does not exist")
    try:
        plan = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--plan {str(path)!r} is not valid YAML ({exc})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("configurations"), dict) or not plan["configurations"]:
        raise ValueError(f"--plan {str(path)!r}: expected a mapping with a non-empty 'configurations' mapping")
    unknown = sorted(set(plan) - {"common", "eval", "seed", "configurations", "notes", "withdrawn"})
    if unknown:
        raise ValueError(f"--plan {str(path)!r}: unknown keys {unknown}")
    for name, overrides in plan["configurations"].items():
        if not isinstance(overrides, dict):
            raise ValueError(f"--plan {str(path)!r}: configuration {name!r} must be a mapping of overrides")
    withdrawn = plan.get("withdrawn") or {}
    if not isinstance(withdrawn, dict) or any(not isinstance(v, str) or not v.strip() for v in withdrawn.values()):
        raise ValueError(f"--plan {str(path)!r}: 'withdrawn' must map configuration names to a reason")
    stray = sorted(set(withdrawn) - set(plan["configurations"]))
    if stray:
        raise ValueError(f"--plan {str(path)!r}: withdrawn {stray} are not configurations of the plan")
    return plan


def plan_specs(plan: dict) -> list:
    """The base evaluation and one RunSpec per configuration (validated before anything runs)."""
    from .runs import RunSpec

    ev = dict(plan.get("eval") or {})
    common_eval = dict(eval_split=ev.get("split", "val"), eval_per_task=int(ev.get("per_task", 16)),
                       eval_seed=int(ev.get("seed", 0)))
    if common_eval["eval_split"] == "test":
        raise ValueError("a study chooses settings on the validation split: eval.split 'test' is refused "
                         "(the test split is for the confirmatory `rcgrpo ablate --eval-split test` run)")
    seed = int(plan.get("seed", 0))
    common = {**STUDY_DEFAULTS, **(plan.get("common") or {})}
    specs = [RunSpec(name="base", overrides=dict(model=common.get("model", "tiny-editor"), max_steps=0),
                     **common_eval)]
    for name, overrides in plan["configurations"].items():
        specs.append(RunSpec(name=str(name), seed=seed, overrides={**common, **overrides}, **common_eval))
    for spec in specs:
        spec.validate()
    return specs


def run_study(plan_path, output_dir, *, parallel: int = 2, log=print) -> dict:
    """Run every pending configuration of the plan, then write results.json and results.md."""
    from .runs import run_pool

    plan = read_plan(plan_path)
    specs = plan_specs(plan)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def partial(_spec, _result):  # rewrite the tables as each run lands
        write_results(plan, specs, out)

    withdrawn = plan.get("withdrawn") or {}
    run_pool([s for s in specs if s.name not in withdrawn], out, parallel=parallel, log=log, on_result=partial)
    results = write_results(plan, specs, out)
    results["wall_s"] = time.time() - started
    return results


def write_results(plan: dict, specs: list, out: Path) -> dict:
    """results.json / results.md from every finished run under `out` (pending ones are listed as such)."""
    from .runs import read_result

    base = read_result(out, specs[0])
    withdrawn = plan.get("withdrawn") or {}
    rows = []
    for spec in specs[1:]:
        result = read_result(out, spec)
        row = {"name": spec.name, "overrides": {k: v for k, v in spec.overrides.items()
                                                if (plan.get("common") or {}).get(k, STUDY_DEFAULTS.get(k)) != v},
               "result": result}
        if spec.name in withdrawn and result is None:
            row["withdrawn"] = withdrawn[spec.name]
            row["partial"] = _partial_run(out / "runs" / spec.name)
        rows.append(row)
    results = {"plan": plan, "base": base, "configurations": rows}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False))
    atomic_write_text(out / "results.md", format_study(results))
    return results


def _partial_run(run_dir: Path) -> dict | None:
    """Steps reached and learning curve of a run that was stopped (its metrics.jsonl), or None."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {"steps": len(rows), "curve": [{"step": r["step"], **{k: r[k] for k in r if k.startswith("eval/")}}
                                          for r in rows if any(k.startswith("eval/") for k in r)]}


def _metric(result: dict | None, key: str, which: str = "eval"):
    if not result or which not in result:
        return None
    return result[which]["metrics"].get(key)


def format_study(results: dict) -> str:
    base = results["base"]
    b_task, b_psnr, b_lct = (_metric(base, k) for k in ("task_reward", "PSNR", "LC-T"))
    plan = results["plan"]
    ev = plan.get("eval") or {}
    lines = ["# MiniBench validation study", "",
             f"Common settings (over the `minibench` preset, RDP, task reward only): `{plan.get('common') or {}}`; "
             f"seed {plan.get('seed', 0)}; evaluation: {3 * int(ev.get('per_task', 16))} examples of the "
             f"{ev.get('split', 'val')} split (seed {ev.get('seed', 0)}), official CompBench metrics at 512 px.", ""]
    if base:
        lines += [f"Base: task reward {b_task:.4f}, background PSNR {b_psnr:.2f} dB, LC-T {b_lct:.2f}.", ""]
    lines += ["| configuration | overrides | task reward | Δ task | PSNR | Δ PSNR | LC-T | EMA task | EMA Δ PSNR | "
              "within-std | approx_kl | wall min |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["configurations"]:
        r = row["result"]
        if r is None and "withdrawn" in row:
            reached = (row.get("partial") or {}).get("steps", 0)
            lines.append(f"| {row['name']} | `{row['overrides']}` | withdrawn at step {reached}: {row['withdrawn']} "
                         f"| | | | | | | | | |")
            continue
        if r is None:
            lines.append(f"| {row['name']} | `{row['overrides']}` | pending | | | | | | | | | |")
            continue
        task, psnr, lct = (_metric(r, k) for k in ("task_reward", "PSNR", "LC-T"))
        ema_task, ema_psnr = _metric(r, "task_reward", "eval_ema"), _metric(r, "PSNR", "eval_ema")
        means = (r.get("train") or {}).get("means", {})

        def f(v, d=4, sign=False):
            return "—" if v is None else (f"{v:+.{d}f}" if sign else f"{v:.{d}f}")

        lines.append(
            f"| {row['name']} | `{row['overrides']}` | {f(task)} | {f(None if b_task is None else task - b_task, 4, True)} "
            f"| {f(psnr, 2)} | {f(None if b_psnr is None or psnr is None else psnr - b_psnr, 2, True)} | {f(lct, 2)} "
            f"| {f(ema_task)} | {f(None if b_psnr is None or ema_psnr is None else ema_psnr - b_psnr, 2, True)} "
            f"| {f(means.get('reward_std_within_group'))} | {f(means.get('approx_kl'), 6)} | {r['wall_s'] / 60:.1f} |")
    curve0 = (base or {}).get("curve_base", {}).get("eval/task_reward")
    lines += ["", "Learning curves (validation task reward on a second validation sample, every `eval_every` steps"
              + (f"; the base model scores {curve0:.4f} on it" if curve0 is not None else "") + "):", ""]
    for row in results["configurations"]:
        r = row["result"]
        curve = (r or {}).get("train", {}).get("curve", []) or (row.get("partial") or {}).get("curve", [])
        if curve:
            points = ", ".join(f"{c['step']}: {c.get('eval/task_reward', float('nan')):.4f}" for c in curve)
            note = _curve_reward_note({**(plan.get('common') or {}), **row['overrides']})
            lines.append(f"- {row['name']}: {points}{note}")
    return "\n".join(lines) + "\n"


def _curve_reward_note(overrides: dict) -> str:
    """The learning curve scores the run's own training reward: say so where that is not the `minibench`
    preset's (the task reward)."""
    from ..train.config import preset

    task = preset("minibench")
    funcs = list(overrides.get("reward_funcs", task.reward_funcs))
    weights = list(overrides.get("reward_weights") or [1.0] * len(funcs))
    if funcs == list(task.reward_funcs) and weights == list(task.reward_weights or [1.0] * len(funcs)):
        return ""
    terms = " + ".join(f"{w:g} × {f}" for f, w in zip(funcs, weights))
    return f" (this run's training reward, {terms}: not on the task reward's scale)"


__all__ = ["format_study", "plan_specs", "read_plan", "run_study", "write_results"]
