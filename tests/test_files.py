"""Files users rely on: written atomically, readable under the user's umask, the run directory records
what produced it."""
import json
import os
import stat

import pytest
import torch
import yaml

from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.io.files import atomic_directory, atomic_write_text, recover_interrupted_replace, replace_directory
from rcgrpo.io.images import save_image
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.config import preset
from rcgrpo.train.trainer import RCGRPOTrainer


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.json", "{}")
    save_image(torch.rand(3, 8, 8), tmp_path / "img.png")
    with atomic_directory(tmp_path / "dir") as d:
        (d / "f.txt").write_text("x")
    assert mode(tmp_path / "a.json") == 0o644 and mode(tmp_path / "img.png") == 0o644
    assert mode(tmp_path / "dir") == 0o755 and mode(tmp_path / "dir" / "f.txt") == 0o644
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.json", "{}")
    assert mode(tmp_path / "private.json") == 0o600


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "d") as d:
            (d / "x").write_text("half")
            raise RuntimeError("boom")
    from rcgrpo.io.files import atomic_file

    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.txt") as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_crash_between_the_two_renames_is_repaired(tmp_path):
    final = tmp_path / "lora"
    final.mkdir()
    (final / "w").write_text("v1")
    new = tmp_path / "new"
    new.mkdir()
    (new / "w").write_text("v2")
    os.rename(final, tmp_path / ".lora.old-123-abcd")  # the first rename of replace_directory, then a kill
    (tmp_path / ".lora.tmp-123-abcd").mkdir()
    assert recover_interrupted_replace(tmp_path) == [final]
    assert (final / "w").read_text() == "v1" and not list(tmp_path.glob(".lora.*"))
    replace_directory(new, final)
    assert (final / "w").read_text() == "v2"


def test_the_run_directory_records_config_versions_and_commit(tmp_path, umask_022):
    cfg = preset("tiny", group_size=4, num_anchors=2, num_inference_steps=2, max_steps=1, train_size=2, eval_size=0,
                 reward_funcs=["redness"], reward_weights=[1.0], w_acd=0.0, checkpoint_every=0, report_to="none",
                 output_dir=str(tmp_path / "run"), editscore_url="http://user:secret@127.0.0.1:9")
    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", redness_reward)], SquareDataset(2, size=32))
    tr.train()
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["max_steps"] == 1 and saved["group_size"] == 4 and "secret" not in (run / "config.yaml").read_text()
    info = json.loads((run / "run_info.json").read_text())["starts"][-1]
    assert info["versions"]["torch"] == torch.__version__ and info["from_step"] == 0 and info["world_size"] == 1
    assert info["rcgrpo_git_commit"] is None or len(info["rcgrpo_git_commit"]) >= 40
    for path in [run / "config.yaml", run / "metrics.jsonl", run / "lora" / "pytorch_lora_weights.safetensors",
                 *(run / "checkpoint-1").iterdir()]:
        assert mode(path) == 0o644, path
