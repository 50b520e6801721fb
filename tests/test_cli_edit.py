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
