"""`rcgrpo minibench make` / `write_minibench`: a held-out MiniBench set in the official CompBench layout."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rcgrpo.cli import main as cli_main
from rcgrpo.eval.compbench import CompBenchDataset
from rcgrpo.eval.evaluate import evaluate
from rcgrpo.minibench.export import MANIFEST, write_minibench
from rcgrpo.minibench.reward import minibench_reward
from rcgrpo.minibench.tasks import MiniBenchDataset, example_seed, split_of_seed
from rcgrpo.rewards import PSNR_CAP_DB

PER_TASK, SEED, SIZE = 3, 7, 64  # at 64 px the mask margin (4 px) exceeds the 2 px of eval's bicubic upscale


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return write_minibench(tmp_path_factory.mktemp("mb") / "set", PER_TASK, SEED, size=SIZE)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _u8(t):
    return (t.clamp(0, 1) * 255.0).round().to(torch.uint8)


def test_the_export_is_a_function_of_the_seed(exported, tmp_path):
    again = write_minibench(tmp_path / "again", PER_TASK, SEED, size=SIZE)
    files = _files(exported)
    assert files == _files(again)
    assert len([n for n in files if n.endswith(".png")]) == 3 * 3 * PER_TASK
    other = _files(write_minibench(tmp_path / "other", PER_TASK, SEED + 1, size=SIZE))
    assert other.keys() == files.keys()  # same names, different examples
    assert sum(other[n] != files[n] for n in files if "/input_image/" in n) == 3 * PER_TASK
    manifest = json.loads(files[MANIFEST])
    assert manifest["split"] == "val" and manifest["seed"] == SEED and manifest["size"] == SIZE
    assert manifest["counts"] == {"add": PER_TASK, "remove": PER_TASK, "replace": PER_TASK}
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_compbench_reads_back_the_generators_examples(exported):
    ds = CompBenchDataset(exported)
    assert ds.tasks == ("add", "remove", "replace") and ds.task_counts() == {t: PER_TASK for t in ds.tasks}
    reference = MiniBenchDataset(per_task=PER_TASK, split="val", seed=SEED, size=SIZE)
    assert len(ds) == len(reference)
    for rec, ex in zip(ds.records, reference):
        assert rec.task == ex.task and rec.id == f"{ex.task}/{ex.example_id}.png"
        assert rec.instruction == ex.instruction and rec.caption == ex.caption
        assert rec.extra["minibench_id"] == ex.example_id and rec.extra["minibench"] == ex.spec
        # held out: the example seed is the generator's val seed, never a train or test seed
        assert rec.extra["split"] == "val" and split_of_seed(rec.extra["seed"]) == "val"
        assert rec.extra["seed"] == example_seed(SEED, "val", int(ex.example_id.rsplit("-", 1)[1]), ex.task)
        loaded = ds.load(rec)
        assert torch.equal(_u8(loaded.image), _u8(ex.image))
        assert torch.equal(loaded.mask, ex.mask)  # L 0/255 → exactly the generator's 0/1 mask
        with Image.open(rec.mask_path) as m:
            assert m.mode == "L" and set(np.unique(np.asarray(m)).tolist()) == {0, 255}
        with Image.open(rec.ground_truth_path) as g:
            gt = torch.from_numpy(np.array(g.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(gt, _u8(ex.target))
        assert loaded.metadata["minibench"] == ex.spec and loaded.metadata["caption"] == ex.caption


def test_the_programmatic_reward_scores_exported_examples(exported):
    ds = CompBenchDataset(exported)
    examples = [ds.load(r) for r in ds.records]
    sources = torch.stack([e.image for e in examples])
    masks = torch.stack([e.mask for e in examples])[:, None]
    truths = torch.stack([torch.from_numpy(np.asarray(e.load_ground_truth(), dtype=np.float32) / 255.0).permute(2, 0, 1)
                          for e in examples])
    meta = [e.metadata for e in examples]
    prompts = [e.instruction for e in examples]
    gt = minibench_reward(truths, sources, masks, prompts, meta)
    src = minibench_reward(sources, sources, masks, prompts, meta)
    assert bool((gt > src + 0.2).all()), (gt, src)


def test_eval_scores_ground_truths_as_perfect_backgrounds(exported, tmp_path):
    outputs = tmp_path / "outputs"
    for task in ("add", "remove", "replace"):
        shutil.copytree(exported / "tasks" / task / "edited_image", outputs / task)
    results = evaluate(data=exported, output_dir=tmp_path / "eval", outputs_dir=outputs, clip_model="tiny-clip",
                       log=None)
    assert len(results["examples"]) == 3 * PER_TASK
    for row in results["examples"]:
        assert row["PSNR"] == PSNR_CAP_DB, row  # the ground truth keeps the source's background exactly
        assert row["SSIM"] == pytest.approx(1.0, abs=1e-4), row  # float32 SSIM of equal images (E[x²] − μ²)
        assert row["LC-I"] == pytest.approx(1.0, abs=1e-5), row  # edit crop = ground-truth crop
        assert row["LC-T"] > 0.0
    assert results["settings"]["clip_model"] == "tiny-clip" and "LC-T" not in results["unavailable"]
    assert (tmp_path / "eval" / "results.json").is_file() and (tmp_path / "eval" / "results.md").is_file()


def test_cli_make_and_its_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["minibench", "make", "--output-dir", str(out), "--per-task", "2", "--seed", "3", "--size", "32"]
    assert cli_main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["counts"] == {"add": 2, "remove": 2, "replace": 2} and line["output_dir"] == str(out)
    assert line["split"] == "val"
    assert _files(out) == _files(write_minibench(tmp_path / "api", 2, 3, size=32))
    # an existing export is replaced only with --overwrite; a foreign non-empty folder never
    assert cli_main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli_main(argv + ["--per-task", "1", "--overwrite"]) == 0
    assert json.loads((out / MANIFEST).read_text())["per_task"] == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for bad in (["--output-dir", str(foreign), "--overwrite"], ["--output-dir", str(tmp_path / "n"), "--per-task", "0"],
                ["--output-dir", str(tmp_path / "n"), "--tasks", "add,paint"],
                ["--output-dir", str(tmp_path / "n"), "--size", "8"], ["--per-task", "2"],
                ["--output-dir", str(tmp_path / "n"), "--split", "train"]):
        assert cli_main(["minibench", "make", *bad]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
    assert (foreign / "keep.txt").read_text() == "mine" and not (tmp_path / "n").exists()
    assert cli_main(["minibench"]) == 2 and "make" in capsys.readouterr().err


def test_cli_make_split_test_is_disjoint_from_val(tmp_path, capsys):
    val, test = tmp_path / "val", tmp_path / "test"
    common = ["--per-task", "2", "--seed", "3", "--size", "32"]
    assert cli_main(["minibench", "make", "--output-dir", str(val), "--split", "val", *common]) == 0
    assert cli_main(["minibench", "make", "--output-dir", str(test), "--split", "test", *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"] == "test"
    assert json.loads((test / MANIFEST).read_text())["split"] == "test"
    records = {name: CompBenchDataset(root).records for name, root in (("val", val), ("test", test))}
    seeds = {name: {r.extra["seed"] for r in recs} for name, recs in records.items()}
    assert len(seeds["val"]) == len(seeds["test"]) == 6 and not seeds["val"] & seeds["test"]
    assert all(split_of_seed(s) == "test" for s in seeds["test"])
    assert all(r.extra["split"] == "test" and r.extra["minibench_id"].startswith("test-") for r in records["test"])
    reference = MiniBenchDataset(per_task=2, split="test", seed=3, size=32)
    assert sorted(seeds["test"]) == sorted(reference.seeds)
    with pytest.raises(ValueError, match="--split must be val or test"):
        write_minibench(tmp_path / "bad", 2, 3, size=32, split="train")
    # "heldout", the old name of the val split, writes the val set
    assert _files(write_minibench(tmp_path / "old", 2, 3, size=32, split="heldout")) == _files(val)
