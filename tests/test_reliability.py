"""Faults and bad input: kills, signals, full disks, corrupt files, non-finite numbers."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcgrpo.cli import main as cli_main
from rcgrpo.train.config import preset
from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.checkpoints import list_checkpoints
from rcgrpo.train.trainer import RCGRPOTrainer
from rcgrpo_kernels import acd_attention, region_sq_dists

REPO = Path(__file__).resolve().parents[1]


def tiny_config(out, **overrides):
    values = dict(group_size=4, num_anchors=2, groups_per_step=1, num_inference_steps=2, max_steps=3, train_size=4,
                  eval_size=2, reward_funcs=["redness"], reward_weights=[1.0], w_acd=0.0, distance_backend="torch",
                  checkpoint_every=1, sample_every=0, report_to="none", output_dir=str(out))
    values.update(overrides)
    return preset("tiny", **values)


def trainer_for(cfg):
    return RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", redness_reward)],
                         SquareDataset(cfg.train_size, size=32))


# ---------------------------------------------------------------- checkpoints under faults
def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tr = trainer_for(tiny_config(tmp_path / "run", max_steps=1))
    tr.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("scheduler.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    tr.train_step()
    tr.step += 1
    with pytest.raises(OSError, match="earlier checkpoints are intact"):
        tr.save_checkpoint()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    fresh = trainer_for(tiny_config(tmp_path / "run", max_steps=1))
    assert fresh.resume() and fresh.step == 1


def _train_script(tmp_path, out, *, max_steps, slow_save_step=None, checkpoint_every=1):
    script = tmp_path / "train_job.py"
    script.write_text(f"""
import sys, time, torch
from pathlib import Path
from rcgrpo.train.config import preset
from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.trainer import RCGRPOTrainer
slow = {slow_save_step!r}
if slow is not None:
    real_save = torch.save
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if str(f).endswith("optimizer.pt") and f".checkpoint-{{slow}}." in str(f):
            print("SAVING", flush=True)
            time.sleep(60)
    torch.save = save
cfg = preset("tiny", group_size=4, num_anchors=2, groups_per_step=1, num_inference_steps=2, max_steps={max_steps},
             train_size=4, reward_funcs=["redness"], reward_weights=[1.0], w_acd=0.0, distance_backend="torch",
             checkpoint_every={checkpoint_every}, keep_checkpoints=5, sample_every=0, report_to="none",
             output_dir={str(out)!r})
tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", redness_reward)], SquareDataset(4, size=32))
tr.resume()
print("START", tr.step, flush=True)
tr.train()
print("STOPPED" if tr.stopped_by_signal else "DONE", tr.step, flush=True)
""")
    return script


def _spawn(script):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _wait_for_line(proc, prefix, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"process ended before {prefix!r}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {prefix!r} within {timeout} s")


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_resumes_from_last_complete(tmp_path):
    out = tmp_path / "run"
    proc = _spawn(_train_script(tmp_path, out, max_steps=3, slow_save_step=2))
    try:
        _wait_for_line(proc, "SAVING")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert any(p.name.startswith(".checkpoint-2.tmp-") for p in out.iterdir())  # the torn one, ignored
    resumed = _spawn(_train_script(tmp_path, out, max_steps=3))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    assert "START 1" in stdout and "DONE 3" in stdout
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # stale temp dirs cleaned


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
    out = tmp_path / "run"
    proc = _spawn(_train_script(tmp_path, out, max_steps=1000, checkpoint_every=0))
    try:
        _wait_for_line(proc, "START")
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "STOPPED" in stdout
    ckpts = list_checkpoints(out)
    assert ckpts, "the trainer must save before exiting"
    step = json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"]
    assert step >= 1 and step < 1000


# ---------------------------------------------------------------- numerical guards
def test_non_finite_updates_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    import rcgrpo.train.update as trainer_module  # where the trainer calls grpo_loss

    real_loss = trainer_module.grpo_loss

    def exploding_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("inf"), stats  # the trainer asks for return_stats=True

    monkeypatch.setattr(trainer_module, "grpo_loss", exploding_loss)
    tr = trainer_for(tiny_config(tmp_path / "run", max_steps=5, max_nonfinite_steps=2, checkpoint_every=0))
    before = torch.cat([p.detach().reshape(-1).clone() for p in tr.lora_parameters])
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        metrics = tr.train_step()
    assert metrics["skipped_update"] and tr.nonfinite_in_row == 1
    assert torch.equal(before, torch.cat([p.detach().reshape(-1) for p in tr.lora_parameters]))
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps"):
        with pytest.warns(UserWarning):
            tr.train_step()


# ---------------------------------------------------------------- CLI bad input (exit 2, one line, no traceback)
def _cli(capsys, *argv):
    code = cli_main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["edit", "--image", "missing.png", "--mask", "missing.png"], "no such file"),
        (["edit", "--image", "{corrupt}", "--mask", "{corrupt}"], "is not a readable image"),
        (["edit", "--image", "{img}", "--mask", "{small_mask}"], "does not match the image size"),
        (["edit", "--image", "{img}", "--mask", "{empty_mask}"], "selects no token"),
        (["edit", "--image", "{img}", "--mask", "{full_mask}"], "covers every token"),
        (["edit", "--image", "{img}"], "--image and --mask must be given together"),
        (["edit", "--lora", "{truncated_lora}"], "not a valid safetensors file"),
        (["edit", "--lora", "{pickle_lora}"], "is not a .safetensors file"),
        (["train", "--preset", "tiny", "--max-steps", "x"], "--max-steps: expected int"),
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", "--config", "{bad_yaml}"], "unknown keys"),
        (["train", "--preset", "tiny", "--output-dir", "{file_as_dir}"], "is not writable"),
        (["nonsense"], "invalid choice"),
        (["edit", "--model", "{missing_model}"], "no such directory"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, fragment):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(img)
    masks = {"small_mask": (16, 16, 255), "empty_mask": (32, 32, 0), "full_mask": (32, 32, 255)}
    paths = {"img": str(img)}
    for name, (w, h, v) in masks.items():
        Image.new("L", (w, h), v).save(tmp_path / f"{name}.png")
        paths[name] = str(tmp_path / f"{name}.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths["corrupt"] = str(tmp_path / "corrupt.png")
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    paths["truncated_lora"] = str(lora_dir)
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04K\x01.")
    paths["pickle_lora"] = str(tmp_path / "weights.bin")
    (tmp_path / "bad.yaml").write_text("learning_rte: 1.0\n")
    paths["bad_yaml"] = str(tmp_path / "bad.yaml")
    (tmp_path / "a_file").write_text("x")
    paths["file_as_dir"] = str(tmp_path / "a_file" / "run")
    paths["missing_model"] = str(tmp_path / "no" / "such" / "model")
    argv = [a.format(**paths) if "{" in a else a for a in argv]
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def test_cli_debug_shows_traceback(capsys):
    code, err = _cli(capsys, "--debug", "edit", "--image", "missing.png", "--mask", "missing.png")
    assert code == 2 and "Traceback" in err


# ---------------------------------------------------------------- ops: property-based input validation
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 3), seq=st.integers(1, 40), dim=st.sampled_from([4, 8, 16]),
    text_len=st.integers(-1, 45), image_len=st.integers(-1, 45), backend=st.sampled_from(["torch", "auto"]),
)
def test_acd_attention_accepts_valid_and_rejects_invalid_layouts(batch, heads, seq, dim, text_len, image_len, backend):
    gen = torch.Generator().manual_seed(seq * 7 + dim)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(3))
    valid = text_len >= 1 and image_len >= 1 and text_len + image_len <= seq
    if not valid:
        with pytest.raises(ValueError):
            acd_attention(q, k, v, text_len, image_len, backend=backend)
        return
    out, mass = acd_attention(q, k, v, text_len, image_len, backend=backend)
    assert out.shape == q.shape and mass.shape == (batch, image_len)
    torch.testing.assert_close(mass.sum(-1), torch.full((batch,), float(text_len)), rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(1, 3), group=st.integers(1, 5), anchors=st.integers(1, 3), dim=st.integers(1, 70),
    y_steps_delta=st.integers(-1, 1), mask_delta=st.integers(-1, 1), mask_high=st.sampled_from([1.0, 1.5]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]), backend=st.sampled_from(["torch", "auto"]),
)
def test_region_sq_dists_accepts_valid_and_rejects_invalid(steps, group, anchors, dim, y_steps_delta, mask_delta,
                                                           mask_high, dtype, backend):
    x = torch.randn(steps, group, dim).to(dtype)
    y = torch.randn(max(steps + y_steps_delta, 1), anchors, dim).to(dtype)
    mask = torch.rand(max(dim + mask_delta, 1)) * mask_high
    valid = (y.shape[0] == steps and mask.shape[0] == dim and bool(mask.max() <= 1) and dtype != torch.int64)
    if not valid:
        with pytest.raises(ValueError):
            region_sq_dists(x, y, mask, backend=backend)
        return
    S = region_sq_dists(x, y, mask, backend=backend)
    assert S.shape == (steps, anchors, group, 2) and bool(torch.isfinite(S).all()) and bool((S >= 0).all())


def test_no_pickle_loading_in_the_package():
    sources = list((REPO / "rcgrpo").glob("*.py")) + list((REPO / "kernels").glob("*.py"))
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_reward_server_credentials_never_reach_messages_or_checkpoints(tmp_path):
    from rcgrpo.rewards import EditScoreClient, RewardServerError, redact_url

    assert redact_url("http://alice:s3cret@127.0.0.1:9/score") == "http://***@127.0.0.1:9/score"
    client = EditScoreClient("http://alice:s3cret@127.0.0.1:9", timeout=0.5, retries=0)
    with pytest.raises(RewardServerError) as err:
        client.health()
    assert "s3cret" not in str(err.value) and "alice" not in str(err.value)
    tr = trainer_for(tiny_config(tmp_path / "run", max_steps=1, editscore_url="http://alice:s3cret@127.0.0.1:9"))
    tr.train()
    saved = (list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json").read_text()
    assert "s3cret" not in saved
