"""Architectures the dry run builds (configs of public checkpoints, nothing downloaded), their
parameter counts from the config, and the pipeline with random weights created on the device.

Every per-architecture fact lives in `ARCHS` (one entry per checkpoint, its `family` naming the editor
family of `rcgrpo.editors`); what differs between families (parameter counts, the blocks a depth scale
keeps, the pipeline class, the text stream's length) is a function of the family here.

    family            transformer                          blocks              text stream
    flux-kontext      FluxTransformer2DModel (12B)         19 double + 38 single   T5 tokens, padded to 512
    qwen-image-edit   QwenImageTransformer2DModel (20B)    60 double           Qwen2.5-VL template: vision
                                                                               tokens of the source image +
                                                                               instruction + 7 template tokens
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings

ARCHS: dict[str, dict] = {
    "flux-kontext-dev": {
        "description": "black-forest-labs/FLUX.1-Kontext-dev (12B transformer, 16-channel VAE)",
        "transformer": dict(
            patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=[16, 56, 56],
        ),
        "vae": dict(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
            mid_block_add_attention=True,
        ),
        "scheduler": dict(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
        ),
        "text_len": 512,  # T5 tokens (max_sequence_length)
        "text_dim": 4096,  # T5-XXL hidden size
        "pooled_dim": 768,  # CLIP-L pooled output
        "family": "flux-kontext",
    },
}

# Qwen-Image-Edit (2508) and its Plus pipeline (2509; the 2511 transformer adds zero_cond_t): the public
# transformer/vae/scheduler configs (equal to diffusers' QwenImageTransformer2DModel and
# AutoencoderKLQwenImage defaults) and Qwen2.5-VL-7B-Instruct's sizes.
_QWEN_EDIT = {
    "family": "qwen-image-edit",
    "transformer": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56],
    ),
    "vae": dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                      -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                     1.6382, 1.1253, 2.8251, 1.916],
    ),
    "scheduler": dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
        max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential",
    ),
    "text_len": 128,  # instruction tokens of the random prompt (the qwen-edit presets' max_sequence_length)
    "max_text_len": 1024,  # the pipelines refuse longer instructions
    "text_dim": 3584,  # Qwen2.5-VL-7B hidden size (= joint_attention_dim)
    # Qwen2.5-VL-7B-Instruct (Qwen2_5_VLForConditionalGeneration: 28-layer LM with its untied LM head and the
    # 32-block vision tower), counted on the meta device from these sizes (tests/test_dryrun_qwen.py).
    "text_encoder_params": 8_292_166_656,
    "text_encoder_config": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
    "source_area": 1024 * 1024,  # the pipelines' VAE image area (any edit size)
    "vision_pixels_per_token": 28,  # Qwen2-VL: 14 px patches merged 2×2
    "vision_min_pixels": 56 * 56,  # Qwen2VLImageProcessor's min_pixels / max_pixels
    "vision_max_pixels": 28 * 28 * 16384,
    "negative_tokens": 1,  # the negative prompt " "
    "guidance_scale": 4.0,  # true CFG
}
ARCHS["qwen-image-edit"] = dict(
    _QWEN_EDIT, description="Qwen/Qwen-Image-Edit (20B MMDiT, Qwen2.5-VL-7B encoder, 16-channel VAE)",
    pipeline="QwenImageEditPipeline",
    vl_area=None,  # the vision-language encoder sees the source at the source area
    template_tokens=7,  # <|vision_start|> <|vision_end|> and the 5 closing tokens
)
ARCHS["qwen-image-edit-plus"] = dict(
    _QWEN_EDIT, description="Qwen/Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline; 20B MMDiT, Qwen2.5-VL-7B "
                            "encoder seeing a 384² condition image)",
    pipeline="QwenImageEditPlusPipeline",
    vl_area=384 * 384,  # CONDITION_IMAGE_SIZE
    template_tokens=11,  # + "Picture 1: " before the vision tokens
)
FAMILY_OF_TRANSFORMER = {"FluxTransformer2DModel": "flux-kontext", "QwenImageTransformer2DModel": "qwen-image-edit"}

# The LoRA targets of RCGRPOConfig: all eight projections exist in double-stream blocks, only
# to_q/to_k/to_v in single-stream blocks (their attention is pre_only; proj_out is not targeted).
DOUBLE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SINGLE_LORA_TARGETS = ("to_q", "to_k", "to_v")


def family_of(transformer_config: dict) -> str:
    """The editor family of a transformer config: its `_class_name` when it has one (a model folder's
    config.json, a loaded model's `.config`), else FLUX when it has single-stream blocks, Qwen-Image when not."""
    name = transformer_config.get("_class_name")
    if name in FAMILY_OF_TRANSFORMER:
        return FAMILY_OF_TRANSFORMER[name]
    if name is not None:
        raise ValueError(f"transformer class {name!r} has no memory model; known: {', '.join(FAMILY_OF_TRANSFORMER)}")
    return "flux-kontext" if "num_single_layers" in transformer_config else "qwen-image-edit"


def block_counts(transformer_config: dict) -> tuple[int, int]:
    """(double-stream, single-stream) blocks of a transformer config (Qwen-Image has only double-stream ones)."""
    return int(transformer_config["num_layers"]), int(transformer_config.get("num_single_layers", 0))


def scaled_transformer_config(arch: str, depth_scale: float = 1.0) -> dict:
    """The architecture's transformer config with `depth_scale` of its double and single blocks (≥ 1 each)."""
    cfg = dict(ARCHS[arch]["transformer"])
    for key in ("num_layers", "num_single_layers"):
        if key in cfg:
            cfg[key] = max(1, round(cfg[key] * depth_scale))
    return cfg


def transformer_params(cfg: dict) -> int:
    """Parameters of the transformer of `cfg`'s family (`flux_transformer_params` / `qwen_transformer_params`)."""
    return flux_transformer_params(cfg) if family_of(cfg) == "flux-kontext" else qwen_transformer_params(cfg)


def flux_transformer_params(cfg: dict) -> int:
    """Parameters of `FluxTransformer2DModel(**cfg)` (diffusers ≥ 0.32 layout), counted from the config.

    With d = heads·head_dim and an MLP of 4d:
        double block = 2(6d² + 6d) [AdaLN-Zero ×2] + 8(d² + d) [q,k,v,out and their text twins]
                       + 4·head_dim [q/k RMSNorms] + 2(8d² + 5d) [two MLPs]          = 36d² + 30d + 4·head_dim
        single block = (3d² + 3d) + (4d² + 4d) + (5d² + d) + 3(d² + d) + 2·head_dim  = 15d² + 11d + 2·head_dim
    plus the time/guidance/pooled-text embedders, the context and latent embedders, the output
    AdaLayerNorm and projection.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    hd = cfg["attention_head_dim"]
    mlp = int(d * 4.0)
    patch = cfg.get("patch_size", 1)
    cin = cfg["in_channels"]
    cout = cfg.get("out_channels") or cin
    time_embed = 256 * d + d + d * d + d
    embed = time_embed * (2 if cfg.get("guidance_embeds", False) else 1)
    embed += cfg["pooled_projection_dim"] * d + d + d * d + d
    embed += cfg["joint_attention_dim"] * d + d  # context_embedder
    embed += cin * d + d  # x_embedder
    double = 2 * (6 * d * d + 6 * d) + 8 * (d * d + d) + 4 * hd + 2 * (d * mlp + mlp + mlp * d + d)
    single = (3 * d * d + 3 * d) + (d * mlp + mlp) + ((d + mlp) * d + d) + 3 * (d * d + d) + 2 * hd
    out = (2 * d * d + 2 * d) + (d * patch * patch * cout + patch * patch * cout)
    return embed + cfg["num_layers"] * double + cfg["num_single_layers"] * single + out


def qwen_transformer_params(cfg: dict) -> int:
    """Parameters of `QwenImageTransformer2DModel(**cfg)` (diffusers ≥ 0.35 layout), counted from the config.

    Every block is double-stream, with the layout of a FLUX double block (two AdaLN modulations of 6d,
    q/k/v/out and their text twins with biases, four q/k RMSNorms of head_dim, two GELU MLPs of 4d):
        block = 36d² + 30d + 4·head_dim
    plus the timestep embedder (256 → d → d), the text RMSNorm (joint_attention_dim) and the text and
    image input projections, the output AdaLayerNormContinuous (d → 2d) and projection (d → p²·C_out).
    Qwen-Image-Edit: 60 blocks of 339,831,296 + 40,523,328 = 20,430,401,088.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    hd = cfg["attention_head_dim"]
    mlp = 4 * d
    patch = cfg.get("patch_size", 2)
    cin = cfg["in_channels"]
    cout = cfg.get("out_channels") or cin
    text = cfg["joint_attention_dim"]
    embed = (256 * d + d) + (d * d + d)  # time_text_embed.timestep_embedder
    embed += text + (text * d + d) + (cin * d + d)  # txt_norm, txt_in, img_in
    block = 2 * (6 * d * d + 6 * d) + 8 * (d * d + d) + 4 * hd + 2 * (d * mlp + mlp + mlp * d + d)
    out = (2 * d * d + 2 * d) + (d * patch * patch * cout + patch * patch * cout)
    return embed + cfg["num_layers"] * block + out


def lora_params(cfg: dict, rank: int) -> int:
    """LoRA parameters r·(in + out) of every targeted d×d projection (8 per double, 3 per single block)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n_double, n_single = block_counts(cfg)
    modules = len(DOUBLE_LORA_TARGETS) * n_double + len(SINGLE_LORA_TARGETS) * n_single
    return modules * rank * (d + d)


def is_qwen_vae(vae_config: dict) -> bool:
    """Whether a VAE config is Qwen-Image's `AutoencoderKLQwenImage` (a 3D-causal VAE with `z_dim`)."""
    return vae_config.get("_class_name") == "AutoencoderKLQwenImage" or "z_dim" in vae_config


@functools.lru_cache(maxsize=8)
def _vae_params_cached(config_json: str) -> int:
    import inspect

    import torch
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    config = json.loads(config_json)
    cls = AutoencoderKLQwenImage if is_qwen_vae(config) else AutoencoderKL
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    with torch.device("meta"):
        vae = cls(**{k: v for k, v in config.items() if k in accepted})
    return sum(p.numel() for p in vae.parameters())


def vae_params(vae_config: dict) -> int:
    """Parameters of `AutoencoderKL(**vae_config)`, or `AutoencoderKLQwenImage(**vae_config)` for a Qwen-Image
    VAE config (counted on the meta device: no memory, no init; keys the class does not take are ignored)."""
    return _vae_params_cached(json.dumps(vae_config, sort_keys=True))


def vision_tokens(arch: str, height: int, width: int) -> int:
    """Qwen2-VL vision tokens of a `height`×`width` image: sides rounded to 28 px (14 px patches merged 2×2),
    the area kept within the image processor's min/max pixels (its `smart_resize`)."""
    spec = ARCHS[arch]
    unit = spec["vision_pixels_per_token"]
    h, w = max(unit, round(height / unit) * unit), max(unit, round(width / unit) * unit)
    if h * w > spec["vision_max_pixels"]:
        beta = math.sqrt(height * width / spec["vision_max_pixels"])
        h, w = math.floor(height / beta / unit) * unit, math.floor(width / beta / unit) * unit
    elif h * w < spec["vision_min_pixels"]:
        beta = math.sqrt(spec["vision_min_pixels"] / (height * width))
        h, w = math.ceil(height * beta / unit) * unit, math.ceil(width * beta / unit) * unit
    return (h // unit) * (w // unit)


def area_size(area: int, aspect: float = 1.0) -> tuple[int, int]:
    """(height, width) of about `area` pixels at width/height `aspect`, sides rounded to 32 px: the
    Qwen-Image-Edit pipelines' `calculate_dimensions`."""
    width = math.sqrt(area * aspect)
    height = width / aspect
    return int(round(height / 32) * 32), int(round(width / 32) * 32)


def qwen_text_tokens(arch: str, instruction_tokens: int, *, source_area: int | None = None) -> tuple[int, int]:
    """(N_txt, N_neg): tokens of the prompt's and of the negative prompt's text stream for a square source.

    The stream is the chat template with the system prompt dropped: the vision tokens of the image the
    vision-language encoder sees (QwenImageEditPipeline: the source at the source area; the Plus pipeline: a
    384² condition image), the template's own tokens and the instruction's (the negative prompt " ": 1)."""
    spec = ARCHS[arch]
    area = spec["vl_area"] or (source_area or spec["source_area"])
    vision = vision_tokens(arch, *area_size(area))
    return vision + spec["template_tokens"] + instruction_tokens, vision + spec["template_tokens"] + spec[
        "negative_tokens"]


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(arch: str, transformer_config: dict, *, device, dtype, seed: int = 0):
    """The architecture's pipeline (FluxKontextPipeline, QwenImageEditPipeline or QwenImageEditPlusPipeline)
    with random weights, created on `device` in `dtype`.

    Modules are constructed under `torch.device(device)` with `dtype` as the default dtype, so every
    parameter is allocated once, where it lives, with PyTorch's default (cheap) initialization; no
    fp32 host copy exists. The text encoders, tokenizers and processors are None (prompt embeddings are given).
    """
    import torch
    import diffusers

    spec = ARCHS[arch]
    qwen = spec["family"] == "qwen-image-edit"
    transformer_cls = diffusers.QwenImageTransformer2DModel if qwen else diffusers.FluxTransformer2DModel
    vae_cls = diffusers.AutoencoderKLQwenImage if qwen else diffusers.AutoencoderKL
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad(), _default_dtype(dtype), torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformer = transformer_cls(**transformer_config)
            vae = vae_cls(**spec["vae"])
    for module in (transformer, vae):
        module.eval()
        module.requires_grad_(False)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    if qwen:
        pipe = getattr(diffusers, spec["pipeline"])(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                                   processor=None, transformer=transformer)
    else:
        pipe = diffusers.FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                             text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


__all__ = ["ARCHS", "DOUBLE_LORA_TARGETS", "FAMILY_OF_TRANSFORMER", "SINGLE_LORA_TARGETS", "area_size", "block_counts",
           "build_pipeline", "family_of", "flux_transformer_params", "is_qwen_vae", "lora_params", "param_bytes",
           "qwen_text_tokens", "qwen_transformer_params", "scaled_transformer_config", "transformer_params",
           "vae_params", "vision_tokens"]
