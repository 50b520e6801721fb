"""The trainer end to end on the tiny offline pipeline (CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rcgrpo.train.config import RCGRPOConfig, preset
from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.checkpoints import list_checkpoints
from rcgrpo.train.trainer import RCGRPOTrainer

REPO = Path(__file__).resolve().parents[1]


def small_config(tmp_path, **overrides):
    values = dict(
        group_size=4, num_anchors=2, groups_per_step=1, num_inference_steps=2, max_steps=2, train_size=4, eval_size=2,
        reward_funcs=["redness"], reward_weights=[1.0], w_acd=0.5, acd_backend="torch", distance_backend="torch",
        checkpoint_every=0, sample_every=0, report_to="none", output_dir=str(tmp_path / "run"), learning_rate=1e-2,
    )
    values.update(overrides)
    return preset("tiny", **values)


def make_trainer(cfg, pipe=None):
    pipe = pipe or tiny_kontext_pipeline(0)
    data = SquareDataset(cfg.train_size, size=cfg.resolution, seed=cfg.seed)
    held = SquareDataset(cfg.eval_size, size=cfg.resolution, seed=999)
    return RCGRPOTrainer(pipe, cfg, [("redness", redness_reward)], data, held)


def lora_vector(trainer):
    return torch.cat([p.detach().reshape(-1).clone() for p in trainer.lora_parameters])


def test_only_lora_parameters_train(tmp_path):
    tr = make_trainer(small_config(tmp_path))
    names = [n for n, p in tr.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in tr.transformer.named_parameters() if "lora_" not in n}
    before = lora_vector(tr)
    tr.train_step()
    after = {n: p for n, p in tr.transformer.named_parameters() if "lora_" not in n}
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert not torch.equal(before, lora_vector(tr))


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    cfg = small_config(tmp_path, w_acd=0.0, max_grad_norm=0.0, learning_rate=3e-3, clip_eps=100.0)
    tr = make_trainer(cfg)
    groups = [tr.rollout_group(0, 0, 0)]
    tr.compute_advantages(groups)
    losses = []
    for _ in range(6):
        tr.optimizer.zero_grad()
        stats = tr.group_loss_backward(groups[0], 0, 0, 1.0)
        losses.append(stats["loss"])
        tr.optimizer.step()
    assert losses[0] == pytest.approx(-float(groups[0].advantages.mean()), abs=1e-5)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_metrics_checkpoints_and_lora_files(tmp_path):
    cfg = small_config(tmp_path, max_steps=3, checkpoint_every=1, keep_checkpoints=2, sample_every=3, acd_layers=4)
    tr = make_trainer(cfg)
    tr.train()
    run = Path(cfg.output_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "reward_mean", "reward_std_within_group", "acd_mean", "background_drift", "time_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert (run / "samples" / "step-000003.png").is_file() and (run / "samples" / "acd-step-000003.png").is_file()
    weights = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") and "lora_" in k for k in weights)


def test_saved_lora_loads_into_stock_pipeline_with_identical_output(tmp_path):
    cfg = small_config(tmp_path, max_steps=2)
    tr = make_trainer(cfg)
    tr.train()
    stock = tiny_kontext_pipeline(0)
    stock.load_lora_weights(str(Path(cfg.output_dir) / "lora"))
    kw = dict(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), prompt="make the square red",
              height=32, width=32, num_inference_steps=3, guidance_scale=2.5, max_area=1024, _auto_resize=False,
              max_sequence_length=16, output_type="pt")
    ours = tr.pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    theirs = stock(**kw, generator=torch.Generator().manual_seed(0)).images
    base = tiny_kontext_pipeline(0)(**kw, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert (ours - base).abs().max() > 0  # the LoRA changed the edit


def test_resume_is_bit_exact(tmp_path):
    straight = make_trainer(small_config(tmp_path / "a", max_steps=4))
    straight.train()
    cfg = small_config(tmp_path / "b", max_steps=2)
    first = make_trainer(cfg)
    first.train()
    resumed = make_trainer(cfg.replace(max_steps=4))
    assert resumed.resume()
    assert resumed.step == 2
    resumed.train()
    assert torch.equal(lora_vector(straight), lora_vector(resumed))
    a = (Path(straight.output_dir) / "metrics.jsonl").read_text().splitlines()
    b = (Path(resumed.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in a] == [json.loads(x)["loss"] for x in b]


def test_bad_example_stops_or_is_skipped(tmp_path):
    data = SquareDataset(2, size=32)
    data.examples[1].mask = torch.zeros(32, 32)  # empty edit region
    cfg = small_config(tmp_path)
    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", redness_reward)], data)
    with pytest.raises(ValueError, match="square-1.*no token"):
        tr.rollout_group(0, 1, 0)
    tr_skip = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg.replace(skip_bad_examples=True),
                            [("redness", redness_reward)], data)
    with pytest.warns(UserWarning, match="skipping"):
        assert tr_skip.rollout_group(0, 1, 0) is None
    assert tr_skip.skipped_examples == 1


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_reward_policy(tmp_path, policy):
    def nan_reward(edited, *_):
        out = torch.zeros(edited.shape[0])
        out[1] = float("nan")
        return out

    cfg = small_config(tmp_path, bad_reward_policy=policy)
    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("nan_reward", nan_reward)], SquareDataset(2, size=32))
    if policy == "stop":
        with pytest.raises(RuntimeError, match="reward 'nan_reward' returned non-finite values at indices \\[1\\]"):
            tr.rollout_group(0, 0, 0)
    else:
        with pytest.warns(UserWarning, match="skipping group"):
            assert tr.rollout_group(0, 0, 0) is None
        assert tr.skipped_groups == 1


def test_wrong_length_reward_rejected(tmp_path):
    cfg = small_config(tmp_path)
    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("short", lambda e, *_: torch.zeros(2))], SquareDataset(2, size=32))
    with pytest.raises(RuntimeError, match=r"reward 'short' returned shape \(2,\); expected \[4\]"):
        tr.rollout_group(0, 0, 0)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(group_size=1), "group_size"),
        (dict(num_anchors=4, group_size=4), "num_anchors"),
        (dict(perturbation="local"), "perturbation"),
        (dict(train_timesteps="1.5"), "fraction"),
        (dict(learning_rate="fast"), "learning_rate: expected float"),
        (dict(resolution=40), "multiple of 16"),
    ],
)
def test_bad_config_values(changes, message):
    with pytest.raises(ValueError, match=message):
        RCGRPOConfig(**changes)


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("group_sise: 4\n")
    with pytest.raises(ValueError, match=r"unknown keys \['group_sise'\]"):
        RCGRPOConfig.from_yaml(bad)
    bad.write_text("group_size: four\n")
    with pytest.raises(ValueError, match="group_size: expected int"):
        RCGRPOConfig.from_yaml(bad)
    bad.write_text("!!python/object:os.system {}\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        RCGRPOConfig.from_yaml(bad)


def test_ablation_switch_global_perturbation_changes_background_drift(tmp_path):
    rdp = make_trainer(small_config(tmp_path / "r", group_size=6, num_anchors=2, alpha_edit=0.3))
    glob = make_trainer(small_config(tmp_path / "g", group_size=6, num_anchors=2, perturbation="global", global_sigma=0.3))
    g_rdp = rdp.rollout_group(0, 0, 0)
    g_glob = glob.rollout_group(0, 0, 0)
    assert float(g_rdp.background_drift.mean()) < 0.5 * float(g_glob.background_drift.mean())


def _run_torchrun(tmp_path, nproc, groups, out):
    script = tmp_path / f"dist_{nproc}.py"
    script.write_text(
        "import torch, sys\n"
        "from rcgrpo.train.config import preset\n"
        "from rcgrpo.data.synthetic import SquareDataset, redness_reward\n"
        "from rcgrpo.testing import tiny_kontext_pipeline\n"
        "from rcgrpo.train.trainer import RCGRPOTrainer\n"
        f"cfg = preset('tiny', group_size=4, num_anchors=2, groups_per_step={groups}, num_inference_steps=2, max_steps=2,"
        " reward_funcs=['redness'], reward_weights=[1.0], w_acd=0.5, acd_backend='torch', distance_backend='torch',"
        f" checkpoint_every=0, sample_every=0, report_to='none', output_dir={str(out)!r}, train_size=4, max_grad_norm=0.0)\n"
        "tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [('redness', redness_reward)], SquareDataset(4, size=32))\n"
        "tr.train()\n"
        "if tr.accelerator.is_main_process:\n"
        "    torch.save(torch.cat([p.detach().reshape(-1) for p in tr.lora_parameters]), "
        f"{str(out / 'lora_vector.pt')!r})\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + nproc + os.getpid() % 1000), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "lora_vector.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_one_group_equal_one_process_two_groups(tmp_path):
    one = _run_torchrun(tmp_path, 1, 2, tmp_path / "one")
    two = _run_torchrun(tmp_path, 2, 1, tmp_path / "two")
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-7)
