"""`rcgrpo dryrun`: one RC-GRPO iteration of the FLUX.1-Kontext-dev architecture (reduced depth on CPU)."""
import json
import time

import pytest
import torch

from rcgrpo import cli
from rcgrpo.dryrun.archs import ARCHS, _default_dtype, flux_transformer_params, lora_params, scaled_transformer_config
from rcgrpo.dryrun.measure import PhaseTracker
from rcgrpo.dryrun.memory import estimate_memory, memory_suggestions
from rcgrpo_kernels.acd_attention import acd_attention_eager

# 1 double + 1 single full-width block, 64 px (16 target tokens), 64 text tokens: a few seconds per phase.
SMALL = ["dryrun", "--depth-scale", "0.03", "--resolution", "64", "--group", "3", "--anchors", "2", "--steps", "2",
         "--train-steps", "1", "--text-len", "64", "--device", "cpu"]
PHASES_WITH_TIME = ("iteration", "rollout", "rollout_transformer", "acd", "vae_encode", "decode", "reward",
                    "advantages", "update", "anchor_forward", "distances", "optimizer", "backward", "diagnostics")
PHASES_WITH_MEMORY = ("iteration", "rollout", "decode", "update")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dryrun") / "report.json"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([*SMALL, "--json", str(out)])
    return rc, stdout.getvalue(), stderr.getvalue(), out


def _phases(report):
    return {p["key"]: p for p in report["phases"]}


def test_reduced_dry_run_reports_every_phase(small_run):
    rc, stdout, stderr, out = small_run
    assert rc == 0, stderr
    report = json.loads(out.read_text())  # valid JSON (no NaN)
    phases = _phases(report)
    for key in PHASES_WITH_TIME:
        assert phases[key]["time_s"] > 0, key
    for key in PHASES_WITH_MEMORY:
        assert phases[key]["peak_bytes"] > 0, key
    for p in report["phases"]:
        assert 0.0 <= p["share"] <= 1.0, p
    assert 0.0 < report["acd_share"] <= 1.0
    assert 0.0 < report["distance_share"] <= 1.0
    top = sum(phases[k]["time_s"] for k in ("rollout", "decode", "reward", "advantages", "update", "diagnostics",
                                            "other"))
    assert top == pytest.approx(phases["iteration"]["time_s"], rel=1e-6)
    # 2 rollout steps x 2 ACD layers (the reduced model has 2 attention modules), one anchor forward.
    assert phases["rollout_transformer"]["calls"] == 2 and phases["acd"]["calls"] == 4
    assert phases["anchor_forward"]["calls"] == 1
    assert report["config"]["depth"] == {"double": 1, "single": 1, "double_full": 19, "single_full": 38}
    assert report["config"]["tokens"] == {"text": 64, "image": 16, "context": 16, "total": 96}
    assert report["device"]["type"] == "cpu" and report["device"]["total_memory_bytes"] > 0
    assert {"torch", "diffusers", "transformers", "peft", "python"} <= set(report["versions"])
    assert report["memory"]["fits"] is True and report["error"] is None
    assert report["metrics"]["loss"] is not None
    # The table on stdout.
    for label in ("rollout", "transformer forward", "ACD", "decode", "reward", "update", "distances",
                  "ACD share of the iteration", "estimate/measured", "fits the device: yes", "memory model"):
        assert label in stdout, label


def test_memory_estimate_close_to_measured_peak(small_run):
    report = json.loads(small_run[3].read_text())
    mem = report["memory"]
    ratio = mem["estimate_over_measured"]
    assert ratio == pytest.approx(mem["estimate"]["peak_bytes"] / mem["measured_peak_bytes"])
    assert 0.7 < ratio < 1.4, ratio
    phases = _phases(report)
    for key in ("rollout", "decode", "update"):
        assert phases[key]["estimate_bytes"] == mem["estimate"]["phase_peaks_bytes"][key]


def test_weight_term_equals_built_parameter_bytes(small_run):
    report = json.loads(small_run[3].read_text())
    terms = {t["key"]: t for t in report["memory"]["estimate"]["terms"]}
    built = report["built"]
    assert terms["weights_transformer"]["bytes"] == built["transformer_param_bytes"]
    assert terms["weights_vae"]["bytes"] == built["vae_param_bytes"]
    assert terms["lora_adamw"]["bytes"] == built["lora_params"] * 4 * 4  # fp32 param, grad, exp_avg, exp_avg_sq


@pytest.mark.parametrize("depth_scale", [0.03, 0.1, 1.0])
def test_weight_term_matches_meta_transformer(depth_scale):
    from diffusers import FluxTransformer2DModel

    cfg = scaled_transformer_config("flux-kontext-dev", depth_scale)
    with torch.device("meta"), _default_dtype(torch.bfloat16):
        model = FluxTransformer2DModel(**cfg)
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    est = estimate_memory(cfg, resolution=256, group_size=3, num_anchors=2, num_steps=2, train_steps=1)
    assert est.term("weights_transformer").bytes == actual
    if depth_scale == 1.0:
        assert flux_transformer_params(cfg) == 11_901_408_320  # FLUX.1 [dev] / Kontext [dev]


def test_lora_count_matches_peft():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from rcgrpo.train.config import DEFAULT_LORA_TARGETS

    cfg = dict(ARCHS["flux-kontext-dev"]["transformer"], num_layers=2, num_single_layers=3, num_attention_heads=2,
               attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6])
    model = FluxTransformer2DModel(**cfg)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(DEFAULT_LORA_TARGETS)))
    assert lora_params(cfg, 4) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert flux_transformer_params(cfg) == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_memory_model_responds_to_settings():
    cfg = scaled_transformer_config("flux-kontext-dev", 1.0)
    vae = ARCHS["flux-kontext-dev"]["vae"]
    kw = dict(transformer_config=cfg, vae_config=vae, resolution=1024, group_size=12, num_anchors=4, num_steps=28,
              train_steps=8, device_type="cuda")
    base = estimate_memory(**kw)
    assert base.term("states").bytes == 12 * 29 * 4096 * 64 * 2
    assert base.term("weights_transformer").bytes == 11_901_408_320 * 2
    ckpt = estimate_memory(**kw, gradient_checkpointing=True)
    assert ckpt.term("update_activations").bytes < base.term("update_activations").bytes / 10
    chunk = estimate_memory(**kw, gradient_checkpointing=True, train_step_chunk=2)
    assert chunk.term("update_activations").bytes == pytest.approx(ckpt.term("update_activations").bytes / 4)
    offload = estimate_memory(**kw, gradient_checkpointing=True, train_step_chunk=2, offload_states=True)
    assert offload.phase_peaks["update"] == chunk.phase_peaks["update"] - chunk.term("states").bytes
    eager = estimate_memory(**kw, acd="eager")
    assert eager.term("acd_eager").bytes == 24 * 8704**2 * (2 * 2 + 4)
    # Without checkpointing a 1024 px update cannot fit an 80 GB GPU; the suggestions end in a fitting setting.
    budget = 80 * 10**9
    assert base.peak > budget
    advice = memory_suggestions(kw, budget)
    sized = [a for a in advice if a["peak_bytes"] is not None]
    assert sized[0]["change"] == "--gradient-checkpointing"
    assert sized[-1]["fits"] and sized[-1]["peak_bytes"] <= budget
    assert memory_suggestions(kw | {"resolution": 256, "group_size": 3, "num_anchors": 2,
                                    "gradient_checkpointing": True}, budget) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--depth-scale", "0"], "--depth-scale 0"),
        (["--depth-scale", "1.5"], "--depth-scale 1.5"),
        (["--resolution", "100"], "--resolution 100"),
        (["--resolution", "32"], "--resolution 32"),
        (["--anchors", "3"], "--anchors 3"),
        (["--group", "4", "--anchors", "4"], "--anchors 4"),
        (["--train-steps", "3"], "--train-steps 3"),
        (["--text-len", "600"], "--text-len 600"),
        (["--attention", "eager", "--no-acd"], "--no-acd"),
        (["--attention", "flash"], "--attention"),
    ],
)
def test_bad_arguments_exit_2(args, needle, capsys):
    start = time.perf_counter()
    rc = cli.main([*SMALL, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 10  # rejected before any model is built


def test_cpu_run_that_cannot_fit_is_refused(capsys):
    rc = cli.main(["dryrun", "--device", "cpu", "--resolution", "1024"])  # the full 12B model at 1024 px
    err = capsys.readouterr().err
    assert rc == 2
    assert "exceeds" in err and "--force" in err and "--resolution 1024" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_gpu_exit_2(capsys):
    assert cli.main([*SMALL, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_variant_eager_checkpointing_offload(tmp_path, capsys):
    out = tmp_path / "eager.json"
    rc = cli.main([*SMALL, "--attention", "eager", "--gradient-checkpointing", "--offload-states", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["config"]["acd_backend"] == "eager"
    assert _phases(report)["acd"]["time_s"] > 0
    terms = {t["key"]: t for t in report["memory"]["estimate"]["terms"]}
    assert "acd_eager" in terms and "checkpointing" in terms["update_activations"]["formula"]
    assert report["metrics"]["loss"] is not None


def test_out_of_memory_is_reported_with_suggestions(monkeypatch, capsys):
    from rcgrpo.train.trainer import RCGRPOTrainer

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(RCGRPOTrainer, "group_loss_backward", oom)  # fails inside the update phase
    rc = cli.main(SMALL)
    captured = capsys.readouterr()
    assert rc == 1
    assert "FAILED: OutOfMemoryError in phase iteration/update" in captured.out
    assert "suggestions" in captured.out and "fits the device: NO" in captured.out
    assert "ran out of memory in phase iteration/update" in captured.err


def test_eager_acd_matches_the_op():
    from rcgrpo_kernels import acd_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen) for _ in range(3))
    weights = torch.rand(2, 8, generator=gen)
    out_ref, mass_ref = acd_attention(q, k, v, 8, 20, text_weights=weights, backend="torch")
    out, mass = acd_attention_eager(q, k, v, 8, 20, text_weights=weights)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, mass_ref, rtol=1e-5, atol=1e-5)


def test_phase_tracker_top_phases_are_exclusive():
    tracker = PhaseTracker(torch.device("cpu"))
    tracker.enter("iteration")
    tracker.enter("rollout", top=True)
    time.sleep(0.05)
    with tracker.phase("decode", top=True):
        time.sleep(0.1)
    time.sleep(0.05)
    tracker.exit("rollout", top=True)
    for _ in range(3):
        with tracker.phase("acd"):
            time.sleep(0.01)
    tracker.exit("iteration")
    assert 0.09 <= tracker.time["rollout"] < 0.15
    assert 0.09 <= tracker.time["decode"] < 0.15
    assert tracker.time["iteration"] >= tracker.time["rollout"] + tracker.time["decode"]
    assert tracker.calls["acd"] == 3 and tracker.time["acd"] >= 0.03
    assert tracker.peak["iteration"] >= tracker.peak["decode"] > 0
