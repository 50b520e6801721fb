"""`rcgrpo dryrun --arch qwen-image-edit`, Qwen-Image-Edit's memory model, the qwen-edit presets and the
editor options a training run applies (`Editor.configure`)."""
import contextlib
import io
import json

import pytest
import torch

from rcgrpo import cli
from rcgrpo.dryrun.archs import (ARCHS, _default_dtype, lora_params, qwen_text_tokens, qwen_transformer_params,
                                 scaled_transformer_config, vae_params)
from rcgrpo.dryrun.memory import GIB, REFERENCE_GPUS, estimate_memory, memory_suggestions

H100 = REFERENCE_GPUS["H100 (78 GiB usable)"]
QWEN = ARCHS["qwen-image-edit"]
# 1 of the 60 full-width blocks, 64 px edits of a 64 px source (16 + 16 image tokens), 16 instruction tokens;
# fp32, as the CPU's bf16 3D convolutions make the VAE take minutes.
SMALL = ["dryrun", "--arch", "qwen-image-edit", "--depth-scale", "0.01", "--resolution", "64", "--source-resolution",
         "64", "--group", "3", "--anchors", "2", "--steps", "2", "--train-steps", "1", "--text-len", "16",
         "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dryrun-qwen") / "report.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([*SMALL, "--json", str(out)])
    return rc, stdout.getvalue(), stderr.getvalue(), out


def _phases(report):
    return {p["key"]: p for p in report["phases"]}


def _full_kwargs(resolution: int, **changes) -> dict:
    """`estimate_memory` arguments of a real Qwen-Image-Edit run on one GPU (bf16 autocast, Triton ACD,
    G = 12, B = 4, T = 28, 8 train transitions, rank 32, the text encoder on the GPU)."""
    return dict(transformer_config=QWEN["transformer"], vae_config=QWEN["vae"], resolution=resolution,
                group_size=12, num_anchors=4, num_steps=28, train_steps=8, text_len=128, lora_rank=32,
                device_type="cuda", text_encoder="device") | changes


# ------------------------------------------------------------------------------------------------ the dry run
def test_reduced_qwen_dry_run_runs_one_iteration(small_run):
    rc, stdout, stderr, out = small_run
    assert rc == 0, stderr
    report = json.loads(out.read_text())
    phases = _phases(report)
    for key in ("iteration", "rollout", "rollout_transformer", "acd", "vae_encode", "decode", "reward", "update",
                "anchor_forward", "distances", "optimizer"):
        assert phases[key]["time_s"] > 0, key
    for key in ("rollout", "decode", "update"):
        assert phases[key]["peak_bytes"] > 0, key
    # True CFG batched: one transformer call per Euler step; ACD on the one block's attention per step.
    assert phases["rollout_transformer"]["calls"] == 2 and phases["acd"]["calls"] == 2
    assert report["config"]["depth"] == {"double": 1, "single": 0, "double_full": 60, "single_full": 0}
    # 64² source: 4 vision tokens + 7 template tokens + 16 instruction tokens; negative prompt " ": 1 token.
    assert report["config"]["tokens"] == {"text": 27, "negative": 12, "image": 16, "context": 16, "total": 59}
    assert report["built"]["transformer_params"] == qwen_transformer_params(scaled_transformer_config(
        "qwen-image-edit", 0.01))
    assert report["error"] is None and report["metrics"]["loss"] is not None
    for label in ("qwen-image-edit", "blocks 1/60 double", "negative prompt: 12", "full model",
                  "weights: text encoder", "fits the device: yes"):
        assert label in stdout, label


def test_reduced_qwen_estimate_matches_the_run(small_run):
    report = json.loads(small_run[3].read_text())
    mem = report["memory"]
    assert 0.7 < mem["estimate_over_measured"] < 1.4, mem["estimate_over_measured"]
    terms = {t["key"]: t for t in mem["estimate"]["terms"]}
    assert terms["weights_transformer"]["bytes"] == report["built"]["transformer_param_bytes"]
    assert terms["weights_vae"]["bytes"] == report["built"]["vae_param_bytes"]
    assert terms["lora_adamw"]["bytes"] == report["built"]["lora_params"] * 16
    assert "weights_text_encoder" not in terms  # the dry run builds no text encoder ...
    full = {t["key"]: t for t in mem["full_depth"]["estimate"]["terms"]}
    assert full["weights_text_encoder"]["bytes"] == QWEN["text_encoder_params"] * 2  # ... the real run has one
    assert full["weights_transformer"]["bytes"] == 20_430_401_088 * 2


# ------------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("depth_scale", [0.01, 1.0])
def test_qwen_param_count_matches_the_model(depth_scale):
    from diffusers import QwenImageTransformer2DModel

    cfg = scaled_transformer_config("qwen-image-edit", depth_scale)
    with torch.device("meta"), _default_dtype(torch.bfloat16):
        model = QwenImageTransformer2DModel(**cfg)
    assert qwen_transformer_params(cfg) == sum(p.numel() for p in model.parameters())
    if depth_scale == 1.0:
        assert qwen_transformer_params(cfg) == 20_430_401_088  # Qwen-Image(-Edit)'s 20B MMDiT
    assert vae_params(QWEN["vae"]) == 126_892_531  # AutoencoderKLQwenImage


def test_qwen_lora_count_matches_peft():
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    from rcgrpo.editors.qwen_image_edit import QwenImageEditor

    cfg = dict(QWEN["transformer"], num_layers=3, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
               axes_dims_rope=[4, 6, 6])
    model = QwenImageTransformer2DModel(**cfg)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(QwenImageEditor.lora_targets)))
    assert lora_params(cfg, 4) == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert qwen_transformer_params(cfg) == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_text_encoder_count_matches_qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sizes = QWEN["text_encoder_config"]
    config = Qwen2_5_VLConfig(text_config=dict(sizes["text"], tie_word_embeddings=False),
                              vision_config=sizes["vision"], tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == QWEN["text_encoder_params"]


def test_text_stream_lengths():
    # QwenImageEditPipeline: the VL encoder sees the source at 1024² -> 1036² -> 37² vision tokens.
    assert qwen_text_tokens("qwen-image-edit", 20) == (1369 + 7 + 20, 1369 + 7 + 1)
    assert qwen_text_tokens("qwen-image-edit", 20, source_area=512 * 512) == (18 * 18 + 7 + 20, 18 * 18 + 8)
    # The Plus pipeline: a 384² condition image (392² -> 14² tokens), whatever the source area.
    assert qwen_text_tokens("qwen-image-edit-plus", 20) == (196 + 11 + 20, 196 + 12)


# ------------------------------------------------------------------------------------------------ the memory model
def test_qwen_estimate_terms_at_full_size():
    base = estimate_memory(**_full_kwargs(1024))
    assert base.inputs["family"] == "qwen-image-edit"
    assert base.inputs["tokens"] == {"text": 1504, "negative": 1377, "image": 4096, "context": 4096, "total": 9696}
    assert base.term("weights_transformer").bytes == 20_430_401_088 * 2
    assert base.term("weights_text_encoder").bytes == 8_292_166_656 * 2
    assert base.term("lora_adamw").bytes == 60 * 8 * 32 * 2 * 3072 * 16
    assert base.term("states").bytes == 12 * 29 * 4096 * 64 * 2
    assert base.term("conditioning").bytes > (1504 + 1377) * 3584 * 2
    # the rollout's no-grad forward of 2G samples (CFG batched) of 9696 tokens: tens of GiB, not hundreds
    assert 10 * GIB < base.term("rollout_activations").bytes < 60 * GIB
    # the update keeps the graphs of B·c = 32 samples x 2 CFG passes x 60 blocks: far beyond any GPU
    assert base.term("update_activations").bytes > 1000 * GIB
    ckpt = estimate_memory(**_full_kwargs(1024, gradient_checkpointing=True))
    # measured: ~2.6 units kept per block against 20.7 without checkpointing (see QWEN_CKPT_COEF)
    assert 100 * GIB < ckpt.term("update_activations").bytes < base.term("update_activations").bytes / 5
    # weights + LoRA + states ≈ 55 GiB: the persistent part alone nearly fills an H100
    persistent = sum(base.term(k).bytes for k in ("weights_transformer", "weights_vae", "weights_text_encoder",
                                                  "lora_adamw"))
    assert 50 * GIB < persistent < 60 * GIB


def test_qwen_estimate_grows_with_resolution_and_group():
    for option in ({}, {"gradient_checkpointing": True, "train_step_chunk": 1, "text_encoder": "offloaded"}):
        peaks = [estimate_memory(**_full_kwargs(r, **option)).peak for r in (256, 512, 768, 1024)]
        assert peaks == sorted(peaks) and len(set(peaks)) == 4, peaks
        rollouts = [estimate_memory(**_full_kwargs(512, group_size=g, **option)).phase_peaks["rollout"]
                    for g in (6, 12, 24)]
        assert rollouts == sorted(rollouts) and len(set(rollouts)) == 3, rollouts


@pytest.mark.parametrize("resolution", [512, 1024])
def test_each_option_lowers_the_qwen_estimate(resolution):
    base = _full_kwargs(resolution, gradient_checkpointing=True, train_step_chunk=2)
    ref = estimate_memory(**base)
    lower = {
        "text encoder offloaded": ({"text_encoder": "offloaded"}, ("rollout", "decode", "update")),
        "gradient checkpointing": ({}, ()),  # on in the base; off is checked below
        "states offloaded": ({"offload_states": True}, ("update",)),
        "fewer transitions per backward": ({"train_step_chunk": 1}, ("update",)),
        "CFG passes one at a time": ({"cfg_batch": False}, ("rollout", "update")),
        "smaller source": ({"source_resolution": 512 if resolution == 1024 else 256}, ("rollout", "update")),
    }
    for name, (change, phases) in lower.items():
        est = estimate_memory(**(base | change))
        for phase in phases:
            assert est.phase_peaks[phase] < ref.phase_peaks[phase], (name, phase)
    no_ckpt = estimate_memory(**(base | {"gradient_checkpointing": False}))
    assert no_ckpt.phase_peaks["update"] > 4 * ref.phase_peaks["update"]  # measured coefficients: ~4.9x
    offloaded = estimate_memory(**(base | {"text_encoder": "offloaded"}))
    assert offloaded.phase_peaks["encode"] > offloaded.term("weights_text_encoder").bytes  # on the GPU to encode
    assert ref.phase_peaks["update"] - offloaded.phase_peaks["update"] == ref.term("weights_text_encoder").bytes


@pytest.mark.parametrize("resolution", [512, 1024])
def test_h100_advice_for_qwen_ends_in_a_fitting_setting(resolution):
    kwargs = _full_kwargs(resolution)
    assert estimate_memory(**kwargs).peak > H100
    advice = [a for a in memory_suggestions(kwargs, H100) if a["peak_bytes"] is not None]
    assert advice[0]["change"] == "--offload-text-encoder"
    assert "--gradient-checkpointing" in advice[1]["change"]
    assert advice[-1]["fits"] and advice[-1]["peak_bytes"] <= H100
    assert all(a["peak_bytes"] > b["peak_bytes"] for a, b in zip(advice, advice[1:]))


def test_flux_estimate_refuses_qwen_options():
    cfg = scaled_transformer_config("flux-kontext-dev", 1.0)
    with pytest.raises(ValueError, match="Qwen-Image-Edit options"):
        estimate_memory(cfg, resolution=512, group_size=12, num_anchors=4, num_steps=28, train_steps=8,
                        source_resolution=512)


def test_estimate_reads_the_family_from_a_model_config():
    """What `rcgrpo train`'s pre-flight passes: a loaded transformer's config (with `_class_name`)."""
    cfg = dict(QWEN["transformer"], _class_name="QwenImageTransformer2DModel", _diffusers_version="0.35.0")
    est = estimate_memory(cfg, {"_class_name": "AutoencoderKLQwenImage"}, resolution=512, group_size=12,
                          num_anchors=4, num_steps=28, train_steps=8, text_dim=4096)
    assert est.inputs["family"] == "qwen-image-edit"
    assert est.term("weights_vae").bytes == 126_892_531 * 2
    assert est.inputs["tokens"]["text"] == 1369 + 7 + 512  # text_len = max_sequence_length (512 by default)


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", ["qwen-edit-512", "qwen-edit-1024"])
def test_qwen_presets_parse_validate_and_fit(name):
    from rcgrpo.cli.parsing import parse
    from rcgrpo.cli.train import TrainCommandArguments
    from rcgrpo.train.config import PRESETS, RCGRPOConfig, preset

    config = preset(name)
    assert config.model == "Qwen/Qwen-Image-Edit" and config.guidance_scale == 4.0 and config.negative_prompt == " "
    assert config.mixed_precision == "bf16" and config.gradient_checkpointing and config.offload_text_encoder
    options, parsed = parse((TrainCommandArguments, RCGRPOConfig), ["--preset", name, "--output-dir", "runs/q"],
                            "rcgrpo train", defaults=PRESETS[name])
    assert parsed.resolution == config.resolution
    estimate = estimate_memory(**_full_kwargs(
        config.resolution, group_size=config.group_size, num_anchors=config.num_anchors,
        num_steps=config.num_inference_steps, train_steps=len(config.train_timestep_indices(config.num_inference_steps)),
        train_step_chunk=config.train_step_chunk, text_len=config.max_sequence_length, lora_rank=config.lora_rank,
        gradient_checkpointing=config.gradient_checkpointing, offload_states=config.offload_states,
        source_resolution=config.source_resolution, cfg_batch=config.cfg_batch, acd_layers=config.acd_layers,
        vae_slicing=config.vae_slicing, text_encoder="offloaded" if config.offload_text_encoder else "device"))
    assert estimate.peak <= H100, (name, estimate.peak / GIB)


# ------------------------------------------------------------------------------------------------ arguments
FLUX_SMALL = ["dryrun", "--depth-scale", "0.03", "--resolution", "64", "--group", "3", "--anchors", "2", "--steps", "2",
              "--train-steps", "1", "--device", "cpu"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([*FLUX_SMALL, "--source-resolution", "512"], "--source-resolution"),
        ([*FLUX_SMALL, "--offload-text-encoder"], "--offload-text-encoder"),
        ([*SMALL, "--resolution", "80"], "--resolution 80"),
        ([*SMALL, "--source-resolution", "100"], "--source-resolution 100"),
        ([*SMALL, "--text-len", "2000"], "--text-len 2000"),
    ],
)
def test_bad_qwen_arguments_exit_2(argv, needle, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------ Editor.configure
def test_editor_options_reach_the_editor(tmp_path):
    from rcgrpo.testing import tiny_kontext_editor, tiny_qwen_editor
    from rcgrpo.train.config import RCGRPOConfig

    editor = tiny_qwen_editor()
    assert editor.source_area == 64 * 64 and editor.cfg_batch
    editor.configure(**RCGRPOConfig(model="tiny-qwen", source_resolution=96, cfg_batch=False,
                                    output_dir=str(tmp_path)).editor_options())
    assert editor.source_area == 96 * 96 and editor.cfg_batch is False and not editor.offload_text_encoder
    editor.configure(source_resolution=None, cfg_batch=True)  # unset keeps the editor's source area
    assert editor.source_area == 96 * 96 and editor.cfg_batch is True

    kontext = tiny_kontext_editor()
    kontext.configure(**RCGRPOConfig(output_dir=str(tmp_path)).editor_options())  # defaults: nothing to refuse
    with pytest.raises(ValueError, match="source_resolution"):
        kontext.configure(source_resolution=512)
    with pytest.raises(ValueError, match="cfg_batch"):
        kontext.configure(cfg_batch=False)


def test_offloaded_text_encoder_encodes_the_same():
    from rcgrpo.testing import tiny_qwen_editor

    editor = tiny_qwen_editor()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_sequence_length=32, negative_prompt=" ")
    expected = editor.encode_text("make the hat red", image, **kwargs)
    moves = []
    original = torch.nn.Module.to

    def spy(module, *args, **kw):
        if module is editor.pipe.text_encoder:
            moves.append(str(args[0]) if args else str(kw.get("device")))
        return original(module, *args, **kw)

    editor.configure(offload_text_encoder=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "to", spy)
        text = editor.encode_text("make the hat red", image, **kwargs)
    assert moves == ["cpu", "cpu"]  # to the editor's device (here the CPU) for the encoding, and back
    torch.testing.assert_close(text.prompt_embeds, expected.prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(text.negative_embeds, expected.negative_embeds, rtol=0, atol=0)
    assert next(editor.pipe.text_encoder.parameters()).device.type == "cpu"


def test_trainer_applies_the_editor_options(tmp_path):
    from rcgrpo.data.synthetic import SquareDataset, redness_reward
    from rcgrpo.testing import tiny_qwen_editor
    from rcgrpo.train.config import RCGRPOConfig
    from rcgrpo.train.trainer import RCGRPOTrainer

    config = RCGRPOConfig(model="tiny-qwen", resolution=64, group_size=3, num_anchors=2, num_inference_steps=2,
                          max_sequence_length=16, guidance_scale=4.0, source_resolution=96, cfg_batch=False,
                          reward_funcs=["redness"], w_acd=0.0, output_dir=str(tmp_path), report_to="none",
                          device="cpu", train_size=1, eval_size=0)
    trainer = RCGRPOTrainer(tiny_qwen_editor(), config, [("redness", redness_reward)], SquareDataset(1, size=64))
    assert trainer.editor.source_area == 96 * 96 and trainer.editor.cfg_batch is False
    group = trainer.rollout_group(0, 0, 0)
    assert group.conditioning.source_latents.shape[1] == (96 // 16) ** 2 and group.conditioning.cfg_batch is False
