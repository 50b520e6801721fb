"""`rcgrpo ablate`, reduced: one seed, two steps, two examples per task; the plumbing end to end."""
import json

import pytest

from rcgrpo.cli import main as cli_main
from rcgrpo.minibench.ablate import VARIANTS, AblationConfig, RandomReward, summarize

pytestmark = pytest.mark.slow


def test_reduced_ablation_writes_a_complete_results_json(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert cli_main(["ablate", "--output-dir", str(out), "--seeds", "0", "--max-steps", "2", "--eval-per-task", "2",
                     "--train-size", "16", "--eval-size", "128"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"base", *VARIANTS}
    for variant in VARIANTS:
        for metric in ("task_reward", "LC-I", "LC-T", "PSNR", "SSIM"):
            assert results["table"][variant][metric]["mean"] is not None, (variant, metric)
        assert results["table"][variant]["train/background_drift"]["mean"] is not None
    assert [r["train"]["steps"] for r in results["runs"]] == [2] * len(VARIANTS)
    assert set(results["paired"]) >= {"rdp - global", "rdp_acd - rdp", "rdp_acd - base"}
    assert (out / "fig5.png").is_file() and "Paired differences" in (out / "results.md").read_text()
    assert results["protocol"]["eval_split"] == "val"  # the default: settings are chosen on val, never on test
    manifest = json.loads((out / "data" / "val-2x3-seed0" / "minibench.json").read_text())
    assert manifest["split"] == "val" and manifest["per_task"] == 2
    assert "of the val split" in (out / "results.md").read_text()
    assert "| rdp_acd |" in capsys.readouterr().out


def test_eval_split_option():
    assert AblationConfig(eval_split="test").eval_split == "test"
    with pytest.raises(ValueError, match="--eval-split"):
        AblationConfig(eval_split="train").validate()


def test_random_reward_is_reproducible_noise():
    import torch

    a, b = RandomReward(3), RandomReward(3)
    x = torch.zeros(5, 3, 8, 8)
    first = a(x, x, None, None, None)
    assert torch.equal(first, b(x, x, None, None, None)) and not torch.equal(first, a(x, x, None, None, None))
    assert first.shape == (5,) and 0 <= float(first.min()) and float(first.max()) <= 1


def test_paired_differences_are_by_seed():
    cfg = AblationConfig(seeds=[0, 1, 2], variants=["global", "rdp"])
    run = lambda v, s, r: {"variant": v, "seed": s, "metrics": {"task_reward": r}, "train": {}}  # noqa: E731
    runs = [run("global", 0, 0.1), run("global", 1, 0.2), run("global", 2, 0.3),
            run("rdp", 0, 0.2), run("rdp", 1, 0.3), run("rdp", 2, 0.5)]
    res = summarize(cfg, {"metrics": {"task_reward": 0.05}}, runs)
    d = res["paired"]["rdp - global"]["task_reward"]
    assert d["per_seed"] == pytest.approx([0.1, 0.1, 0.2]) and d["mean"] == pytest.approx(4 / 30)
    assert res["table"]["rdp"]["task_reward"]["mean"] == pytest.approx(1 / 3)


def test_the_test_split_needs_a_committed_unchanged_regime_file(tmp_path):
    """The confirmatory run's protocol is fixed in a commit first: the test split is refused while the regime
    file is untracked or modified, and the results record the commit that last changed it."""
    import subprocess

    from rcgrpo.minibench.ablate import protocol_record

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    regime = tmp_path / "regime.yaml"
    regime.write_text("alpha_edit: 0.6\nmax_steps: 3\n")
    cfg = AblationConfig(regime=str(regime), eval_split="test")
    with pytest.raises(ValueError, match="commit the --regime file"):
        protocol_record(cfg)  # untracked
    git("add", "regime.yaml")
    git("commit", "-qm", "protocol")
    record = protocol_record(cfg)
    assert record["protocol_commit"] == git("rev-parse", "HEAD") and record["split"] == "test"
    assert record["test_examples"] == 3 * cfg.eval_per_task
    assert record["regime_overrides"] == {"alpha_edit": 0.6, "max_steps": 3}
    regime.write_text("alpha_edit: 0.9\nmax_steps: 3\n")  # changed after the commit
    with pytest.raises(ValueError, match="commit the --regime file"):
        protocol_record(cfg)
    assert protocol_record(AblationConfig(regime=str(regime)))["split"] == "val"  # val: no commit needed
