"""`rcgrpo study` and the run pool, reduced: a plan of two configurations, a few steps, two examples per task."""
import json

import pytest

from rcgrpo.cli import main as cli_main
from rcgrpo.minibench.runs import RunSpec, read_result
from rcgrpo.minibench.study import plan_specs, read_plan

pytestmark = pytest.mark.slow

PLAN = """
common: {max_steps: 2, eval_every: 1, train_size: 16, checkpoint_every: 1}
eval: {split: val, per_task: 1, seed: 0}
seed: 0
configurations:
  small_alpha: {alpha_edit: 0.3}
  ema: {alpha_edit: 0.9, ema_decay: 0.5}
  stopped: {alpha_edit: 0.6}
withdrawn:
  stopped: stopped for time
"""


def test_reduced_study_runs_every_configuration_once_and_keeps_finished_runs(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    out = tmp_path / "study"
    partial = out / "runs" / "stopped"  # a withdrawn configuration's run, stopped after 3 steps
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward_mean": 0.5,
                                                               **({"eval/task_reward": 0.6} if i == 2 else {})}) + "\n"
                                                   for i in (1, 2, 3)))
    assert cli_main(["study", "--plan", str(plan), "--output-dir", str(out), "--parallel", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["eval"]["metrics"]["task_reward"] is not None
    rows = {r["name"]: r for r in results["configurations"]}
    assert set(rows) == {"small_alpha", "ema", "stopped"}
    stopped = rows.pop("stopped")  # withdrawn: listed with its reason and partial curve, never run
    assert stopped["result"] is None and stopped["withdrawn"] == "stopped for time"
    assert stopped["partial"] == {"steps": 3, "curve": [{"step": 2, "eval/task_reward": 0.6}]}
    assert not (partial / "result.json").exists() and not (partial / "spec.json").exists()
    for row in rows.values():
        assert row["result"]["train"]["steps"] == 2
        assert [c["step"] for c in row["result"]["train"]["curve"]] == [1, 2]
        assert row["result"]["eval"]["examples"] == 3
        assert row["result"]["threads"] == 1  # one thread per run process
    assert "eval_ema" in rows["ema"]["result"] and "eval_ema" not in rows["small_alpha"]["result"]
    assert rows["ema"]["overrides"] == {"alpha_edit": 0.9, "ema_decay": 0.5}
    table = (out / "results.md").read_text()
    assert "| small_alpha |" in table and "| ema |" in table and "Learning curves" in table
    assert "| stopped | `{'alpha_edit': 0.6}` | withdrawn at step 3: stopped for time |" in table
    assert "- stopped: 2: 0.6000" in table
    stamp = (out / "runs" / "ema" / "result.json").stat().st_mtime_ns
    # a second call finds every run finished and reruns none
    assert cli_main(["study", "--plan", str(plan), "--output-dir", str(out), "--parallel", "1"]) == 0
    assert (out / "runs" / "ema" / "result.json").stat().st_mtime_ns == stamp


def test_plan_checks_refuse_bad_plans_before_any_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("configurations: {x: {alpha_edit: 2.0}}\n")
    with pytest.raises(ValueError, match="alpha_edit"):
        plan_specs(read_plan(bad))
    bad.write_text("configurations: {x: {no_such_field: 1}}\n")
    with pytest.raises(ValueError, match="no_such_field"):
        plan_specs(read_plan(bad))
    bad.write_text("eval: {split: test}\nconfigurations: {x: {}}\n")
    with pytest.raises(ValueError, match="validation split"):
        plan_specs(read_plan(bad))
    bad.write_text("configurations: {x: {}}\nwithdrawn: {y: time}\n")
    with pytest.raises(ValueError, match=r"withdrawn \['y'\]"):
        read_plan(bad)
    bad.write_text("configurations: {x: {}}\nwithdrawn: {x: ''}\n")
    with pytest.raises(ValueError, match="reason"):
        read_plan(bad)
    bad.write_text("configurations: []\n")
    with pytest.raises(ValueError, match="configurations"):
        read_plan(bad)
    assert cli_main(["study", "--plan", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "o")]) == 2


def test_a_result_written_for_another_spec_is_not_reused(tmp_path):
    spec = RunSpec(name="a", overrides={"max_steps": 3})
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "result.json").write_text(json.dumps({"spec": RunSpec(name="a").to_dict()}))
    assert read_result(tmp_path, spec) is None
    (tmp_path / "runs" / "a" / "result.json").write_text(json.dumps({"spec": spec.to_dict(), "x": 1}))
    assert read_result(tmp_path, spec)["x"] == 1


def test_a_curve_of_another_training_reward_says_so():
    """The learning curve scores each run's training reward; a run trained on a mixture is labelled."""
    from rcgrpo.minibench.study import format_study

    def withdrawn(name, overrides):
        return {"name": name, "overrides": overrides, "result": None, "withdrawn": "for time",
                "partial": {"steps": 2, "curve": [{"step": 2, "eval/task_reward": 1.5}]}}

    results = {"plan": {}, "base": None, "configurations": [
        withdrawn("mixed", {"reward_funcs": ["minibench", "background_psnr"], "reward_weights": [1.0, 0.03]}),
        withdrawn("plain", {"alpha_edit": 0.6})]}
    lines = {line.split(":")[0]: line for line in format_study(results).splitlines() if line.startswith("- ")}
    assert lines["- mixed"].endswith("(this run's training reward, 1 × minibench + 0.03 × background_psnr: "
                                     "not on the task reward's scale)")
    assert lines["- plain"] == "- plain: 2: 1.5000"
