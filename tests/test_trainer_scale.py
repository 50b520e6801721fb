"""Trainer behaviour that matters at real scale (issue 16), on the tiny pipeline in one process."""
import errno
import json

import pytest
import torch

import rcgrpo.editors.flux_kontext.attention as attention_module
from rcgrpo.cli import main as cli_main
from rcgrpo.editors.compare import perturbation_schemes
from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.editors.flux_kontext.text import prompt_token_mask
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.checkpoints import CheckpointWriteError, list_checkpoints
from rcgrpo.train.config import RCGRPOConfig, preset
from rcgrpo.train.trainer import RCGRPOTrainer


def config(tmp_path, **overrides):
    values = dict(group_size=4, num_anchors=2, groups_per_step=1, num_inference_steps=2, max_steps=2, train_size=4,
                  eval_size=0, reward_funcs=["redness"], reward_weights=[1.0], w_acd=0.5, acd_backend="torch",
                  distance_backend="torch", checkpoint_every=1, sample_every=0, report_to="none",
                  output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return preset("tiny", **values)


def trainer(cfg):
    return RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", redness_reward)], SquareDataset(4, size=32))


# ---------------------------------------------------------------- 1. ACD counts the instruction
def test_acd_weights_the_instructions_tokens_not_the_padding(tmp_path, monkeypatch):
    tr = trainer(config(tmp_path, max_sequence_length=64))
    instruction = tr.train_dataset[0].instruction
    weights = tr.acd_text_weights(instruction)
    mask = prompt_token_mask(tr.pipe, instruction, 64)
    n_real = int(mask.sum())
    assert weights.shape == (64,) and 3 < n_real < 40
    assert torch.equal(weights, mask) and weights[n_real:].abs().sum() == 0 and bool((weights[:n_real] == 1).all())

    calls = []
    real_op = attention_module.acd_attention

    def recording(q, k, v, text_len, image_len, **kwargs):
        out, mass = real_op(q, k, v, text_len, image_len, **kwargs)
        calls.append((q.clone(), k.clone(), text_len, image_len, kwargs.get("text_weights"), mass.clone()))
        return out, mass

    monkeypatch.setattr(attention_module, "acd_attention", recording)
    group = tr.rollout_group(0, 0, 0)
    assert calls and all(c[2] == 64 for c in calls)
    for q, k, text_len, image_len, w, mass in calls:
        assert w is not None and torch.equal(w[0].cpu(), mask)
        # independent: float64 softmax over the image keys of the real text queries only
        qd, kd = q.double()[:, :, :n_real], k.double()[:, :, text_len : text_len + image_len]
        probs = torch.softmax(qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        expected = probs.sum(dim=(1, 2)) / q.shape[1]
        torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-6)

    tr_all = trainer(config(tmp_path / "all", max_sequence_length=64, acd_text_tokens="all"))
    assert tr_all.acd_text_weights(instruction) is None
    group_all = tr_all.rollout_group(0, 0, 0)
    assert not torch.allclose(group.acd, group_all.acd)  # 64 − n_real padding queries change R_acd


# ---------------------------------------------------------------- 2. controlled ablation
def test_global_perturbation_uses_alpha_edit_unless_sigma_is_given():
    assert preset("tiny", perturbation="global").perturbation_scales() == (0.5, 0.5)
    assert preset("tiny", perturbation="global", global_sigma=0.2).perturbation_scales() == (0.2, 0.2)
    assert preset("tiny").perturbation_scales() == (0.5, 0.02)
    assert perturbation_schemes(0.4, 0.02)["global"] == (0.4, 0.4)
    with pytest.raises(ValueError, match="global_sigma"):
        RCGRPOConfig(global_sigma=1.5)


# ---------------------------------------------------------------- 4. resume that keeps its promises
def test_resume_refuses_a_lora_change_and_applies_a_learning_rate_change(tmp_path, capsys):
    common = ["--preset", "tiny", "--group-size", "4", "--num-anchors", "2", "--num-inference-steps", "2",
              "--eval-size", "0", "--train-size", "4", "--checkpoint-every", "1", "--report-to", "none",
              "--acd-backend", "torch"]
    run = tmp_path / "run"
    assert cli_main(["train", *common, "--max-steps", "2", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--lora-rank", "4", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_rank 8 → 4" in err[0] and "cannot change" in err[0]

    cfg = RCGRPOConfig.from_dict({**json.loads((list_checkpoints(run)[-1] / "trainer_state.json").read_text())
                                  ["config"], "learning_rate": 3e-3, "max_steps": 3})
    from rcgrpo.rewards.registry import reward_funcs_from_config

    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, reward_funcs_from_config(cfg), SquareDataset(4, size=32))
    assert tr.resume(str(run / "checkpoint-1"))  # a checkpoint directory works too
    assert tr.step == 1 and tr.resume_changes["learning_rate"] == (1e-2, 3e-3)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)
    tr.train()
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # still in use after steps


def test_resume_cuts_metrics_back_and_removes_half_pruned_checkpoints(tmp_path):
    cfg = config(tmp_path, max_steps=3, checkpoint_every=2, keep_checkpoints=5)
    tr = trainer(cfg)
    tr.train()
    run = tmp_path / "run"
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # a crash after step 3 was logged but before checkpoint-3 was complete:
    (run / "checkpoint-3" / "trainer_state.json").unlink()
    (run / "checkpoint-7").mkdir()  # a partial directory left by a kill during pruning
    again = trainer(cfg)
    assert again.resume() and again.step == 2
    again.train()
    assert not (run / "checkpoint-7").exists()
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_torch_save_on_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tr = trainer(config(tmp_path, max_steps=1))
    tr.train()
    real_save = torch.save

    def full(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills during the write
        real_save(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    tr.step = 2
    with pytest.raises(CheckpointWriteError, match="disk full.*earlier checkpoints are intact") as info:
        tr.save_checkpoint()
    assert isinstance(info.value, OSError) and info.value.errno == errno.EIO
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_a_real_full_disk_during_a_checkpoint(tmp_path):
    import shutil
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        tr = trainer(config(tmp_path, max_steps=1, output_dir=str(mnt / "run")))
        tr.train()
        filler = mnt / "filler"
        with open(filler, "wb") as fh:  # fill the disk, leaving less than a checkpoint needs
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        filler.write_bytes(filler.read_bytes()[:-8192])  # room for the small files, not for the state dicts
        tr.step = 2
        with pytest.raises(CheckpointWriteError, match="earlier checkpoints are intact"):
            tr.save_checkpoint()
        assert [p.name for p in list_checkpoints(mnt / "run")] == ["checkpoint-1"]
        assert tr.resume() and tr.step == 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


# ---------------------------------------------------------------- 5. signals a user can watch
def test_steps_log_policy_signals(tmp_path):
    tr = trainer(config(tmp_path, inner_epochs=2, checkpoint_every=0))
    metrics = tr.train_step()
    for key in ("policy_kl", "clip_fraction", "ratio_min", "ratio_max", "policy_entropy", "pi_old_anchor",
                "grad_norm", "reward_ema"):
        assert metrics[key] is not None, key
    assert metrics["ratio_min"] <= 1.0 + 1e-6 <= metrics["ratio_max"] + 2e-6
    assert metrics["ratio_max"] > metrics["ratio_min"]  # the second inner epoch sees a moved policy
    assert 0.0 <= metrics["policy_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert 0.0 <= metrics["pi_old_anchor"] <= 1.0
    assert metrics["policy_kl"] > 0 and metrics["reward_ema"] == pytest.approx(metrics["reward_mean"])


# ---------------------------------------------------------------- non-square images keep their aspect
def test_a_non_square_example_is_edited_at_its_aspect_ratio(tmp_path):
    from rcgrpo.editors.flux_kontext.resolution import edit_size

    image = torch.rand(3, 60, 100)
    mask = torch.zeros(60, 100)
    mask[10:30, 20:50] = 1
    item = {"image": image, "mask": mask, "instruction": "make the square red", "id": "wide"}
    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), config(tmp_path), [("redness", redness_reward)], [item])
    group = tr.rollout_group(0, 0, 0)
    h, w = group.images.shape[-2:]
    assert (h, w) == edit_size(60, 100, target=32, multiple=4) and w > h
    assert abs((w / h) / (100 / 60) - 1) < 0.15
    square = RCGRPOTrainer(tiny_kontext_pipeline(0), config(tmp_path / "sq", keep_aspect=False),
                           [("redness", redness_reward)], [item])
    assert square.rollout_group(0, 0, 0).images.shape[-2:] == (32, 32)


def test_edit_size_keeps_the_aspect_and_tiles_the_token_grid():
    from rcgrpo.editors.flux_kontext.resolution import edit_size

    assert edit_size(512, 512, target=512, multiple=16) == (512, 512)
    assert edit_size(600, 800, target=1024, multiple=16) == (880, 1184)  # Kontext's own bucket
    for height, width in [(37, 61), (700, 600), (400, 1000), (61, 37)]:
        for target, multiple in [(1024, 16), (512, 16), (64, 8), (32, 4)]:
            h, w = edit_size(height, width, target=target, multiple=multiple)
            assert h % multiple == 0 and w % multiple == 0
            assert abs(h * w / target**2 - 1) < 0.25
            assert (w > h) == (width > height)
