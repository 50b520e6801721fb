"""LPIPS weights: export from torchmetrics' network, load into the torchvision-free `SqueezeLPIPS`.

torchvision cannot be installed here, so torchmetrics' backbone factory (`_get_tv_model_features`) is
patched to build a seeded SqueezeNet-1.1 with torchvision's layer layout: the network class, its lin
weights (shipped with torchmetrics) and its state-dict key set are torchmetrics' own.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from rcgrpo.eval.lpips import SqueezeLPIPS, export_lpips_weights, load_lpips_weights, torchmetrics_lpips
from test_eval_official import one_thread, seeded_squeezenet_features  # noqa: F401 - one_thread: autouse


@pytest.fixture
def patched_torchmetrics(monkeypatch):
    import torchmetrics.functional.image.lpips as tm_lpips
    import torchmetrics.image.lpip as tm_lpip

    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", seeded_squeezenet_features)
    monkeypatch.setattr(tm_lpip, "_TORCHVISION_AVAILABLE", True)
    return tm_lpip


@pytest.fixture
def metric(patched_torchmetrics):
    return patched_torchmetrics.LearnedPerceptualImagePatchSimilarity(net_type="squeeze")


def test_torchmetrics_key_set_exports_and_loads(metric, tmp_path):
    net = metric.net
    keys = set(net.state_dict())
    assert {"lin0.model.1.weight", "lins.0.model.1.weight", "net.slices.0.0.weight",
            "net.slices.6.12.expand3x3.bias"} <= keys
    with pytest.raises(RuntimeError, match="share memory"):  # why the old recipe failed
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "plain.safetensors")
    path = export_lpips_weights(tmp_path / "lpips.safetensors", metric)
    stored = load_file(str(path))
    assert set(stored) == {k for k in keys if not k.startswith("lins.")} == set(SqueezeLPIPS().state_dict())
    assert torch.equal(stored["lin3.model.1.weight"], net.lin3.model[1].weight)
    # the lin weights torchmetrics ships, not a random init
    shipped = torch.load(next(iter(_lpips_model_files())), map_location="cpu", weights_only=True)
    assert torch.equal(stored["lin6.model.1.weight"], shipped["lin6.model.1.weight"])
    loaded = load_lpips_weights(path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k

    # safetensors' own de-duplicating save (it keeps one of the two names) loads too
    save_model(net, str(tmp_path / "save_model.safetensors"))
    assert torch.equal(load_lpips_weights(tmp_path / "save_model.safetensors").lin2.model[1].weight, net.lin2.model[1].weight)
    # both names stored (as copies): accepted when equal, refused when not
    both = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    save_file(both, tmp_path / "both.safetensors")
    assert torch.equal(load_lpips_weights(tmp_path / "both.safetensors").lin0.model[1].weight, net.lin0.model[1].weight)
    both["lins.4.model.1.weight"] = both["lins.4.model.1.weight"] + 1
    save_file(both, tmp_path / "differ.safetensors")
    with pytest.raises(ValueError, match="'lins.4.model.1.weight' and 'lin4.model.1.weight' .* differ"):
        load_lpips_weights(tmp_path / "differ.safetensors")
    # only the list names: renamed
    lins_only = {k: v.clone().contiguous() for k, v in net.state_dict().items() if not k.startswith("lin") or k.startswith("lins.")}
    save_file(lins_only, tmp_path / "lins.safetensors")
    assert torch.equal(load_lpips_weights(tmp_path / "lins.safetensors").lin5.model[1].weight, net.lin5.model[1].weight)


def _lpips_model_files():
    import torchmetrics.functional.image.lpips as tm_lpips
    from pathlib import Path

    return [Path(tm_lpips.__file__).parent / "lpips_models" / "squeeze.pth"]


def test_squeeze_lpips_equals_torchmetrics_network(metric, tmp_path, patched_torchmetrics):
    ours = load_lpips_weights(export_lpips_weights(tmp_path / "w.safetensors", metric))
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for shape in [(2, 3, 64, 64), (1, 3, 100, 80), (1, 3, 37, 61)]:
            a = torch.rand(shape, generator=g) * 2 - 1
            b = (a + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
            want = metric.net(a, b).reshape(-1)
            got = ours(a, b)
            assert got.shape == want.shape and float(want.min()) > 1e-3  # values that are not ~0
            worst = max(worst, float((got - want).abs().max()))
            # what the official script calls: the metric's forward, one image at a time
            assert abs(float(metric(a[:1], b[:1])) - float(got[0])) <= 1e-5
        # torchmetrics_lpips (used when torchvision is present) is the same network
        fn = torchmetrics_lpips("cpu")
        a, b = torch.rand(1, 3, 48, 48, generator=g) * 2 - 1, torch.rand(1, 3, 48, 48, generator=g) * 2 - 1
        assert abs(float(fn(a, b)[0]) - float(ours(a, b)[0])) <= 1e-5
    assert worst <= 1e-5
    print(f"SqueezeLPIPS vs torchmetrics: max |Δ| {worst:.2e}")


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="not an LPIPS-squeeze network"):
        export_lpips_weights(tmp_path / "x.safetensors", {"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)})
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - not installable here: building torchmetrics' metric fails clearly
        with pytest.raises(ModuleNotFoundError, match="torchvision"):
            export_lpips_weights(tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()
