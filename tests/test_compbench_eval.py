"""CompBench loader, the evaluation metrics and `rcgrpo eval`, and the Fig. 5 diagnostics."""
import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rcgrpo.cli.eval import add_eval_arguments, run_eval
from rcgrpo.eval.compbench import CompBenchDataset, CompBenchError
from rcgrpo.eval.compbench_synthetic import write_compbench_example_dir
from rcgrpo.eval.evaluate import evaluate
from rcgrpo.eval.lpips import SqueezeLPIPS, load_lpips_weights
from rcgrpo.eval.metrics import compute_example_metrics, official_crop_box
from rcgrpo.rewards import PSNR_CAP_DB, ClipEncoder
from test_eval_official import one_thread  # noqa: F401 - autouse: one torch thread


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("compbench")
    write_compbench_example_dir(root, n_per_task=2, size=32, seed=0)
    return root


def _copy(src, tmp_path):
    dst = tmp_path / "bench"
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# loader


def test_loader_reads_the_official_layout(bench):
    ds = CompBenchDataset(bench)
    assert len(ds) == 6 and ds.tasks == ("add", "remove", "replace")
    assert ds.task_counts() == {"add": 2, "remove": 2, "replace": 2}
    ex = ds[0]
    assert ex.task == "add" and ex.id == f"add/{ex.image_path}" and ex.image_path.count("/") == 2
    assert ex.source.size == (32, 32) and ex.source.mode == "RGB"
    assert ex.mask.shape == (32, 32) and set(ex.mask.unique().tolist()) == {0.0, 1.0}
    assert ex.instruction.startswith("Add a") and ex.caption and ex.prompt == ex.instruction
    assert ex.ground_truth_path == bench / "tasks" / "add" / "edited_image" / ex.image_path
    assert ex.source_tensor().shape == (3, 32, 32)
    # what the trainer reads: image [3, H, W], mask [H, W], instruction, id, metadata
    assert torch.equal(ex.image, ex.source_tensor()) and ex.example_id == ex.id
    assert ex.metadata["reference"] == str(ex.ground_truth_path) and ex.metadata["task"] == "add"
    d = ex.to_dict()
    assert torch.equal(d["image"], ex.image) and d["source_image"] is ex.source and d["prompt"] == ex.instruction
    assert d["metadata"]["reference"] == str(ex.ground_truth_path) and d["metadata"]["caption"] == ex.caption
    assert ex.load_ground_truth().size == (32, 32)
    # the tasks folder itself, a task subset, a limit, a resolution
    assert len(CompBenchDataset(bench / "tasks")) == 6
    assert [e.task for e in CompBenchDataset(bench, tasks=["remove"])] == ["remove", "remove"]
    assert len(CompBenchDataset(bench, limit=1)) == 3
    small = CompBenchDataset(bench, resolution=16)[0]
    assert small.source.size == (16, 16) and small.mask.shape == (16, 16)
    assert len(ds[1:3]) == 2


def _plain_task(root, entries, files):
    task = root / "tasks" / "add"
    for folder in ("input_image", "edited_image", "mask"):
        (task / folder).mkdir(parents=True, exist_ok=True)
    for folder, name, size in files:
        mode = "L" if folder == "mask" else "RGB"
        img = Image.new(mode, size, 255 if mode == "L" else (10, 20, 30))
        if mode == "L":
            img.putpixel((0, 0), 0)
        img.save(task / folder / name)
    (task / "metadata.json").write_text(json.dumps(entries))
    return task


def test_loader_accepts_plain_names_prefixed_paths_and_png_masks(tmp_path):
    files = [("input_image", "a.png", (24, 24)), ("edited_image", "a.png", (24, 24)), ("mask", "a.png", (24, 24)),
             ("input_image", "b.jpg", (24, 24)), ("edited_image", "b.jpg", (24, 24)), ("mask", "b.png", (24, 24))]
    _plain_task(tmp_path, [{"image_path": "a.png", "instruction": "add a cat", "caption": "a cat"},
                           {"image_name": "input_image/b.jpg", "instruction": "add a dog", "score": 3}], files)
    ds = CompBenchDataset(tmp_path)
    assert [r.id for r in ds.records] == ["add/a.png", "add/b.jpg"]
    assert ds.records[1].mask_path.name == "b.png" and ds.records[1].extra == {"score": 3}
    assert ds[1].caption == "" and ds[1].mask[0, 0] == 0 and ds[1].mask[5, 5] == 1


def test_loader_errors_name_the_file_and_example(bench, tmp_path):
    root = _copy(bench, tmp_path)
    ds = CompBenchDataset(root)
    rec = ds.records[3]
    rec.mask_path.unlink()
    with pytest.raises(CompBenchError, match=rf"example {rec.id}: mask not found: .*mask/{rec.image_path}"):
        CompBenchDataset(root)
    # mismatched sizes
    Image.new("L", (20, 20)).save(rec.mask_path)
    with pytest.raises(CompBenchError, match=rf"example {rec.id}: mask .* is 20x20 but the source image is 32x32"):
        CompBenchDataset(root)
    rec.ground_truth_path.unlink()
    with pytest.raises(CompBenchError, match="ground-truth image not found"):
        CompBenchDataset(root, check_sizes=False)
    assert len(CompBenchDataset(root, require_ground_truth=False, check_sizes=False)) == 6
    # as rcgrpo eval reads it (the official script's way): missing files kept, sizes free
    rec.mask_path.unlink()
    lenient = CompBenchDataset(root, require_ground_truth=False, check_sizes=False, allow_missing=True)
    assert len(lenient) == 6 and lenient.records[3].missing_files() == ["mask"]
    assert lenient.records[3].mask_path == rec.mask_path and lenient.records[0].missing_files() == []
    assert lenient.load_source(lenient.records[3]).size == (32, 32)
    meta = root / "tasks" / "add" / "metadata.json"
    meta.write_text('[{"image_path": "x.png", "instruction": "a"},\n oops]')
    with pytest.raises(CompBenchError, match=r"add/metadata.json.* not valid JSON: .* line 2"):
        CompBenchDataset(root)
    meta.write_text(json.dumps([{"image_path": "x.png"}]))
    with pytest.raises(CompBenchError, match=r"entry 0 \(x.png\) has no 'instruction'"):
        CompBenchDataset(root, tasks=["add"])
    meta.write_text(json.dumps([{"image_path": "../remove/x.png", "instruction": "a"}]))
    with pytest.raises(CompBenchError, match="relative path inside the task folder"):
        CompBenchDataset(root, tasks=["add"])
    meta.write_text(json.dumps({"image_path": "x.png"}))
    with pytest.raises(CompBenchError, match="JSON list"):
        CompBenchDataset(root, tasks=["add"])
    with pytest.raises(CompBenchError, match="task 'other'"):
        CompBenchDataset(root, tasks=["other"])
    with pytest.raises(CompBenchError, match="not found"):
        CompBenchDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompBenchError, match=r"expected .*tasks/<task>/metadata.json"):
        CompBenchDataset(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------
# metrics


def _pair(size=64, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(50, 200, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[10:30, 20:50] = 255
    return src, mask


def test_background_metrics_by_hand():
    src, mask = _pair()
    edited = src.copy()
    edited[mask > 0] = 255 - edited[mask > 0]  # changes inside the mask only
    m = compute_example_metrics(Image.fromarray(src), Image.fromarray(edited), Image.fromarray(mask), None, ["c"], size=64)
    assert m["PSNR"] == PSNR_CAP_DB and m["SSIM"] == pytest.approx(1.0, abs=1e-6)
    assert "LPIPS" not in m and "LC-T" not in m
    shifted = src + 20  # a constant offset everywhere: background mse = (20/255)^2 · background fraction
    m = compute_example_metrics(Image.fromarray(src), Image.fromarray(shifted), Image.fromarray(mask), None, ["c"], size=64)
    frac = 1 - (20 * 30) / 64**2
    assert m["PSNR"] == pytest.approx(10 * math.log10(1 / ((20 / 255) ** 2 * frac)), abs=1e-3)
    assert m["SSIM"] < 1


def test_lpips_sees_zeroed_backgrounds_in_minus_one_to_one():
    src, mask = _pair()
    seen = []

    def fake_lpips(a, b):
        seen.append((a.clone(), b.clone()))
        return (a - b).abs().mean(dim=(1, 2, 3))

    edited = src.copy()
    edited[0:5] = 0
    m = compute_example_metrics(Image.fromarray(src), Image.fromarray(edited), Image.fromarray(mask), None, ["c"],
                                size=128, lpips=fake_lpips)
    a, b = seen[0]
    assert a.shape == (1, 3, 128, 128) and a.min() >= -1 and a.max() <= 1
    assert torch.all(a[..., 20:60, 40:100] == -1) and torch.all(b[..., 20:60, 40:100] == -1)  # mask ×2 at 128 px
    assert m["LPIPS"] == pytest.approx(float((a - b).abs().mean()))


def test_squeeze_lpips_weights_roundtrip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = SqueezeLPIPS()
    keys = set(net.state_dict())
    assert {"net.slices.0.0.weight", "net.slices.1.3.squeeze.weight", "net.slices.6.12.expand3x3.bias",
            "lin0.model.1.weight", "lin6.model.1.weight"} <= keys
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "lpips.safetensors")
    loaded = load_lpips_weights(tmp_path / "lpips.safetensors")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(loaded(x, y), net(x, y)) and loaded(x, y).shape == (2,)
    assert torch.allclose(loaded(x, x), torch.zeros(2), atol=1e-7)
    save_file({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not an LPIPS-squeeze state dict"):
        load_lpips_weights(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_lpips_weights(tmp_path / "junk.safetensors")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from test_rewards import tiny_clip

    model, tok = tiny_clip()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_clip_metrics_use_the_official_crop(clip_dir):
    from rcgrpo.eval.clip_official import OfficialClip

    enc = ClipEncoder(str(clip_dir))
    src, mask = _pair()
    edited = np.random.default_rng(1).integers(0, 256, src.shape).astype(np.uint8)
    mask_img = Image.fromarray(mask)
    assert official_crop_box(mask_img) == (20, 10, 49, 29)  # (min x, min y, max x, max y)
    m = compute_example_metrics(Image.fromarray(src), Image.fromarray(edited), mask_img, Image.fromarray(edited),
                                ["a red square"], size=64, clip=enc)
    assert m["LC-I"] == pytest.approx(1.0, abs=1e-5)
    crop = Image.fromarray(edited[10:29, 20:49])  # PIL crop: right/bottom excluded
    assert m["LC-T"] == pytest.approx(OfficialClip(enc).lc_t(crop, ["a red square"]), abs=1e-6)
    outside = edited.copy()
    outside[40:] = 0  # outside the box: no change to the local metrics
    m2 = compute_example_metrics(Image.fromarray(src), Image.fromarray(outside), mask_img, Image.fromarray(edited),
                                 ["a red square"], size=64, clip=enc)
    assert m2["LC-T"] == pytest.approx(m["LC-T"], abs=1e-4) and m2["LC-I"] == pytest.approx(1.0, abs=1e-5)
    empty = compute_example_metrics(Image.fromarray(src), Image.fromarray(edited), Image.new("L", (64, 64)),
                                    Image.fromarray(edited), ["x"], size=64, clip=enc)
    assert empty["LC-T"] == 0.0 and empty["LC-I"] == 0.0


# ---------------------------------------------------------------------------------------------------
# rcgrpo eval


def _args(*argv):
    p = argparse.ArgumentParser()
    add_eval_arguments(p)  # the options as the rcgrpo dispatcher adds them
    return p.parse_args([str(a) for a in argv])


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


def test_eval_tiny_generates_scores_and_resumes(bench, tmp_path, capsys):
    out = tmp_path / "eval"
    no_clip = tmp_path / "no-clip"
    assert _args("--data", bench, "--output-dir", out, "--model", "tiny").eval_size == 512
    assert run_eval(_args("--data", bench, "--output-dir", out, "--model", "tiny", "--steps", 2, "--clip-model", no_clip)) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["generation"]["generated"] == 6 and res["settings"]["eval_size"] == 512
    for row in [*res["per_task"].values(), res["average"]]:
        assert 0 < row["PSNR"] < PSNR_CAP_DB and 0 < row["SSIM"] < 1
        assert row["LC-I"] is None and row["LC-T"] is None and row["LPIPS"] is None
    assert res["per_task"]["add"]["count"] == 2 and res["average"]["count"] == 6
    avg = np.mean([res["per_task"][t]["PSNR"] for t in ("add", "remove", "replace")])
    assert res["average"]["PSNR"] == pytest.approx(avg)
    assert "does not exist" in res["unavailable"]["LC-T"] and "no-clip" in res["unavailable"]["LC-I"]
    assert "LPIPS" in res["unavailable"] and res["skipped"] == []
    assert len(res["examples"]) == 6 and all(math.isfinite(e["PSNR"]) for e in res["examples"])
    md = (out / "results.md").read_text()
    assert "| Task | N | LC-I ↑ | LC-T ↑ | PSNR ↑ | SSIM ↑ | LPIPS ↓ |" in md
    assert "| **Average** | 6 | n/a | n/a |" in md and "| Replace | 2 |" in md and md in printed
    assert "None: all 6 example(s) scored." in md and "## Conventions" in md
    pngs = _mtimes(out / "outputs")
    assert len(pngs) == 6 and all(Image.open(p).size == (32, 32) for p in pngs)

    # resume (the deprecated --tiny is --model tiny): nothing regenerated, files untouched
    run_eval(_args("--data", bench, "--output-dir", out, "--tiny", "--steps", 2, "--clip-model", no_clip, "--eval-size", 64))
    res2 = json.loads((out / "results.json").read_text())
    assert res2["settings"]["generation"]["generated"] == 0 and res2["settings"]["generation"]["reused"] == 6
    assert _mtimes(out / "outputs") == pngs
    # other settings into the same folder: the stale edits are regenerated
    run_eval(_args("--data", bench, "--output-dir", out, "--model", "tiny", "--steps", 3, "--clip-model", no_clip,
                   "--eval-size", 64))
    assert json.loads((out / "results.json").read_text())["settings"]["generation"]["regenerated_stale"] == 6


def test_eval_scores_existing_outputs_with_clip_and_lpips(bench, clip_dir, tmp_path):
    from safetensors.torch import save_file

    outputs = tmp_path / "outputs"
    for task in ("add", "remove", "replace"):  # the ground truth as the "edits"
        shutil.copytree(bench / "tasks" / task / "edited_image", outputs / task)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in SqueezeLPIPS().state_dict().items()}, tmp_path / "lpips.safetensors")
    out = tmp_path / "eval"
    run_eval(_args("--data", bench, "--output-dir", out, "--outputs", outputs, "--clip-model", clip_dir,
                   "--lpips-weights", tmp_path / "lpips.safetensors", "--eval-size", 32, "--strict"))
    res = json.loads((out / "results.json").read_text())
    assert res["unavailable"] == {} and res["settings"]["generation"]["mode"] == "scored existing outputs"
    for row in [*res["per_task"].values(), res["average"]]:
        # the synthetic ground truth changes only inside the mask: at the images' own size (no resize
        # blurring the edit across the mask border) the backgrounds are identical
        assert row["PSNR"] == PSNR_CAP_DB and row["SSIM"] == pytest.approx(1.0, abs=1e-6)
        assert row["LPIPS"] == pytest.approx(0.0, abs=1e-6)
        assert row["LC-I"] == pytest.approx(1.0, abs=1e-5) and 0 <= row["LC-T"] <= 100
    assert res["settings"]["psnr_capped"] == 6
    assert "| n/a" not in (out / "results.md").read_text()

    # a missing edit is skipped and listed, as the official script skips it (silently); a flag makes it an error
    victim = next((outputs / "remove").rglob("*.png"))
    victim.unlink()
    res = evaluate(bench, tmp_path / "eval2", outputs_dir=outputs, clip_model=None, eval_size=32, log=None)
    assert [s["task"] for s in res["skipped"]] == ["remove"] and "edit missing" in res["skipped"][0]["reason"]
    assert res["per_task"]["remove"]["count"] == 1 and res["average"]["count"] == 5
    assert "1 of 6 example(s) skipped" in (tmp_path / "eval2" / "results.md").read_text()
    with pytest.raises(FileNotFoundError, match=r"1 example\(s\) cannot be scored, e\.g\. remove/.*edit missing"):
        evaluate(bench, tmp_path / "eval3", outputs_dir=outputs, clip_model=None, eval_size=32, log=None,
                 fail_on_skipped=True)


# ---------------------------------------------------------------------------------------------------
# diagnostics (Fig. 5)


def _write_log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")


def test_fig5_ecdfs_from_logs(tmp_path):
    from rcgrpo.cli import main as cli_main
    from rcgrpo.train.diagnostics import ecdf, load_run_diagnostics, plot_fig5

    x, y = ecdf([3.0, 1.0, 2.0, 2.0])
    assert x.tolist() == [1.0, 2.0, 2.0, 3.0] and y.tolist() == [0.25, 0.5, 0.75, 1.0]
    _write_log(tmp_path / "global" / "metrics.jsonl", [
        {"step": 1, "background_drift_values": [0.1, 0.2, 0.4], "reward_std_within_group_values": [0.5, 0.7]},
        {"step": 2, "background_drift_values": [0.3, float("nan")], "reward_std_within_group_values": [0.6]},
    ])
    _write_log(tmp_path / "rdp.jsonl", [
        {"step": 1, "background_drift": 0.001, "reward_std_within_group": 0.9},  # scalar fallback
        {"step": 2, "background_drift_values": [0.002, 0.003], "reward_std_within_group_values": [0.8, 1.0]},
    ])
    d = load_run_diagnostics(tmp_path / "global")
    assert d["background_drift"].tolist() == [0.1, 0.2, 0.4, 0.3]  # NaN dropped
    assert d["reward_std_within_group"].tolist() == [0.5, 0.7, 0.6]
    summary = plot_fig5({"global": tmp_path / "global", "rdp": [tmp_path / "rdp.jsonl"]}, tmp_path / "fig5.png")
    assert summary["rdp"]["background_drift"]["count"] == 3
    assert summary["global"]["reward_std_within_group"]["median"] == pytest.approx(0.6)
    with Image.open(tmp_path / "fig5.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert cli_main(["diagnostics", "--run", f"global={tmp_path / 'global'}", "--run", f"rdp={tmp_path / 'rdp.jsonl'}",
                 "--output", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").is_file()
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_run_diagnostics(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_run_diagnostics(tmp_path / "missing")
    _write_log(tmp_path / "empty.jsonl", [{"step": 1, "loss": 0.1}])
    with pytest.raises(ValueError, match="no 'background_drift'"):
        plot_fig5({"x": tmp_path / "empty.jsonl"}, tmp_path / "x.png")


def test_acd_heatmaps(tmp_path):
    from rcgrpo.train.diagnostics import plot_acd_heatmaps

    mass = torch.rand(3, 2, 64)
    token_mask = torch.zeros(64)
    token_mask[:20] = 1
    plot_acd_heatmaps(mass, (8, 8), tmp_path / "acd.png", token_mask=token_mask, image=torch.rand(3, 32, 32))
    with Image.open(tmp_path / "acd.png") as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="8x4 token grid"):
        plot_acd_heatmaps(mass, (8, 4), tmp_path / "bad.png")
