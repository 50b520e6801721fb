"""Bad and unusual inputs from the command line (issue 19): each refusal exits 2 with exactly one stderr
line naming the input, no traceback, and before the expensive work it guards (the model load, or the
first rollout); each unusual-but-valid input is read the way its author meant.

Run in-process through `rcgrpo.cli.main` on the tiny model (edits of 1 step, 2 candidates).
"""
import io
import json
import struct
import zlib
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
    rc = cli_main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(rc, err, *names):
    """Exit 2, one stderr line that names each of `names`, no traceback."""
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
    """Fail loudly if a rollout starts: LoRA checks must come before it."""
    def rollout(*args, **kwargs):
        raise AssertionError("a rollout ran before the bad input was refused")

    monkeypatch.setattr("rcgrpo.editors.flux_kontext.editor.FluxKontextEditor.rollout", rollout)


def png(path, arr, mode=None, **kwargs):
    img = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    img.save(path, format="PNG", **kwargs)
    return path


def square_inputs(tmp_path, size=32, *, mask_value=255, mask_dtype=np.uint8):
    rng = np.random.default_rng(0)
    image = png(tmp_path / "image.png", rng.integers(0, 256, (size, size, 3)).astype(np.uint8))
    mask = np.zeros((size, size), mask_dtype)
    mask[8:20, 10:24] = mask_value
    return image, png(tmp_path / "mask.png", mask)


def edit_args(tmp_path, image, mask, *extra):
    return ["edit", "--image", str(image), "--mask", str(mask), "--output-dir", str(tmp_path / "out"),
            "--group-size", "2", "--steps", "1", *extra]


def saved_mask(tmp_path) -> np.ndarray:
    with Image.open(tmp_path / "out" / "mask.png") as im:
        return np.asarray(im.convert("L"))


def png_header_only(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def tiny_lora(directory, entries: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.full(shape, 0.01) for k, shape in entries.items()},
              str(directory / "pytorch_lora_weights.safetensors"))
    return directory


Q = "transformer.transformer_blocks.0.attn.to_q"  # a 32 -> 32 linear layer of the tiny model


# ------------------------------------------------------------------------------------------------
# unusual but valid files: read as meant, exit 0
# ------------------------------------------------------------------------------------------------
def test_16bit_png_mask_soft_values_kept(tmp_path, capsys):
    image, _ = square_inputs(tmp_path)
    mask = np.zeros((32, 32), np.uint16)
    mask[8:20, 10:24] = 65535
    mask[8:20, 10:14] = 32768  # a soft band: used to be binarised to 255
    png(tmp_path / "m16.png", mask)
    rc, out, err = run(edit_args(tmp_path, image, tmp_path / "m16.png"), capsys)
    assert rc == 0 and err == "", err
    saved = saved_mask(tmp_path)
    assert saved[10, 20] == 255 and saved[10, 11] == 128 and saved[0, 0] == 0


def test_01_mask_means_edit_region(tmp_path, capsys):
    image, mask = square_inputs(tmp_path, mask_value=1)
    rc, out, err = run(edit_args(tmp_path, image, mask), capsys)
    assert rc == 0 and err == "", err  # no 0.0039 mask, no warning
    saved = saved_mask(tmp_path)
    assert saved[10, 12] == 255 and saved[0, 0] == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rdp = [r for r in report["candidates"] if r["scheme"] == "rdp" and r["index"] == 1][0]
    assert rdp["edit_change"] > 2 * rdp["background_drift"]  # the mask region really is the edit region


def test_palette_image_with_transparency(tmp_path, capsys):
    idx = np.zeros((32, 32), np.uint8)
    idx[:, 16:] = 1
    idx[:4] = 2  # transparent rows
    palette = [200, 30, 30, 30, 30, 200, 0, 0, 0] + [0] * 759
    img = Image.fromarray(idx, mode="P")
    img.putpalette(palette)
    img.save(tmp_path / "p.png", transparency=2)
    _, mask = square_inputs(tmp_path)
    rc, out, err = run(edit_args(tmp_path, tmp_path / "p.png", mask), capsys)
    assert rc == 0 and err == "", err
    with Image.open(tmp_path / "out" / "source.png") as im:
        src = np.asarray(im.convert("RGB"))
    assert tuple(src[10, 2]) == (200, 30, 30) and tuple(src[10, 30]) == (30, 30, 200)
    assert tuple(src[1, 5]) == (255, 255, 255)  # transparency composited over white, not black


def test_exif_rotated_image_matches_mask_drawn_upright(tmp_path, capsys):
    stored = np.zeros((32, 48, 3), np.uint8)  # stored 48 wide, 32 tall; shown rotated 90° clockwise: 32x48
    stored[0, 0] = (255, 0, 0)  # stored top-left -> shown top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    png(tmp_path / "rotated.png", stored, exif=exif)
    mask = np.zeros((48, 32), np.uint8)  # drawn on the image as a viewer shows it
    mask[10:30, 8:20] = 255
    png(tmp_path / "mask.png", mask)
    rc, out, err = run(edit_args(tmp_path, tmp_path / "rotated.png", tmp_path / "mask.png"), capsys)
    assert rc == 0 and err == "", err
    with Image.open(tmp_path / "out" / "source.png") as im:
        assert im.size == (32, 48)  # (w, h): written at the input's size, as a viewer shows it
        src = np.asarray(im.convert("RGB")).astype(int)
    assert src[0, -1, 0] > 100 and src[0, -1, 1] < 60  # the red corner is top right
    # edited portrait at area ~32², sides multiples of 4 (tiny VAE factor 2)
    assert "edited at the model's 28x40 px, written at the input's 32x48 px" in out


def test_non_square_image_keeps_its_aspect(tmp_path, capsys):
    image = png(tmp_path / "wide.png", np.random.default_rng(1).integers(0, 256, (60, 120, 3)).astype(np.uint8))
    mask = np.zeros((60, 120), np.uint8)
    mask[20:40, 30:90] = 255
    png(tmp_path / "m.png", mask)
    rc, out, err = run(edit_args(tmp_path, image, tmp_path / "m.png"), capsys)
    assert rc == 0 and err == "", err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["height"], report["width"]) == (24, 44) and report["source_size"] == [60, 120]
    assert abs(report["width"] / report["height"] - 2.0) < 0.2  # not squashed to a square


def test_alpha_channel_mask_when_asked(tmp_path, capsys):
    image, _ = square_inputs(tmp_path)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: the gray level says "edit everything"
    rgba[8:20, 10:24, 3] = 255  # the mask is in the alpha channel
    png(tmp_path / "alpha.png", rgba, mode="RGBA")
    rc, out, err = run(edit_args(tmp_path, image, tmp_path / "alpha.png", "--mask-channel", "alpha"), capsys)
    assert rc == 0 and err == "", err
    assert saved_mask(tmp_path)[10, 12] == 255 and saved_mask(tmp_path)[0, 0] == 0


def test_mask_without_01_structure_warns_in_one_line(tmp_path, capsys):
    image, mask = square_inputs(tmp_path, mask_value=3)  # labels 0/3: read as 3/255
    rc, out, err = run(edit_args(tmp_path, image, mask), capsys)
    lines = err.strip().splitlines()
    assert rc == 0 and len(lines) == 1 and "warning" in lines[0] and "mask.png" in lines[0], err


def test_peft_lora_keys_are_loaded_not_skipped(tmp_path, capsys):
    image, mask = square_inputs(tmp_path)
    plain = "transformer_blocks.0.attn.to_q"
    for label, a, b in (("peft", f"{Q}.lora_A.default.weight", f"{Q}.lora_B.default.weight"),
                        ("noprefix", f"{plain}.lora_A.weight", f"{plain}.lora_B.weight")):
        lora = tiny_lora(tmp_path / label, {a: (4, 32), b: (32, 4)})
        rc, out, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
        assert rc == 0 and err == "", (label, err)


def test_peft_keys_reach_the_model():
    from rcgrpo.editors.lora import load_lora
    from rcgrpo.testing import tiny_kontext_pipeline

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        lora = tiny_lora(Path(d), {f"{Q}.lora_A.default.weight": (4, 32), f"{Q}.lora_B.default.weight": (32, 4)})
        pipe = tiny_kontext_pipeline(0)
        x = torch.randn(2, 32)
        with torch.no_grad():
            before = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")(x)
            load_lora(pipe, lora)
            after = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")(x)
    # delta = B A x · (alpha / r) with A, B filled with 0.01: non-zero, so the adapter is active
    assert float((after - before).abs().max()) > 1e-5


# ------------------------------------------------------------------------------------------------
# refusals before the model loads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bomb(tmp_path, capsys, no_model, side):
    (tmp_path / "bomb.png").write_bytes(png_header_only(side, side))
    _, mask = square_inputs(tmp_path)
    rc, out, err = run(edit_args(tmp_path, tmp_path / "bomb.png", mask), capsys)
    line = assert_refused(rc, err, "--image", "bomb.png")
    assert "decompression bomb" in line


def test_decompression_bomb_mask(tmp_path, capsys, no_model):
    image, _ = square_inputs(tmp_path)
    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    rc, out, err = run(edit_args(tmp_path, image, tmp_path / "bomb.png"), capsys)
    assert_refused(rc, err, "--mask", "bomb.png", "decompression bomb")


def test_missing_image_and_directory(tmp_path, capsys, no_model):
    _, mask = square_inputs(tmp_path)
    rc, _, err = run(edit_args(tmp_path, tmp_path / "nope.png", mask), capsys)
    assert_refused(rc, err, "--image", "nope.png")
    rc, _, err = run(edit_args(tmp_path, tmp_path, mask), capsys)
    assert_refused(rc, err, "--image", "is a directory")


def test_not_an_image(tmp_path, capsys, no_model):
    image, _ = square_inputs(tmp_path)
    (tmp_path / "mask.txt").write_text("white square in the middle")
    rc, _, err = run(edit_args(tmp_path, image, tmp_path / "mask.txt"), capsys)
    assert_refused(rc, err, "--mask", "mask.txt", "is not a readable image")


def test_mask_size_differs(tmp_path, capsys, no_model):
    image, _ = square_inputs(tmp_path)
    png(tmp_path / "small.png", np.full((16, 16), 255, np.uint8) * np.eye(16, dtype=np.uint8))
    rc, _, err = run(edit_args(tmp_path, image, tmp_path / "small.png"), capsys)
    assert_refused(rc, err, "--mask", "small.png", "16x16", "32x32", "does not match")


@pytest.mark.parametrize("value,what", [(0, "every pixel is 0"), (255, "every pixel is edit")])
def test_empty_or_full_mask(tmp_path, capsys, no_model, value, what):
    image, _ = square_inputs(tmp_path)
    png(tmp_path / "m.png", np.full((32, 32), value, np.uint8))
    rc, _, err = run(edit_args(tmp_path, image, tmp_path / "m.png"), capsys)
    assert_refused(rc, err, "--mask", "m.png", what)


def test_full_white_rgba_mask_suggests_alpha_channel(tmp_path, capsys, no_model):
    image, _ = square_inputs(tmp_path)
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[:8, :, 3] = 0
    png(tmp_path / "rgba.png", rgba, mode="RGBA")
    rc, _, err = run(edit_args(tmp_path, image, tmp_path / "rgba.png"), capsys)
    assert_refused(rc, err, "--mask", "rgba.png", "--mask-channel alpha")


def test_alpha_channel_missing(tmp_path, capsys, no_model):
    image, mask = square_inputs(tmp_path)
    rc, _, err = run(edit_args(tmp_path, image, mask, "--mask-channel", "alpha"), capsys)
    assert_refused(rc, err, "--mask", "mask.png", "no alpha channel")


def test_mask_full_on_the_token_grid(tmp_path, capsys, monkeypatch):
    """A dotted mask that leaves background pixels but touches every token (4x4 pixels each)."""
    image, _ = square_inputs(tmp_path)
    dots = np.zeros((32, 32), np.uint8)
    dots[::4, ::4] = 255
    png(tmp_path / "dots.png", dots)
    monkeypatch.setattr("rcgrpo.editors.flux_kontext.editor.FluxKontextEditor.rollout", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rollout")))
    rc, _, err = run(edit_args(tmp_path, image, tmp_path / "dots.png"), capsys)
    assert_refused(rc, err, "--mask", "dots.png", "covers every token", "token grid")


def test_output_dir_is_a_file(tmp_path, capsys, no_model):
    image, mask = square_inputs(tmp_path)
    (tmp_path / "out").write_text("")
    rc, _, err = run(edit_args(tmp_path, image, mask), capsys)
    assert_refused(rc, err, "--output-dir", "out", "is a file")
    rc, _, err = run(["train", "--preset", "tiny", "--output-dir", str(tmp_path / "out"), "--report-to", "none"], capsys)
    assert_refused(rc, err, "--output-dir", "out", "is a file")


def test_empty_output_dir(tmp_path, capsys, no_model):
    image, mask = square_inputs(tmp_path)
    rc, _, err = run([*edit_args(tmp_path, image, mask), "--output-dir", ""], capsys)
    assert_refused(rc, err, "--output-dir", "empty")
    rc, _, err = run(["train", "--preset", "tiny", "--output-dir", "", "--report-to", "none"], capsys)
    assert_refused(rc, err, "--output-dir", "empty")


@pytest.mark.parametrize("argv,name", [
    (["--steps", "0"], "--steps"),
    (["--group-size", "1"], "--group-size"),
    (["--alpha-edit", "1.5"], "--alpha-edit"),
    (["--prompt", " "], "--prompt"),
    (["--resolution", "8"], "--resolution"),
])
def test_edit_flag_ranges(tmp_path, capsys, no_model, argv, name):
    rc, _, err = run(["edit", "--output-dir", str(tmp_path / "o"), *argv], capsys)
    assert_refused(rc, err, name)


@pytest.mark.parametrize("argv,name", [
    (["--num-inference-steps", "0"], "--num-inference-steps"),
    (["--group-size", "1"], "--group-size"),
    (["--max-steps", "0"], "--max-steps"),
])
def test_train_flag_ranges(tmp_path, capsys, no_model, argv, name):
    rc, _, err = run(["train", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--report-to", "none", *argv],
                     capsys)
    assert_refused(rc, err, name)


def test_image_without_mask(tmp_path, capsys, no_model):
    image, _ = square_inputs(tmp_path)
    rc, _, err = run(["edit", "--image", str(image), "--output-dir", str(tmp_path / "o")], capsys)
    assert_refused(rc, err, "--image", "--mask")


# ------------------------------------------------------------------------------------------------
# LoRA files: the header before the model, modules and shapes before any rollout
# ------------------------------------------------------------------------------------------------
def test_lora_missing_or_not_safetensors(tmp_path, capsys, no_model):
    image, mask = square_inputs(tmp_path)
    (tmp_path / "empty").mkdir()
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(tmp_path / "empty")), capsys)
    assert_refused(rc, err, "--lora", "pytorch_lora_weights.safetensors")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 40)
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(tmp_path / "bad")), capsys)
    assert_refused(rc, err, "--lora", "not a valid safetensors file")


def test_lora_without_lora_keys(tmp_path, capsys, no_model):
    image, mask = square_inputs(tmp_path)
    lora = tiny_lora(tmp_path / "weights", {"transformer.x_embedder.weight": (32, 16)})
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
    assert_refused(rc, err, "--lora", "weights", "no LoRA weights")


def test_lora_rank_mismatch_and_missing_half(tmp_path, capsys, no_model):
    image, mask = square_inputs(tmp_path)
    lora = tiny_lora(tmp_path / "ranks", {f"{Q}.lora_A.weight": (4, 32), f"{Q}.lora_B.weight": (32, 8)})
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
    assert_refused(rc, err, "--lora", "ranks", f"{Q}.lora_B.weight", "rank 8", "rank 4")
    lora = tiny_lora(tmp_path / "half", {f"{Q}.lora_A.weight": (4, 32)})
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
    assert_refused(rc, err, "--lora", "half", "no matching lora_B")


def test_lora_of_the_wrong_shape(tmp_path, capsys, no_rollout):
    image, mask = square_inputs(tmp_path)
    lora = tiny_lora(tmp_path / "wide", {f"{Q}.lora_A.weight": (4, 64), f"{Q}.lora_B.weight": (64, 4)})
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
    line = assert_refused(rc, err, "--lora", "wide", f"{Q}.lora_A.weight", "transformer_blocks.0.attn.to_q")
    assert "expects shape (4, 32)" in line and "the file has (4, 64)" in line
    assert "mat1" not in line


def test_lora_narrower_input_is_refused_not_padded(tmp_path, capsys, no_rollout):
    """diffusers would load a [4, 24] lora_A into a 32-input layer without a word."""
    image, mask = square_inputs(tmp_path)
    lora = tiny_lora(tmp_path / "narrow", {f"{Q}.lora_A.weight": (4, 24), f"{Q}.lora_B.weight": (32, 4)})
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
    assert_refused(rc, err, "--lora", "narrow", "expects shape (4, 32)", "(4, 24)")


def test_lora_for_modules_the_model_lacks(tmp_path, capsys, no_rollout):
    image, mask = square_inputs(tmp_path)
    deep = "transformer.transformer_blocks.18.attn.to_q"  # FLUX.1 has 19 double blocks, the tiny model 2
    lora = tiny_lora(tmp_path / "flux", {f"{deep}.lora_A.weight": (4, 32), f"{deep}.lora_B.weight": (32, 4),
                                         f"{Q}.lora_A.weight": (4, 32), f"{Q}.lora_B.weight": (32, 4)})
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
    line = assert_refused(rc, err, "--lora", "flux", "transformer_blocks.18.attn.to_q", "does not exist in this model")
    assert "transformer_blocks has 2 entries" in line
    odd = "transformer.transformer_blocks.0.attn.to_zz"
    lora = tiny_lora(tmp_path / "odd", {f"{odd}.lora_A.weight": (4, 32), f"{odd}.lora_B.weight": (32, 4)})
    rc, _, err = run(edit_args(tmp_path, image, mask, "--lora", str(lora)), capsys)
    assert_refused(rc, err, "--lora", "odd", "to_zz", "does not exist")


def test_lora_checks_leave_the_model_untouched(tmp_path):
    from rcgrpo.editors.lora import load_lora
    from rcgrpo.testing import tiny_kontext_pipeline

    pipe = tiny_kontext_pipeline(0)
    lora = tiny_lora(tmp_path / "wide", {f"{Q}.lora_A.weight": (4, 64), f"{Q}.lora_B.weight": (64, 4)})
    with pytest.raises(ValueError, match="expects shape"):
        load_lora(pipe, lora)
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer, torch.nn.Linear) and layer.in_features == 32 and not hasattr(layer, "lora_A")


# ------------------------------------------------------------------------------------------------
# memory pre-flight (CUDA only; tested with a fake device budget)
# ------------------------------------------------------------------------------------------------
def _flux_model_dir(tmp_path) -> Path:
    """A model directory with FLUX.1-Kontext-dev's config files and no weights."""
    from rcgrpo.dryrun.archs import ARCHS

    spec = ARCHS["flux-kontext-dev"]
    for component, cfg in (("transformer", spec["transformer"]), ("vae", spec["vae"]),
                           ("text_encoder_2", {"d_model": spec["text_dim"]})):
        (tmp_path / "flux" / component).mkdir(parents=True)
        (tmp_path / "flux" / component / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    return tmp_path / "flux"


def test_group_size_too_large_for_memory(tmp_path):
    from rcgrpo.cli.preflight import check_memory_fits
    from rcgrpo.train.config import PRESETS, RCGRPOConfig

    preset = PRESETS.get("kontext-1024") or {}
    cfg = RCGRPOConfig(**{**preset, "model": str(_flux_model_dir(tmp_path)), "group_size": 96, "resolution": 1024,
                          "mixed_precision": "bf16", "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError) as info:
        check_memory_fits(cfg, "cuda:0", budget_bytes=80 * GIB)
    message = str(info.value)
    assert message.startswith("--group-size 96: the estimated peak of ")
    assert "exceeds the 80 GiB of cuda:0" in message and ("; try " in message or "; even " in message)
    assert "\n" not in message
    # the suggestion is in train flags and, when the estimate says it fits, really fits
    assert "--group " not in message
    cfg_small = RCGRPOConfig(**{**preset, "model": cfg.model, "group_size": 4, "num_anchors": 2, "resolution": 512,
                                "mixed_precision": "bf16", "gradient_checkpointing": True,
                                "output_dir": str(tmp_path / "run")})
    assert check_memory_fits(cfg_small, "cuda:0", budget_bytes=139 * GIB) is None


def test_memory_check_uses_the_loaded_pipeline(tmp_path):
    from rcgrpo.cli.preflight import check_memory_fits, memory_estimate_kwargs
    from rcgrpo.dryrun.memory import estimate_memory
    from rcgrpo.testing import tiny_kontext_pipeline
    from rcgrpo.train.config import RCGRPOConfig

    pipe = tiny_kontext_pipeline(0)
    cfg = RCGRPOConfig(model="tiny", group_size=8, num_anchors=2, resolution=32, num_inference_steps=2,
                       output_dir=str(tmp_path / "run"))
    kwargs = memory_estimate_kwargs(cfg, "cpu", transformer_config=dict(pipe.transformer.config))
    assert kwargs["transformer_config"]["num_layers"] == pipe.transformer.config.num_layers
    peak = estimate_memory(**kwargs).peak
    assert check_memory_fits(cfg, "cpu", pipe) is None  # CPU: no budget check for a small estimate
    assert check_memory_fits(cfg, "cuda:0", pipe, budget_bytes=10 * peak) is None
    with pytest.raises(ValueError, match=r"--group-size 8: the estimated peak of .* exceeds"):
        check_memory_fits(cfg, "cuda:0", pipe, budget_bytes=peak // 4)


def test_memory_check_skips_models_without_readable_configs(tmp_path):
    from rcgrpo.cli.preflight import check_memory_fits
    from rcgrpo.train.config import RCGRPOConfig

    cfg = RCGRPOConfig(model="tiny", group_size=64, resolution=32, output_dir=str(tmp_path / "run"))
    assert check_memory_fits(cfg, "cuda:0", budget_bytes=1) is None  # nothing known before loading `tiny`


def test_vae_scale_factor_from_config_files(tmp_path):
    from rcgrpo.cli.preflight import vae_scale_factor

    assert vae_scale_factor(str(_flux_model_dir(tmp_path))) == 8
    assert vae_scale_factor("tiny") is None
    assert vae_scale_factor(str(tmp_path / "missing")) is None


def test_token_grid_checked_before_loading_a_real_model(tmp_path, capsys, no_model):
    """With a model directory, the VAE factor comes from vae/config.json: the mask is checked on FLUX's
    64x64 token grid (16-pixel tokens at 1024x1024) before the weights would load."""
    model = _flux_model_dir(tmp_path)
    image = png(tmp_path / "photo.png", np.random.default_rng(0).integers(0, 256, (128, 128, 3)).astype(np.uint8))
    dots = np.zeros((128, 128), np.uint8)
    dots[::2, ::2] = 255  # 3/4 background, but every 2x2 block (one 16x16-pixel token at 1024 px) has an edit pixel
    png(tmp_path / "dots.png", dots)
    rc, _, err = run(edit_args(tmp_path, image, tmp_path / "dots.png", "--model", str(model)), capsys)
    assert_refused(rc, err, "--mask", "dots.png", "covers every token", "64x64 token grid", "1024x1024")
