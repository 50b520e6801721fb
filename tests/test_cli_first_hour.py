"""A user's first hour, round 2 (issue 27): resumes write only where they are told, edits come back at the
input's size, and the last silent or unclear inputs are refused with one stderr line naming them.

Every refusal: exit status 2, exactly one non-empty stderr line that names the input, no traceback, and
(where it guards one) before the model loads. Run in-process through `rcgrpo.cli.main` on the tiny models.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rcgrpo.cli import main as cli_main

GIB = 1024**3


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def run(argv, capsys):
    rc = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(rc, err, *names):
    """Exit 2, one stderr line that names each of `names`, no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if the command loads a model: refusals must come first."""
    def load_editor(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("rcgrpo.editors.loading.load_editor", load_editor)


@pytest.fixture
def no_rollout(monkeypatch):
    def rollout(*args, **kwargs):
        raise AssertionError("a rollout ran before the bad input was refused")

    monkeypatch.setattr("rcgrpo.editors.flux_kontext.editor.FluxKontextEditor.rollout", rollout)


def png(path, arr, **kwargs):
    Image.fromarray(arr).save(path, format="PNG", **kwargs)
    return path


def edit_inputs(tmp_path, height, width, *, exif_orientation=None):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    png(tmp_path / "image.png", image, **kwargs)
    shown_h, shown_w = (width, height) if exif_orientation in (6, 8) else (height, width)
    mask = np.zeros((shown_h, shown_w), np.uint8)
    mask[shown_h // 4: shown_h // 2 + 2, shown_w // 4: shown_w // 2 + 2] = 255
    png(tmp_path / "mask.png", mask)
    return tmp_path / "image.png", tmp_path / "mask.png"


def edit_args(tmp_path, image, mask, *extra):
    return ["edit", "--image", image, "--mask", mask, "--output-dir", tmp_path / "out", "--group-size", "2",
            "--steps", "1", *extra]


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def tree_digest(root: Path) -> dict:
    """{relative path: sha256} of every file under `root`, and every directory (value "dir")."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------
# 1. resume writes into the directory it was given, never into the checkpoint's stored output_dir
# ------------------------------------------------------------------------------------------------
TRAIN = ["--preset", "tiny", "--group-size", "4", "--num-anchors", "2", "--num-inference-steps", "2",
         "--eval-size", "2", "--checkpoint-every", "1", "--report-to", "none", "--seed", "3"]


@pytest.fixture(scope="module")
def original_run(tmp_path_factory):
    """A finished 2-step run whose checkpoints store output_dir = this directory."""
    out = tmp_path_factory.mktemp("runs") / "a"
    assert cli_main(["train", *TRAIN, "--max-steps", "2", "--output-dir", str(out)]) == 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["config"]["output_dir"] == str(out)
    return out


def steps_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_continued_in(run_dir: Path, out: str, step: int = 3) -> None:
    assert (run_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    state = json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["step"] == step and state["config"]["output_dir"] == str(run_dir)
    assert steps_of(run_dir) == list(range(1, step + 1))
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert f"writing to {run_dir}" in out and f"LoRA at {run_dir / 'lora'}" in out


def test_resume_of_a_copied_run_writes_into_the_copy(original_run, tmp_path, capsys):
    before = tree_digest(original_run)
    copy = tmp_path / "b"
    shutil.copytree(original_run, copy)
    rc, out, err = run(["train", "--resume", copy, "--max-steps", "3"], capsys)
    assert rc == 0, err
    assert_continued_in(copy, out)
    assert tree_digest(original_run) == before  # byte for byte, no file added or removed


def test_resume_of_a_moved_run_does_not_recreate_the_old_directory(original_run, tmp_path, capsys):
    before = tree_digest(original_run)
    old, new = tmp_path / "scratch" / "a", tmp_path / "home" / "a"
    shutil.copytree(original_run, old)
    new.parent.mkdir()
    old.rename(new)  # the run moved; its checkpoints still name the original directory
    rc, out, err = run(["train", "--resume", new, "--max-steps", "3"], capsys)
    assert rc == 0, err
    assert_continued_in(new, out)
    assert not old.exists()
    assert tree_digest(original_run) == before


def test_resume_from_a_checkpoint_directory_inside_a_copy(original_run, tmp_path, capsys):
    before = tree_digest(original_run)
    copy = tmp_path / "c"
    shutil.copytree(original_run, copy)
    rc, out, err = run(["train", "--resume", copy / "checkpoint-1", "--max-steps", "3"], capsys)
    assert rc == 0, err
    assert "resumed from step 1" in out
    assert (copy / "checkpoint-3").is_dir() and (copy / "lora").is_dir()
    assert tree_digest(original_run) == before


def test_resume_with_output_dir_writes_there_only(original_run, tmp_path, capsys):
    before = tree_digest(original_run)
    copy, elsewhere = tmp_path / "d", tmp_path / "e"
    shutil.copytree(original_run, copy)
    copied = tree_digest(copy)
    rc, out, err = run(["train", "--resume", copy, "--output-dir", elsewhere, "--max-steps", "3"], capsys)
    assert rc == 0, err
    assert (elsewhere / "checkpoint-3").is_dir() and (elsewhere / "lora").is_dir()
    assert tree_digest(copy) == copied and tree_digest(original_run) == before


# ------------------------------------------------------------------------------------------------
# 2. edits come back at the input's size
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,exif,shown,model_size", [
    (32, 64, None, (64, 32), (44, 24)),  # (w, h): wide, the tiny model edits at 44x24
    (40, 40, None, (40, 40), (32, 32)),
    (64, 32, 6, (64, 32), (44, 24)),     # stored 32 wide and 64 tall, shown rotated: 64x32
])
def test_edit_writes_at_the_input_size(tmp_path, capsys, height, width, exif, shown, model_size):
    image, mask = edit_inputs(tmp_path, height, width, exif_orientation=exif)
    rc, out, err = run(edit_args(tmp_path, image, mask), capsys)
    assert rc == 0 and err == "", err
    for name in ("source.png", "mask.png", "rdp/candidate_00.png", "rdp/candidate_01.png",
                 "global/candidate_01.png"):
        assert image_size(tmp_path / "out" / name) == shown, name
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["width"], report["height"]) == model_size
    assert report["output_size"] == [shown[1], shown[0]]
    assert (f"edited at the model's {model_size[0]}x{model_size[1]} px, written at the input's "
            f"{shown[0]}x{shown[1]} px") in out.splitlines()[0]


def test_edit_output_size_model_keeps_the_models_size(tmp_path, capsys):
    image, mask = edit_inputs(tmp_path, 32, 64)
    rc, out, err = run(edit_args(tmp_path, image, mask, "--output-size", "model"), capsys)
    assert rc == 0 and err == "", err
    assert image_size(tmp_path / "out" / "rdp" / "candidate_01.png") == (44, 24)
    assert image_size(tmp_path / "out" / "source.png") == (44, 24)
    assert "edited and written at the model's 44x24 px; the input is 64x32 px" in out.splitlines()[0]


def test_edit_output_size_choice_is_checked(tmp_path, capsys, no_model):
    image, mask = edit_inputs(tmp_path, 32, 32)
    rc, _, err = run(edit_args(tmp_path, image, mask, "--output-size", "original"), capsys)
    assert_refused(rc, err, "--output-size", "original")


# ------------------------------------------------------------------------------------------------
# 3. NaN and ±inf: refused while parsing, naming the option, key or LoRA tensor
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,flag", [
    (["--deadline", "nan"], "--deadline"),
    (["--max-request-mb", "inf"], "--max-request-mb"),
    (["--editscore-temperature", "nan"], "--editscore-temperature"),
])
def test_reward_server_refuses_non_finite_numbers(capsys, argv, flag):
    from rcgrpo.rewards.server_cli import main as server_main

    # --port 70000: were the number let through, the run stops at the port (a failure here, not a server)
    rc = server_main([*argv, "--scorer", "rcgrpo.rewards.latency_scorer:score", "--port", "70000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and flag in err[0] and "finite" in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("argv,flag", [
    (["edit", "--guidance-scale", "nan"], "--guidance-scale"),
    (["edit", "--alpha-edit", "inf"], "--alpha-edit"),
    (["edit", "--global-sigma=-inf"], "--global-sigma"),
    (["train", "--preset", "tiny", "--guidance-scale", "nan"], "--guidance-scale"),
    (["train", "--preset", "tiny", "--learning-rate", "inf"], "--learning-rate"),
    (["train", "--preset", "tiny", "--w-acd", "NaN"], "--w-acd"),
    (["train", "--preset", "tiny", "--reward-weights", "1", "inf"], "--reward-weights"),
    (["eval", "--data", "d", "--output-dir", "o", "--guidance-scale", "inf"], "--guidance-scale"),
    (["dryrun", "--depth-scale", "nan"], "--depth-scale"),
    (["ablate", "--learning-rate", "nan"], "--learning-rate"),
])
def test_non_finite_flags_are_refused_while_parsing(tmp_path, capsys, no_model, argv, flag):
    rc, _, err = run(argv, capsys)
    line = assert_refused(rc, err, flag, "finite")
    assert "config" not in line


@pytest.mark.parametrize("text,key", [
    ("guidance_scale: .nan\n", "guidance_scale"),
    ("learning_rate: 1e-4\nalpha_edit: nan\n", "alpha_edit"),
    ("w_task: -.inf\n", "w_task"),
    ("reward_funcs: [redness, background_psnr]\nreward_weights: [1.0, .inf]\n", "reward_weights"),
])
def test_non_finite_yaml_values_are_refused(tmp_path, capsys, no_model, text, key):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    rc, _, err = run(["train", "--preset", "tiny", "--config", cfg, "--output-dir", tmp_path / "o"], capsys)
    assert_refused(rc, err, "cfg.yaml", key, "finite")


@pytest.mark.parametrize("field", ["guidance_scale", "alpha_base", "tau_edit", "clip_eps", "max_grad_norm"])
def test_non_finite_config_fields_are_refused(field):
    from rcgrpo.train.config import RCGRPOConfig, preset

    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match=f"config {field}: expected a finite number"):
            preset("tiny", **{field: value})
        with pytest.raises(ValueError, match=f"config {field}: expected a finite number"):
            RCGRPOConfig(**{field: value})


Q = "transformer.transformer_blocks.0.attn.to_q"  # a 32 -> 32 linear layer of the tiny model


def test_lora_with_non_finite_weights_names_file_and_tensor(tmp_path, capsys, no_rollout):
    image, mask = edit_inputs(tmp_path, 32, 32)
    lora = tmp_path / "lora"
    lora.mkdir()
    b = torch.full((32, 4), 0.01)
    b[3, 1] = float("nan")
    save_file({f"{Q}.lora_A.weight": torch.full((4, 32), 0.01), f"{Q}.lora_B.weight": b},
              str(lora / "pytorch_lora_weights.safetensors"))
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", lora), capsys)
    assert_refused(rc, err, "--lora", "pytorch_lora_weights.safetensors", f"{Q}.lora_B.weight", "non-finite")


# ------------------------------------------------------------------------------------------------
# 4. the memory pre-flight runs on the CPU too, before any model loads
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def eight_gib_available(monkeypatch):
    monkeypatch.setattr("rcgrpo.cli.preflight.host_memory_available", lambda: 8 * GIB)


def test_cpu_memory_preflight_names_group_size_before_loading(tmp_path, capsys, no_model, eight_gib_available):
    rc, _, err = run(["train", "--preset", "minibench", "--group-size", "5000", "--device", "cpu",
                      "--output-dir", tmp_path / "o", "--report-to", "none"], capsys)
    line = assert_refused(rc, err, "--group-size 5000", "estimated peak", "8 GiB of memory available",
                          "(cpu)", "--resolution 64", "--num-inference-steps 8", "--num-anchors 4",
                          "--groups-per-step 2")
    assert "--group-size" in line.split("; try ", 1)[1]  # the advice ends with a smaller group


def test_cpu_memory_preflight_lets_normal_runs_through(tmp_path, eight_gib_available):
    from rcgrpo.cli.preflight import check_memory_fits
    from rcgrpo.cli.train import parse_train_args
    from rcgrpo.testing import tiny_kontext_pipeline

    for argv in (["--preset", "minibench"], ["--preset", "minibench", "--group-size", "64"],
                 ["--preset", "tiny"]):
        _, config = parse_train_args([*argv, "--device", "cpu", "--output-dir", str(tmp_path / "o")])
        assert check_memory_fits(config, "cpu") is None
    _, config = parse_train_args(["--preset", "tiny", "--device", "cpu", "--output-dir", str(tmp_path / "o")])
    assert check_memory_fits(config, "cpu", tiny_kontext_pipeline()) is None  # `tiny`: checked once built


def test_cpu_memory_estimate_counts_the_models_own_tokens():
    """The tiny editor's 8-pixel tokens (VAE factor 4): 64 image tokens at 64 px, not FLUX's 16."""
    from rcgrpo.cli.preflight import _architecture, memory_estimate_kwargs
    from rcgrpo.train.config import preset

    config = preset("minibench", output_dir="o")
    transformer, vae, text_dim, dtype = _architecture(config, None)
    kwargs = memory_estimate_kwargs(config, "cpu", transformer_config=transformer, vae_config=vae, text_dim=text_dim)
    assert kwargs["token_px"] == 8
    from rcgrpo.dryrun.memory import estimate_memory

    assert estimate_memory(**kwargs).inputs["tokens"]["image"] == 64


# ------------------------------------------------------------------------------------------------
# 5. YAML: duplicate keys, strings for booleans and numbers, errors naming the file and key
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,names", [
    ("max_steps: 3\nlearning_rate: 1e-4\nmax_steps: 5\n", ["max_steps", "twice", "lines 1 and 3"]),
    ('gradient_checkpointing: "yes"\n', ["line 1: gradient_checkpointing", "expected true or false", "'yes'"]),
    ("gradient_checkpointing: 1\n", ["gradient_checkpointing", "expected true or false"]),
    ("seed: 1\nmax_steps: ten\n", ["line 2: max_steps", "expected int", "'ten'"]),
    ('max_steps: "10"\n', ["max_steps", "quoted string '10'"]),
    ("learning_rate: '1e-4'\n", ["learning_rate", "quoted string"]),
    ("group_size: 2.5\n", ["group_size", "expected int"]),
    ("reward_funcs: redness\n", ["reward_funcs", "expected a list"]),
    ("perturbation: local\n", ["perturbation", "'rdp'"]),
    ("group_size: 1\n", ["line 1: group_size", "≥ 2"]),           # a range error names the file and key too
    ("lerning_rate: 1.0e-4\n", ["unknown keys", "lerning_rate", "line 1"]),
])
def test_yaml_errors_name_the_file_and_key(tmp_path, capsys, no_model, text, names):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    rc, _, err = run(["train", "--preset", "tiny", "--config", cfg, "--output-dir", tmp_path / "o"], capsys)
    line = assert_refused(rc, err, "run.yaml", *names)
    assert "--" not in line.split("run.yaml")[1]  # no command-line flag: the value came from the file


def test_yaml_numbers_written_plainly_are_accepted(tmp_path):
    from rcgrpo.cli.train import parse_train_args

    cfg = tmp_path / "ok.yaml"
    cfg.write_text("learning_rate: 1e-4\nalpha_edit: 3e-1\nmax_steps: 7\ngradient_checkpointing: yes\n"
                   "reward_funcs: [redness, background_psnr]\nreward_weights: [1, 2e-3]\ntrain_timesteps: 2\n")
    _, config = parse_train_args(["--preset", "tiny", "--config", str(cfg), "--output-dir", str(tmp_path / "o")])
    assert config.learning_rate == 1e-4 and config.alpha_edit == 0.3 and config.max_steps == 7
    assert config.gradient_checkpointing is True and config.reward_weights == [1.0, 0.002]
    assert config.train_timesteps == "2"


def test_a_flag_over_a_yaml_value_is_named_as_the_flag(tmp_path, capsys, no_model):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("group_size: 4\n")
    rc, _, err = run(["train", "--preset", "tiny", "--config", cfg, "--group-size", "1",
                      "--output-dir", tmp_path / "o"], capsys)
    line = assert_refused(rc, err, "--group-size", "≥ 2")
    assert "run.yaml" not in line


# ------------------------------------------------------------------------------------------------
# 6. rcgrpo eval: missing or unreadable files are errors unless skipped; 0/1 masks warn
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def bench(tmp_path):
    from rcgrpo.eval.compbench_synthetic import write_compbench_example_dir

    write_compbench_example_dir(tmp_path / "bench", n_per_task=1, size=32, seed=0)
    outputs = tmp_path / "outputs"
    for task in ("add", "remove", "replace"):  # the ground truths as the "edits"
        shutil.copytree(tmp_path / "bench" / "tasks" / task / "edited_image", outputs / task)
    return tmp_path / "bench", outputs


def eval_args(tmp_path, data, outputs, *extra):
    return ["eval", "--data", data, "--output-dir", tmp_path / "eval", "--outputs", outputs, "--clip-model",
            tmp_path / "no-clip", "--eval-size", "32", *extra]


def first_png(folder: Path) -> Path:
    return sorted(folder.rglob("*.png"))[0]


@pytest.mark.parametrize("damage,what", [
    ("delete source", "source image missing"),
    ("corrupt source", "source image unreadable"),
    ("corrupt mask", "mask unreadable"),
    ("delete edit", "edit missing"),
    ("corrupt edit", "edit unreadable"),
    ("corrupt ground truth", "ground-truth image unreadable"),
])
def test_eval_missing_or_unreadable_file_is_an_error_naming_the_example(tmp_path, capsys, bench, damage, what):
    data, outputs = bench
    action, kind = damage.split(" ", 1)
    folder = {"source": data / "tasks" / "remove" / "input_image", "mask": data / "tasks" / "remove" / "mask",
              "edit": outputs / "remove", "ground truth": data / "tasks" / "remove" / "edited_image"}[kind]
    victim = first_png(folder)
    example = "remove/" + str(victim.relative_to(folder))
    if action == "delete":
        victim.unlink()
    else:
        victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rc, _, err = run(eval_args(tmp_path, data, outputs), capsys)
    assert_refused(rc, err, example, what, "--skip-missing")
    assert not (tmp_path / "eval" / "results.json").exists()

    rc, out, err = run(eval_args(tmp_path, data, outputs, "--skip-missing"), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "warning" in lines[0] and "1 of 3 example(s) skipped" in lines[0] and example in lines[0]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [s["id"] for s in results["skipped"]] == [example] and what in results["skipped"][0]["reason"]
    assert results["average"]["count"] == 2
    assert f"`{example}`" in (tmp_path / "eval" / "results.md").read_text()


def test_eval_reads_01_masks_like_0_255_masks_and_warns(tmp_path, capsys, bench):
    data, outputs = bench
    rc, _, err = run(eval_args(tmp_path, data, outputs), capsys)
    assert rc == 0 and err == "", err
    as_255 = json.loads((tmp_path / "eval" / "results.json").read_text())
    for mask in (data / "tasks").rglob("mask/**/*.png"):
        with Image.open(mask) as im:
            values = np.asarray(im.convert("L"))
        png(mask, (values > 127).astype(np.uint8))  # the same masks as 0/1
    shutil.rmtree(tmp_path / "eval")
    rc, _, err = run(eval_args(tmp_path, data, outputs), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "warning" in lines[0] and "3 mask(s)" in lines[0] and "0 and 1" in lines[0] and "1 = edit" in lines[0]
    as_01 = json.loads((tmp_path / "eval" / "results.json").read_text())
    for metric in ("PSNR", "SSIM"):
        assert as_01["average"][metric] == pytest.approx(as_255["average"][metric], rel=1e-6), metric
    assert as_01["settings"]["masks_01"] == 3


def test_eval_skip_missing_contradicts_fail_on_skipped(tmp_path, capsys, bench):
    data, outputs = bench
    rc, _, err = run(eval_args(tmp_path, data, outputs, "--skip-missing", "--fail-on-skipped"), capsys)
    assert_refused(rc, err, "--skip-missing", "--fail-on-skipped")


# ------------------------------------------------------------------------------------------------
# 7. rcgrpo without a command
# ------------------------------------------------------------------------------------------------
def test_no_command_is_a_usage_error_on_stderr(capsys):
    rc, out, err = run([], capsys)
    line = assert_refused(rc, err, "no command given", "usage: rcgrpo", "train", "edit", "eval")
    assert out == "" and line.startswith("rcgrpo: error:")
