"""`rcgrpo edit`: the main job before training, global perturbation vs RDP on the tiny model."""
import json

from rcgrpo.cli import main as cli_main


def test_edit_default_example_reports_both_schemes_and_saves_images(tmp_path, capsys):
    out = tmp_path / "edit"
    assert cli_main(["edit", "--output-dir", str(out), "--group-size", "4", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "global" in printed and "rdp" in printed and "ACD" in printed
    report = json.loads((out / "report.json").read_text())
    rows = report["candidates"]
    assert len(rows) == 8
    for scheme in ("global", "rdp"):
        assert len(list((out / scheme).glob("candidate_*.png"))) == 4
        ref = [r for r in rows if r["scheme"] == scheme and r["index"] == 0][0]
        assert ref["edit_change"] == 0.0 and ref["background_drift"] == 0.0
        assert all(r["acd"] is not None and r["acd"] > 0 for r in rows if r["scheme"] == scheme)

    def mean(scheme, key):
        vals = [r[key] for r in rows if r["scheme"] == scheme and r["index"] > 0]
        return sum(vals) / len(vals)

    # RDP keeps the background: its drift (relative to the edit change) is far below the global one.
    assert mean("rdp", "latent_background_drift") < 0.1 * mean("global", "latent_background_drift")
    assert mean("rdp", "background_drift") < mean("global", "background_drift")


def test_edit_size_keeps_aspect_with_the_models_buckets():
    from rcgrpo.editors.flux_kontext import FluxKontextEditor
    from rcgrpo.editors.qwen_image_edit import QwenImageEditor

    def edit_size(height, width, resolution, vae_scale_factor):
        return FluxKontextEditor.size_for(height, width, resolution, 2 * vae_scale_factor)

    assert edit_size(3000, 4000, 1024, 8) == (880, 1184)  # FLUX.1-Kontext: diffusers' landscape bucket
    assert edit_size(4000, 3000, 1024, 8) == (1184, 880)
    assert edit_size(1000, 1000, 1024, 8) == (1024, 1024)
    h, w = edit_size(3000, 4000, 512, 8)  # buckets scaled to 512² and kept on the 16-pixel token grid
    assert (h, w) == (448, 592) and h % 16 == 0 and w % 16 == 0
    assert edit_size(48, 64, 32, 2) == (28, 36)  # tiny: area 32², sides multiples of 4
    assert edit_size(64, 64, 64, 2) == (64, 64)
    # Qwen-Image-Edit: the pipelines' calculate_dimensions rounding (32 px) at the target area
    h, w = QwenImageEditor.size_for(3000, 4000, 1024, 16)
    assert h % 32 == 0 and w % 32 == 0 and abs(h * w - 1024**2) < 0.05 * 1024**2 and abs(w / h - 4 / 3) < 0.05


def test_edit_writes_labelled_scheme_grids(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "edit"
    assert cli_main(["edit", "--output-dir", str(out), "--group-size", "3", "--steps", "1"]) == 0
    capsys.readouterr()
    for scheme in ("global", "rdp"):
        with Image.open(out / f"{scheme}_grid.png") as im:
            # 4 tiles of 32 px drawn at >= 192 px each, with labels: far larger than a bare 4x32 px strip
            assert im.size[0] > 4 * 192 and im.size[1] > 192
