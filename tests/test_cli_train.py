"""`rcgrpo train` from the command line: files users rely on (SPEC §10)."""
import json
import re

from rcgrpo.cli import main as cli_main

REQUIRED_KEYS = ("step", "loss", "reward_mean", "reward_std_within_group", "acd_mean", "background_drift", "time_s")


def test_train_tiny_writes_metrics_checkpoints_lora_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--group-size", "4", "--num-anchors", "2", "--num-inference-steps", "2", "--eval-size", "2",
              "--checkpoint-every", "1", "--report-to", "none"]
    assert cli_main(["train", "--preset", "tiny", "--max-steps", "2", "--seed", "3", "--output-dir", str(out),
                     "--report", *common]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"held-out reward: before -?\d+\.\d+ after -?\d+\.\d+", printed[-1]), printed[-1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(all(k in r for k in REQUIRED_KEYS) for r in rows)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "report" / "report.md").is_file() and (out / "report" / "reward_curve.png").is_file()
    assert cli_main(["train", "--resume", str(out), "--max-steps", "3"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    state = json.loads(sorted(out.glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["step"] == 3 and state["config"]["seed"] == 3


def test_resume_without_checkpoint_is_bad_input(tmp_path, capsys):
    assert cli_main(["train", "--resume", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_example_configs_are_valid():
    from pathlib import Path

    import yaml

    from rcgrpo.train.config import RCGRPOConfig

    root = Path(__file__).resolve().parents[1] / "examples"
    cfg = RCGRPOConfig.from_yaml(root / "kontext_512.yaml")
    assert cfg.resolution == 512 and cfg.group_size == 12
    acc = yaml.safe_load((root / "accelerate_multi_gpu.yaml").read_text())
    assert acc["distributed_type"] == "MULTI_GPU"
