"""Architectures the dry run builds (configs of public checkpoints, nothing downloaded), their
parameter counts from the config, and the pipeline with random weights created on the device."""
from __future__ import annotations

import contextlib
import functools
import json
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
    },
}

# The LoRA targets of RCGRPOConfig: all eight projections exist in double-stream blocks, only
# to_q/to_k/to_v in single-stream blocks (their attention is pre_only; proj_out is not targeted).
DOUBLE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SINGLE_LORA_TARGETS = ("to_q", "to_k", "to_v")


def scaled_transformer_config(arch: str, depth_scale: float = 1.0) -> dict:
    """The architecture's transformer config with `depth_scale` of its double and single blocks (≥ 1 each)."""
    cfg = dict(ARCHS[arch]["transformer"])
    cfg["num_layers"] = max(1, round(cfg["num_layers"] * depth_scale))
    cfg["num_single_layers"] = max(1, round(cfg["num_single_layers"] * depth_scale))
    return cfg


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


def lora_params(cfg: dict, rank: int) -> int:
    """LoRA parameters r·(in + out) of every targeted d×d projection (8 per double, 3 per single block)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    modules = len(DOUBLE_LORA_TARGETS) * cfg["num_layers"] + len(SINGLE_LORA_TARGETS) * cfg["num_single_layers"]
    return modules * rank * (d + d)


@functools.lru_cache(maxsize=8)
def _vae_params_cached(config_json: str) -> int:
    from diffusers import AutoencoderKL

    import torch

    with torch.device("meta"):
        vae = AutoencoderKL(**json.loads(config_json))
    return sum(p.numel() for p in vae.parameters())


def vae_params(vae_config: dict) -> int:
    """Parameters of `AutoencoderKL(**vae_config)` (counted on the meta device: no memory, no init)."""
    return _vae_params_cached(json.dumps(vae_config, sort_keys=True))


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
    """FluxKontextPipeline with random weights of the architecture, created on `device` in `dtype`.

    Modules are constructed under `torch.device(device)` with `dtype` as the default dtype, so every
    parameter is allocated once, where it lives, with PyTorch's default (cheap) initialization; no
    fp32 host copy exists. The text encoders and tokenizers are None (prompt embeddings are given).
    """
    import torch

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    spec = ARCHS[arch]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad(), _default_dtype(dtype), torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformer = FluxTransformer2DModel(**transformer_config)
            vae = AutoencoderKL(**spec["vae"])
    for module in (transformer, vae):
        module.eval()
        module.requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


__all__ = ["ARCHS", "DOUBLE_LORA_TARGETS", "SINGLE_LORA_TARGETS", "build_pipeline", "flux_transformer_params",
           "lora_params", "param_bytes", "scaled_transformer_config", "vae_params"]
