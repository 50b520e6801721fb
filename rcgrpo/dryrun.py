"""`rcgrpo dryrun`: one full RC-GRPO iteration of a FLUX.1-Kontext-dev-sized model with random weights.

The real `FluxTransformer2DModel` and `AutoencoderKL` architectures are built from configs embedded
here (no download), their parameters created directly on the target device in the target dtype
(no fp32 host copy), and random prompt embeddings of the real shapes (T5 512 × 4096, pooled 768)
stand in for the text encoders. Then ONE iteration of the trainer's own code path runs
(`RCGRPOTrainer.train_step` on the synthetic square task at the requested resolution, with the
built-in redness reward), instrumented per phase:

    rollout            the pipeline call of each group (transformer forwards, ACD, VAE encode)
      transformer fwd    forward passes of the transformer inside the rollout
        ACD              time inside the ACD op (or the eager variant) of the recorded layers
      VAE encode         the context image
    decode             VAE decode of the G final latents
    reward             the reward function
    advantages         reward standardization and group advantages
    update             anchor predictions with grad + backward + optimizer
      anchor forward     the transformer forward with grad
      distances          region_sq_dists forward and backward (surrogate log-probs)
      optimizer          gradient clipping and AdamW step
      backward and rest  the remainder of the update (mostly the transformer backward)
    other              the rest of the iteration (noises, masks, metrics)

Each phase gets its wall time (device-synchronized) and its peak memory (CUDA:
`torch.cuda.max_memory_allocated`, reset at every phase boundary; CPU: the peak resident set size,
reset through /proc/self/clear_refs, with glibc told to mmap allocations above 256 KiB so freed
tensors leave the RSS). `estimate_memory` is an analytic model of the peak (see its docstring for
the formulas); the report shows it next to the measured peaks with the estimate/measured ratio, and
suggests settings when the estimate exceeds the device (a run whose estimate exceeds the device is
refused unless --force; a CUDA out-of-memory during the iteration is reported with the phase it
happened in, exit status 1).

Caveats: on the CPU, glibc's mmap threshold stays at 256 KiB for the rest of the process, and the
measured peaks are RSS (including allocator slack) above the RSS before the model was built. One
iteration is the first one: AdamW's moments do not exist yet during it, while the model counts
them (steady state; 2·4 B per LoRA parameter, small).

    rcgrpo dryrun --arch flux-kontext-dev --resolution 1024 --group 12 --anchors 4 --steps 28 \\
        --train-steps 8 --gradient-checkpointing --offload-states --train-step-chunk 2 --json dry.json
    rcgrpo dryrun --depth-scale 0.06 --resolution 256 --group 3 --anchors 2 --steps 2 --train-steps 1
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Architectures (configs of the public checkpoints; nothing is downloaded)
# ----------------------------------------------------------------------------------------------
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

PHASES = (  # key, label, parent (display order)
    ("iteration", "iteration", None),
    ("rollout", "rollout", "iteration"),
    ("rollout_transformer", "transformer forward", "rollout"),
    ("acd", "ACD", "rollout_transformer"),
    ("vae_encode", "VAE encode", "rollout"),
    ("decode", "decode", "iteration"),
    ("reward", "reward", "iteration"),
    ("advantages", "advantages", "iteration"),
    ("update", "update", "iteration"),
    ("anchor_forward", "anchor forward", "update"),
    ("distances", "distances", "update"),
    ("optimizer", "optimizer", "update"),
    ("backward", "backward and rest", "update"),
    ("other", "other", "iteration"),
)
TOP_PHASES = ("rollout", "decode", "reward", "advantages", "update")
DERIVED_PHASES = ("backward", "other")

# Activation coefficients of the memory model, in units of S·d·e (tokens × hidden size × bytes of
# the model dtype) per sample. Measured with diffusers 0.42 Flux blocks (H = 8, head_dim 128, LoRA on
# the attention projections, frozen base, SDPA) as the growth of the peak per added block: forward +
# backward with grad (ACT_COEF), the same with gradient checkpointing (one block input per block plus
# CKPT_RECOMPUTE_COEF for the block recomputed in backward), and a no-grad forward (ROLLOUT_FWD_COEF).
ACT_COEF = {  # mode: (per double block, per single block, per-sample constant)
    "bf16-autocast": (18.0, 16.0, 10.0),
    "bf16": (22.0, 19.0, 10.0),
    "fp32": (13.0, 12.0, 8.0),
}
CKPT_RECOMPUTE_COEF = {"bf16-autocast": 32.0, "bf16": 33.0, "fp32": 24.0}
ROLLOUT_FWD_COEF = {"bf16-autocast": 17.5, "bf16": 18.5, "fp32": 15.25}
VAE_ENCODE_COEF = 6.0  # units of G·H·W·128·e (first encoder level at full resolution)
VAE_DECODE_COEF = 4.0  # units of G·H·W·256·e (last upsampler at full resolution)
GIB = 1024**3
REFERENCE_GPUS = {"H100 (78 GiB usable)": 78 * GIB, "H200 (139 GiB usable)": 139 * GIB}


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
@dataclass
class DryRunSettings:
    """What one dry run builds and runs (validated by `validate`)."""

    arch: str = "flux-kontext-dev"
    resolution: int = 1024
    group: int = 12
    anchors: int = 4
    steps: int = 28
    train_steps: int = 8
    train_step_chunk: int = 8
    gradient_checkpointing: bool = False
    offload_states: bool = False
    depth_scale: float = 1.0
    acd: bool = True
    attention: str = "acd"  # "acd" (the fused op) or "eager" (materialized attention weights)
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str = "bf16"
    lora_rank: int = 32
    text_len: int | None = None  # None: the architecture's T5 length (512)
    seed: int = 0
    force: bool = False
    json_path: str | None = None

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"--arch {self.arch!r}: unknown architecture; choose one of {sorted(ARCHS)}")
        if not (isinstance(self.depth_scale, (int, float)) and math.isfinite(self.depth_scale)
                and 0 < self.depth_scale <= 1):
            raise ValueError(f"--depth-scale {self.depth_scale!r}: must be in (0, 1] "
                             "(the fraction of double and single blocks kept)")
        if self.resolution < 64 or self.resolution % 16:
            raise ValueError(f"--resolution {self.resolution}: must be a multiple of 16 (8x VAE downsampling, "
                             "then 2x2 latent packing) and at least 64")
        if self.group < 2:
            raise ValueError(f"--group {self.group}: must be at least 2 (the reference and one perturbed candidate)")
        if not 1 <= self.anchors <= self.group - 1:
            raise ValueError(f"--anchors {self.anchors}: must be between 1 and --group - 1 = {self.group - 1} "
                             "(anchors are drawn from the perturbed candidates)")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be at least 1")
        if not 1 <= self.train_steps <= self.steps:
            raise ValueError(f"--train-steps {self.train_steps}: must be between 1 and --steps {self.steps}")
        if self.train_step_chunk < 1:
            raise ValueError(f"--train-step-chunk {self.train_step_chunk}: must be at least 1")
        if self.lora_rank < 1:
            raise ValueError(f"--lora-rank {self.lora_rank}: must be at least 1")
        max_text = ARCHS[self.arch]["text_len"]
        if self.text_len is not None and not 1 <= self.text_len <= max_text:
            raise ValueError(f"--text-len {self.text_len}: must be between 1 and {max_text} (T5 tokens)")
        if self.attention not in ("acd", "eager"):
            raise ValueError(f"--attention {self.attention!r}: choose 'acd' or 'eager'")
        if not self.acd and self.attention == "eager":
            raise ValueError("--attention eager computes the ACD mass eagerly; it cannot be combined with --no-acd")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"--dtype {self.dtype!r}: choose 'bf16' or 'fp32'")
        if self.device is not None:
            if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
                raise ValueError(f"--device {self.device!r}: choose 'cpu' or 'cuda'")
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.json_path is not None and Path(self.json_path).is_dir():
            raise ValueError(f"--json {self.json_path!r}: is a directory; give a file path")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def effective_text_len(self) -> int:
        return self.text_len if self.text_len is not None else ARCHS[self.arch]["text_len"]


def scaled_transformer_config(arch: str, depth_scale: float = 1.0) -> dict:
    """The architecture's transformer config with `depth_scale` of its double and single blocks (≥ 1 each)."""
    cfg = dict(ARCHS[arch]["transformer"])
    cfg["num_layers"] = max(1, round(cfg["num_layers"] * depth_scale))
    cfg["num_single_layers"] = max(1, round(cfg["num_single_layers"] * depth_scale))
    return cfg


# ----------------------------------------------------------------------------------------------
# Parameter counts (analytic, for the memory model)
# ----------------------------------------------------------------------------------------------
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

    with torch.device("meta"):
        vae = AutoencoderKL(**json.loads(config_json))
    return sum(p.numel() for p in vae.parameters())


def vae_params(vae_config: dict) -> int:
    """Parameters of `AutoencoderKL(**vae_config)` (counted on the meta device: no memory, no init)."""
    return _vae_params_cached(json.dumps(vae_config, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# Memory model
# ----------------------------------------------------------------------------------------------
@dataclass
class MemoryTerm:
    key: str
    label: str
    bytes: int
    formula: str
    phases: tuple[str, ...]  # the phase peaks ("rollout", "decode", "update") that include this term


@dataclass
class MemoryEstimate:
    terms: list[MemoryTerm]
    phase_peaks: dict[str, int]
    inputs: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.phase_peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phase_peaks, key=self.phase_peaks.get)

    def term(self, key: str) -> MemoryTerm:
        for t in self.terms:
            if t.key == key:
                return t
        raise KeyError(f"memory model has no term {key!r}; terms are {[t.key for t in self.terms]}")

    def to_dict(self) -> dict:
        return {
            "terms": [dataclasses.asdict(t) | {"phases": list(t.phases)} for t in self.terms],
            "phase_peaks_bytes": dict(self.phase_peaks),
            "peak_bytes": self.peak,
            "peak_phase": self.peak_phase,
            "inputs": dict(self.inputs),
        }


def estimate_memory(
    transformer_config: dict,
    vae_config: dict | None = None,
    *,
    resolution: int,
    group_size: int,
    num_anchors: int,
    num_steps: int,
    train_steps: int,
    train_step_chunk: int = 8,
    text_len: int = 512,
    text_dim: int = 4096,
    lora_rank: int = 32,
    dtype: str = "bf16",
    autocast: bool | None = None,
    gradient_checkpointing: bool = False,
    offload_states: bool = False,
    acd: str | None = "fused",
    acd_layers: int = 10,
    acd_backend: str = "triton",
    device_type: str = "cuda",
) -> MemoryEstimate:
    """Analytic peak memory of one RC-GRPO iteration (bytes), as the sum of the terms live in each phase.

    Symbols: e = bytes per element of the model dtype; d = hidden size; L_d, L_s = double and single
    blocks; N_img = N_ctx = (resolution/16)² image tokens, N_txt = text_len, S = N_txt + N_img + N_ctx;
    C = latent channels after packing (64); G, B, T, n = group, anchors, ODE steps, train steps;
    c = min(train_step_chunk, n); b = B·c samples per backward.

    Terms:
        weights: transformer   P_T·e (P_T from `flux_transformer_params`)
        weights: VAE            P_VAE·e
        LoRA + AdamW            4 B/param × P_L × 4 (fp32 param, grad, exp_avg, exp_avg_sq; steady state)
        rollout states          G·(T+1)·N_img·C·e; in the update only when not offloaded (on a CPU
                                device they are in RAM anyway)
        conditioning + ACD      (N_txt·text_dim + N_ctx·C)·e + ACD mass calls·G·N_img·4
        rollout activations     G·S·d·(k·e + x) for one no-grad block forward (k = 18.5 in bf16, 15.25
                                in fp32; the rollout runs without autocast), x = the ACD op's scratch
                                (C++: fp32 copies of q, k, v, out = 16 + e bytes; Triton: 0); eager ACD
                                adds H·S²·(2e + 4) (logits, fp32 softmax, cast; one sample at a time)
        VAE encode              6·G·H·W·128·e (the pipeline encodes the context image once per candidate)
        VAE decode              4·G·H·W·256·e (all G finals decoded in one batch)
        update activations      b·S·d·e·(a_d·L_d + a_s·L_s + 10) without checkpointing,
                                b·S·d·e·(L_d + L_s + r) with it (one block input kept per block,
                                one block recomputed); (a_d, a_s, r) = (18, 16, 32) with bf16 autocast
                                (CUDA), (22, 19, 33) bf16 without (CPU), (13, 12, 24) fp32, the constant
                                10 (8 in fp32) — measured as the peak growth per block of forward +
                                backward of diffusers' Flux blocks (ACT_COEF, CKPT_RECOMPUTE_COEF)
        surrogate tensors       c·(G + 3B)·N_img·C·4 + b·N_img·C·e (fp32 states, predictions, grads)

    Phase peaks: rollout = persistent + states + conditioning + max(rollout activations, VAE encode);
    decode = persistent + states + conditioning + VAE decode; update = persistent + (states unless
    offloaded) + conditioning + update activations + surrogate tensors. The peak is their maximum.
    """
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    if resolution % 16 or resolution < 16:
        raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
    e = 2 if dtype == "bf16" else 4
    if autocast is None:
        autocast = dtype == "bf16" and device_type == "cuda"
    mode = "fp32" if dtype == "fp32" else ("bf16-autocast" if autocast else "bf16")
    cfg = transformer_config
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    heads = cfg["num_attention_heads"]
    n_double, n_single = cfg["num_layers"], cfg["num_single_layers"]
    channels = cfg["in_channels"]
    n_img = (resolution // 16) ** 2
    n_txt = text_len
    seq = n_txt + 2 * n_img
    G, B, T, n = group_size, num_anchors, num_steps, train_steps
    c = min(train_step_chunk, n)
    b = B * c
    terms: list[MemoryTerm] = []
    all_phases = ("rollout", "decode", "update")

    def add(key, label, value, formula, phases=all_phases):
        terms.append(MemoryTerm(key, label, int(value), formula, tuple(phases)))

    p_t = flux_transformer_params(cfg)
    add("weights_transformer", "weights: transformer", p_t * e, f"{p_t:,} params x {e} B")
    if vae_config is not None:
        p_v = vae_params(vae_config)
        add("weights_vae", "weights: VAE", p_v * e, f"{p_v:,} params x {e} B")
    p_l = lora_params(cfg, lora_rank)
    add("lora_adamw", "LoRA + AdamW (fp32)", p_l * 4 * 4, f"{p_l:,} LoRA params x 4 B x 4 (param, grad, m, v)")
    states = G * (T + 1) * n_img * channels * e
    on_device_in_update = not offload_states or device_type == "cpu"
    add("states", "rollout states" + ("" if on_device_in_update else " (offloaded in update)"), states,
        f"G {G} x (T+1) {T + 1} x N_img {n_img} x C {channels} x {e} B",
        all_phases if on_device_in_update else ("rollout", "decode"))
    calls = (min(acd_layers, n_double + n_single) * T) if acd else 0
    cond = (n_txt * text_dim + n_img * channels) * e + calls * G * n_img * 4
    add("conditioning", "conditioning + ACD record", cond,
        f"(N_txt {n_txt} x {text_dim} + N_ctx {n_img} x C) x {e} B + {calls} calls x G x N_img x 4 B")

    scratch = (16 + e) if (acd and acd == "fused" and acd_backend == "cpp") else 0
    k_fwd = ROLLOUT_FWD_COEF["bf16" if mode == "bf16-autocast" else mode]  # the rollout runs without autocast
    rollout_act = G * seq * d * (k_fwd * e + scratch)
    add("rollout_activations", "rollout: transformer activations", rollout_act,
        f"G {G} x S {seq} x d {d} x ({k_fwd:g} x {e} B" + (f" + {scratch} B ACD op scratch)" if scratch else ")"),
        ("rollout",))
    if acd == "eager":
        eager = heads * seq * seq * (2 * e + 4)
        add("acd_eager", "rollout: eager ACD attention weights", eager,
            f"H {heads} x S² {seq}² x (2x{e} + 4) B, one sample at a time", ("rollout",))
    height = width = resolution
    vae_enc = VAE_ENCODE_COEF * G * height * width * 128 * e
    add("vae_encode", "VAE encode (G context images)", vae_enc,
        f"{VAE_ENCODE_COEF} x G {G} x {height}x{width} x 128 x {e} B", ("rollout",))
    vae_dec = VAE_DECODE_COEF * G * height * width * 256 * e
    add("vae_decode", "VAE decode (G finals)", vae_dec,
        f"{VAE_DECODE_COEF} x G {G} x {height}x{width} x 256 x {e} B", ("decode",))

    if gradient_checkpointing:
        r = CKPT_RECOMPUTE_COEF[mode]
        per_sample_units = n_double + n_single + r
        act_formula = (f"b {b} (B {B} x c {c}) x S {seq} x d {d} x {e} B x (L {n_double + n_single} + {r:g}) "
                       f"[checkpointing, {mode}]")
    else:
        a_d, a_s, k0 = ACT_COEF[mode]
        per_sample_units = a_d * n_double + a_s * n_single + k0
        act_formula = (f"b {b} (B {B} x c {c}) x S {seq} x d {d} x {e} B x ({a_d:g} x {n_double} + "
                       f"{a_s:g} x {n_single} + {k0:g}) [{mode}]")
    update_act = b * seq * d * e * per_sample_units
    add("update_activations", "update: transformer activations", update_act, act_formula, ("update",))
    surrogate = c * (G + 3 * B) * n_img * channels * 4 + b * n_img * channels * e
    add("surrogate", "update: surrogate tensors", surrogate,
        f"c {c} x (G + 3B) {G + 3 * B} x N_img x C x 4 B + b {b} x N_img x C x {e} B", ("update",))

    def phase_sum(phase: str, exclude=()) -> int:
        return sum(t.bytes for t in terms if phase in t.phases and t.key not in exclude)

    eager_bytes = sum(t.bytes for t in terms if t.key == "acd_eager")
    rollout_peak = phase_sum("rollout", exclude=("rollout_activations", "acd_eager", "vae_encode"))
    rollout_peak += max(rollout_act + eager_bytes, vae_enc)  # the VAE encode runs before the transformer
    phase_peaks = {
        "rollout": rollout_peak,
        "decode": phase_sum("decode"),
        "update": phase_sum("update"),
    }
    inputs = dict(resolution=resolution, group_size=G, num_anchors=B, num_steps=T, train_steps=n,
                  train_step_chunk=train_step_chunk, text_len=text_len, lora_rank=lora_rank, dtype=dtype,
                  autocast=autocast, gradient_checkpointing=gradient_checkpointing, offload_states=offload_states,
                  acd=acd, acd_backend=acd_backend, device_type=device_type, num_layers=n_double,
                  num_single_layers=n_single, tokens=dict(text=n_txt, image=n_img, context=n_img, total=seq),
                  note="sizes in bytes")
    return MemoryEstimate(terms=terms, phase_peaks=phase_peaks, inputs=inputs)


def memory_suggestions(estimate_kwargs: dict, budget: int) -> list[dict]:
    """Changes that bring the estimated peak under `budget` bytes, applied cumulatively, cheapest first.

    Order: gradient checkpointing, offloading the states, fewer train transitions per backward
    (train_step_chunk 4, 2, 1), then a smaller group per device (G/2, G/4). A change is kept only if
    it lowers the estimate; the list stops at the first combination that fits.
    """
    kw = dict(estimate_kwargs)
    current = estimate_memory(**kw)
    if current.peak <= budget:
        return []
    steps: list[tuple[str, dict]] = []
    if not kw.get("gradient_checkpointing"):
        steps.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if not kw.get("offload_states") and kw.get("device_type") != "cpu":
        steps.append(("--offload-states", {"offload_states": True}))
    chunk = min(kw.get("train_step_chunk", 8), kw["train_steps"])
    steps += [(f"--train-step-chunk {c}", {"train_step_chunk": c}) for c in (4, 2, 1) if c < chunk]
    group = kw["group_size"]
    for g in (group // 2, group // 4):
        if kw["num_anchors"] < g < group:
            steps.append((f"--group {g} (per device)", {"group_size": g, "num_anchors": min(kw["num_anchors"], g - 1)}))
    out: list[dict] = []
    labels: list[str] = []
    for label, change in steps:
        trial = estimate_memory(**(kw | change))
        if trial.peak >= current.peak:
            continue
        kw |= change
        labels = [lab for lab in labels if lab.split()[0] != label.split()[0]] + [label]
        current = trial
        out.append({"change": " ".join(labels), "peak_bytes": int(trial.peak), "peak_phase": trial.peak_phase,
                    "fits": bool(trial.peak <= budget)})
        if trial.peak <= budget:
            break
    decode = estimate_memory(**estimate_kwargs).term("vae_decode").bytes
    if decode > 0.25 * budget:
        out.append({"change": "decode the finals one at a time (pipe.vae.enable_slicing(); not an RCGRPOConfig option)",
                    "peak_bytes": None, "peak_phase": None, "fits": None,
                    "saves_bytes": int(decode - decode / estimate_kwargs["group_size"])})
    return out


# ----------------------------------------------------------------------------------------------
# Measurement: timers and peak memory per phase
# ----------------------------------------------------------------------------------------------
class _HostMemory:
    """Resident set size of this process and its resettable high-water mark (Linux /proc)."""

    def __init__(self):
        self.resettable = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.resettable = self.peak() > 0
        except OSError:
            self.resettable = False

    @staticmethod
    def _status(key: str) -> int:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def current(self) -> int:
        value = self._status("VmRSS")
        if value:
            return value
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        value = self._status("VmHWM")
        return value if value else self.current()

    def reset(self) -> None:
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self.resettable = False


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _tune_host_allocator() -> bool:
    """Make glibc mmap allocations above 256 KiB, so freed tensors leave the RSS (honest CPU peaks)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 256 * 1024))


def _trim_host_heap() -> None:
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PhaseTracker:
    """Wall time and peak memory per phase; top-level phases are exclusive (a nested one pauses its parent).

    Sub-phases are inclusive and may repeat (times add up, peaks take the maximum). Every phase
    boundary synchronizes the device, updates the peaks of the active phases and resets the
    device's peak counter.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = None if self.cuda else _HostMemory()
        self.time: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._tops: list[list] = []  # [name, start]
        self._subs: dict[str, list] = {}  # name -> [start, depth]
        self.reserved_peak = 0
        self.total_peak = 0
        self.failed_in: list[str] | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _flush(self) -> None:
        if self.cuda:
            value = torch.cuda.max_memory_allocated(self.device)
            self.reserved_peak = max(self.reserved_peak, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            value = self.host.peak()
            self.host.reset()
        self.total_peak = max(self.total_peak, value)
        active = list(self._subs)
        if self._tops:
            active.append(self._tops[-1][0])
        for name in active:
            self.peak[name] = max(self.peak.get(name, 0), value)

    def enter(self, name: str, *, top: bool = False) -> None:
        self._sync()
        self._flush()
        now = time.perf_counter()
        self.calls[name] = self.calls.get(name, 0) + 1
        if top:
            if self._tops:
                outer = self._tops[-1]
                self.time[outer[0]] = self.time.get(outer[0], 0.0) + now - outer[1]
            self._tops.append([name, now])
        elif name in self._subs:
            self._subs[name][1] += 1
        else:
            self._subs[name] = [now, 1]

    def exit(self, name: str, *, top: bool = False) -> None:
        self._sync()
        self._flush()
        now = time.perf_counter()
        if top:
            if not self._tops or self._tops[-1][0] != name:
                raise RuntimeError(f"phase {name!r} is not the innermost open top-level phase")
            _, start = self._tops.pop()
            self.time[name] = self.time.get(name, 0.0) + now - start
            if self._tops:
                self._tops[-1][1] = now
            return
        entry = self._subs.get(name)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.time[name] = self.time.get(name, 0.0) + now - entry[0]
            del self._subs[name]

    @contextlib.contextmanager
    def phase(self, name: str, *, top: bool = False):
        self.enter(name, top=top)
        try:
            yield
        finally:
            self.exit(name, top=top)

    def active_phases(self) -> list[str]:
        """Open phases, outermost first (paused top-level phases included)."""
        order = {key: i for i, (key, _, _) in enumerate(PHASES)}
        return sorted([t[0] for t in self._tops] + list(self._subs), key=lambda k: order.get(k, len(order)))

    def close_all(self) -> None:
        """Close phases left open (a hook that never ran its exit, an exception)."""
        while self._tops:
            self.exit(self._tops[-1][0], top=True)
        for name in list(self._subs):
            self._subs[name][1] = 1
            self.exit(name)

    def current_memory(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return self.host.current()


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward calls `callback` (times a region of the backward pass)."""

    @staticmethod
    def forward(ctx, tensor, callback):
        ctx.callback = callback
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


def eager_acd_attention(q, k, v, text_len, image_len, *, scale=None, text_weights=None, backend="auto", mode="fused"):
    """`acd_attention`'s signature over the materialized baseline `acd_attention_eager` (the path the op replaces)."""
    from rcgrpo_kernels.acd_attention import acd_attention_eager

    del backend, mode
    return acd_attention_eager(q, k, v, text_len, image_len, scale=scale, text_weights=text_weights)


@contextlib.contextmanager
def _patched(obj, name: str, value):
    had = name in vars(obj)
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def instrument(trainer, tracker: PhaseTracker, *, attention: str = "acd"):
    """Wrap the trainer's phases (for the dry run only; everything is restored on exit)."""
    import rcgrpo.attention as attention_mod
    import rcgrpo.policy as policy_mod
    import rcgrpo.trainer as trainer_mod

    pipe = trainer.pipe
    vae = pipe.vae
    stack = contextlib.ExitStack()

    def timed(fn, name, *, top=False, sub=None):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            tracker.enter(name, top=top)
            try:
                if sub is not None:
                    with tracker.phase(sub):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            except BaseException:
                if tracker.failed_in is None:  # the innermost phases open when the failure happened
                    tracker.failed_in = tracker.active_phases()
                raise
            finally:
                tracker.exit(name, top=top)

        return wrapper

    acd_impl = eager_acd_attention if attention == "eager" else attention_mod.acd_attention
    distances_impl = policy_mod.region_sq_dists

    def timed_distances(x, y, mask, **kwargs):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        pending = [0]

        def backward_done():
            pending[0] -= 1
            if pending[0] == 0:
                tracker.exit("distances")

        with tracker.phase("distances"):
            if needs_grad:
                if x.requires_grad:
                    pending[0] += 1
                    x = _BackwardMark.apply(x, backward_done)
                if y.requires_grad:
                    pending[0] += 1
                    y = _BackwardMark.apply(y, backward_done)
            result = distances_impl(x, y, mask, **kwargs)
        if needs_grad:
            result = _BackwardMark.apply(result, lambda: tracker.enter("distances"))
        return result

    forward_open: list[str | None] = []

    def pre_forward(_module, _args, _kwargs):
        top = tracker._tops[-1][0] if tracker._tops else None
        name = {"rollout": "rollout_transformer", "update": "anchor_forward"}.get(top)
        forward_open.append(name)
        if name:
            tracker.enter(name)

    def post_forward(_module, _args, _kwargs, _output):
        name = forward_open.pop() if forward_open else None
        if name:
            tracker.exit(name)

    with stack:
        stack.enter_context(_patched(trainer_mod, "rollout", timed(trainer_mod.rollout, "rollout", top=True)))
        stack.enter_context(_patched(attention_mod, "acd_attention", timed(acd_impl, "acd")))
        stack.enter_context(_patched(policy_mod, "region_sq_dists", timed_distances))
        stack.enter_context(_patched(vae, "decode", timed(vae.decode, "decode", top=True)))
        stack.enter_context(_patched(vae, "encode", timed(vae.encode, "vae_encode")))
        original_rewards = trainer.reward_funcs
        trainer.reward_funcs = [(n, timed(f, "reward", top=True), w) for n, f, w in original_rewards]
        stack.callback(setattr, trainer, "reward_funcs", original_rewards)
        stack.enter_context(_patched(trainer, "compute_advantages",
                                     timed(trainer.compute_advantages, "advantages", top=True)))
        stack.enter_context(_patched(trainer, "group_loss_backward",
                                     timed(trainer.group_loss_backward, "update", top=True)))
        stack.enter_context(_patched(trainer, "_clip_and_norm",
                                     timed(trainer._clip_and_norm, "update", top=True, sub="optimizer")))
        def step_pre(*_args) -> None:
            tracker.enter("update", top=True)
            tracker.enter("optimizer")

        def step_post(*_args) -> None:
            tracker.exit("optimizer")
            tracker.exit("update", top=True)

        handles = [
            trainer.optimizer.register_step_pre_hook(step_pre),
            trainer.optimizer.register_step_post_hook(step_post),
            trainer.transformer.register_forward_pre_hook(pre_forward, with_kwargs=True),
            trainer.transformer.register_forward_hook(post_forward, with_kwargs=True),
        ]
        stack.callback(lambda: [h.remove() for h in handles])
        yield


# ----------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(arch: str, transformer_config: dict, *, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """FluxKontextPipeline with random weights of the architecture, created on `device` in `dtype`.

    Modules are constructed under `torch.device(device)` with `dtype` as the default dtype, so every
    parameter is allocated once, where it lives, with PyTorch's default (cheap) initialization; no
    fp32 host copy exists. The text encoders and tokenizers are None (prompt embeddings are given).
    """
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


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# The dry run
# ----------------------------------------------------------------------------------------------
def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "total_memory_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    total = available = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"type": "cpu", "name": name, "threads": torch.get_num_threads(), "total_memory_bytes": total,
            "available_memory_bytes": available}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("diffusers", "transformers", "peft", "accelerate", "triton", "rcgrpo"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _estimate_kwargs(s: DryRunSettings, transformer_config: dict, device: torch.device, acd_backend: str) -> dict:
    spec = ARCHS[s.arch]
    return dict(
        transformer_config=transformer_config, vae_config=spec["vae"], resolution=s.resolution, group_size=s.group,
        num_anchors=s.anchors, num_steps=s.steps, train_steps=s.train_steps, train_step_chunk=s.train_step_chunk,
        text_len=s.effective_text_len(), text_dim=spec["text_dim"], lora_rank=s.lora_rank, dtype=s.dtype,
        autocast=s.dtype == "bf16" and device.type == "cuda", gradient_checkpointing=s.gradient_checkpointing,
        offload_states=s.offload_states, acd=("eager" if s.attention == "eager" else "fused") if s.acd else None,
        acd_layers=10, acd_backend=acd_backend, device_type=device.type,
    )


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def dry_run(s: DryRunSettings, *, log=print) -> dict:
    """Build the model, run one iteration, return the report (see `format_report`)."""
    s.validate()
    device = s.torch_device()
    dtype = s.torch_dtype
    spec = ARCHS[s.arch]
    tcfg = scaled_transformer_config(s.arch, s.depth_scale)
    from rcgrpo_kernels import resolve_backend

    acd_backend = resolve_backend("auto", device, "acd_attention")
    distance_backend = resolve_backend("auto", device, "region_sq_dists")
    est_kwargs = _estimate_kwargs(s, tcfg, device, acd_backend)
    estimate = estimate_memory(**est_kwargs)
    full_cfg = scaled_transformer_config(s.arch, 1.0)
    full_estimate = estimate_memory(**(est_kwargs | {"transformer_config": full_cfg})) if s.depth_scale < 1 else estimate
    info = _device_info(device)
    budget = info["total_memory_bytes"] if device.type == "cuda" else (info.get("available_memory_bytes") or
                                                                        info["total_memory_bytes"])
    if budget and estimate.peak > budget:
        advice = memory_suggestions(est_kwargs, budget)
        sized = [a for a in advice if a.get("peak_bytes")]
        hint = ""
        if sized and sized[-1]["fits"]:
            hint = f"; try {sized[-1]['change']} (estimated {_gib(sized[-1]['peak_bytes'])})"
        elif sized:
            hint = (f"; even {sized[-1]['change']} leaves {_gib(sized[-1]['peak_bytes'])}: "
                    "lower --depth-scale or --resolution")
        message = (f"estimated peak {_gib(estimate.peak)} ({estimate.peak_phase}) exceeds the "
                   f"{'GPU' if device.type == 'cuda' else 'available host'} memory {_gib(budget)} for "
                   f"--resolution {s.resolution} --group {s.group} --depth-scale {s.depth_scale:g}{hint}")
        if not s.force:
            raise ValueError(message + " (or pass --force to run anyway)")
        warnings.warn(message)

    n_double, n_single = tcfg["num_layers"], tcfg["num_single_layers"]
    acd_layers = min(10, n_double + n_single)
    text_len = s.effective_text_len()
    from .config import RCGRPOConfig
    from .synthetic import SquareDataset, redness_reward
    from .trainer import RCGRPOTrainer

    tracker = PhaseTracker(device)
    allocator_tuned = False
    if device.type == "cpu":
        allocator_tuned = _tune_host_allocator()
        import gc

        gc.collect()
        _trim_host_heap()
    baseline = tracker.current_memory()

    t0 = time.perf_counter()
    pipe = build_pipeline(s.arch, tcfg, device=device, dtype=dtype, seed=s.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    built = {"transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
             "transformer_param_bytes": _param_bytes(pipe.transformer),
             "vae_params": sum(p.numel() for p in pipe.vae.parameters()),
             "vae_param_bytes": _param_bytes(pipe.vae)}
    log(f"built {s.arch} ({n_double} double + {n_single} single blocks, "
        f"{built['transformer_params'] / 1e9:.2f} B params) on {device} in {build_s:.1f} s")

    tmp = tempfile.TemporaryDirectory(prefix="rcgrpo-dryrun-")
    config = RCGRPOConfig(
        model="random", resolution=s.resolution, max_sequence_length=text_len, group_size=s.group,
        groups_per_step=1, num_inference_steps=s.steps, num_anchors=s.anchors, train_timesteps=str(s.train_steps),
        train_step_chunk=s.train_step_chunk, reward_funcs=["redness"], w_acd=0.5 if s.acd else 0.0,
        acd_layers=acd_layers, lora_rank=s.lora_rank, lora_alpha=float(s.lora_rank),
        mixed_precision="bf16" if (s.dtype == "bf16" and device.type == "cuda") else "no",
        gradient_checkpointing=s.gradient_checkpointing, offload_states=s.offload_states, max_steps=1, seed=s.seed,
        output_dir=tmp.name, checkpoint_every=0, tensorboard=False, train_size=1, eval_size=0,
        device="cuda" if device.type == "cuda" else "cpu",
    )
    t1 = time.perf_counter()
    dataset = SquareDataset(1, size=s.resolution, seed=s.seed)
    trainer = RCGRPOTrainer(pipe, config, [("redness", redness_reward)], dataset)
    gen = torch.Generator().manual_seed(s.seed + 1)
    for example in dataset.examples:
        embeds = torch.randn(1, text_len, spec["text_dim"], generator=gen).to(device=device, dtype=dtype)
        pooled = torch.randn(1, spec["pooled_dim"], generator=gen).to(device=device, dtype=dtype)
        trainer._text_cache[example.instruction] = (embeds, pooled)
    setup_s = time.perf_counter() - t1
    built["lora_params"] = sum(p.numel() for p in trainer.lora_parameters)

    log(f"running one iteration: {s.group} candidates x {s.steps} steps at {s.resolution}x{s.resolution} px, "
        f"update on {s.anchors} anchors x {s.train_steps} train steps")
    metrics, error, caught = None, None, []
    tracker.enter("iteration")
    start = time.perf_counter()
    try:
        with instrument(trainer, tracker, attention=s.attention), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = trainer.train_step()
    except Exception as exc:  # noqa: BLE001 - an OOM is a result of the dry run; others re-raise below
        if not _is_oom(exc):
            tracker.close_all()
            tmp.cleanup()
            raise
        phases = tracker.failed_in or tracker.active_phases()
        error = {"type": type(exc).__name__, "phase": phases, "message": (str(exc).strip().splitlines() or [""])[0]}
    iteration_s = time.perf_counter() - start
    if error is not None and device.type == "cuda":
        torch.cuda.empty_cache()  # the exception (and the tensors its frames held) is gone now
    tracker.close_all()
    tmp.cleanup()

    report = _assemble_report(
        s, device, info, tcfg, tracker, estimate, full_estimate, est_kwargs, budget, baseline, built, build_s, setup_s,
        iteration_s, metrics, error, [str(w.message) for w in caught][:10], acd_backend, distance_backend,
        allocator_tuned, acd_layers,
    )
    return report


def _gib(value) -> str:
    if value is None:
        return "-"
    if abs(value) < 1024**2:
        return f"{value / 1024:.1f} KiB"
    if abs(value) < 0.1 * GIB:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / GIB:.2f} GiB"


def _assemble_report(s, device, info, tcfg, tracker, estimate, full_estimate, est_kwargs, budget, baseline, built,
                     build_s, setup_s, iteration_s, metrics, error, warns, acd_backend, distance_backend,
                     allocator_tuned, acd_layers) -> dict:
    times = dict(tracker.time)
    times["iteration"] = times.get("iteration", iteration_s)
    total = times["iteration"]
    times["other"] = max(0.0, total - sum(times.get(p, 0.0) for p in TOP_PHASES))
    update_parts = sum(times.get(p, 0.0) for p in ("anchor_forward", "distances", "optimizer"))
    times["backward"] = max(0.0, times.get("update", 0.0) - update_parts)
    offset = 0 if device.type == "cuda" else baseline
    phases = []
    for key, label, parent in PHASES:
        t = times.get(key, 0.0)
        peak = tracker.peak.get(key) if key not in DERIVED_PHASES else None
        phases.append({
            "key": key, "label": label, "parent": parent, "time_s": t, "calls": tracker.calls.get(key, 0),
            "share": (t / total) if total > 0 else 0.0,
            "peak_bytes": None if peak is None else int(peak - offset),
            "peak_bytes_absolute": peak,
            "estimate_bytes": estimate.phase_peaks.get(key),
        })
    measured_peak = int(tracker.peak.get("iteration", tracker.total_peak) - offset)
    fits = measured_peak <= info["total_memory_bytes"] - (0 if device.type == "cuda" else baseline) and error is None
    suggestions = memory_suggestions(est_kwargs, budget) if budget else []
    if error is not None and not suggestions and budget:  # the estimate fit but the run did not: aim lower
        suggestions = memory_suggestions(est_kwargs, int(min(budget, estimate.peak) * 0.8))
    full_note = None
    if full_estimate is not estimate:
        full_note = {
            "estimate": full_estimate.to_dict(),
            "fits": {name: full_estimate.peak <= size for name, size in REFERENCE_GPUS.items()},
        }
    share = lambda key: (times.get(key, 0.0) / total) if total > 0 else 0.0  # noqa: E731
    return {
        "command": "rcgrpo dryrun",
        "settings": dataclasses.asdict(s),
        "config": {
            "arch": s.arch, "description": ARCHS[s.arch]["description"], "transformer": tcfg,
            "depth": {"double": tcfg["num_layers"], "single": tcfg["num_single_layers"],
                      "double_full": ARCHS[s.arch]["transformer"]["num_layers"],
                      "single_full": ARCHS[s.arch]["transformer"]["num_single_layers"]},
            "tokens": estimate.inputs["tokens"], "dtype": s.dtype, "acd_layers": acd_layers if s.acd else 0,
            "acd_backend": (("eager" if s.attention == "eager" else acd_backend) if s.acd else None),
            "distance_backend": distance_backend,
        },
        "device": info,
        "versions": _versions(),
        "built": built,
        "setup_s": {"build_model": build_s, "trainer": setup_s},
        "iteration_s": total,
        "phases": phases,
        "acd_share": share("acd"),
        "distance_share": share("distances"),
        "memory": {
            "measured_peak_bytes": measured_peak,
            "measured_peak_phase": max((p for p in ("rollout", "decode", "update")),
                                       key=lambda k: tracker.peak.get(k, 0)),
            "baseline_bytes": int(offset),
            "measure": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                        "peak RSS above the process RSS before the model was built"
                        + ("" if allocator_tuned else " (allocator not tuned: freed memory may stay resident)")),
            "reserved_peak_bytes": int(tracker.reserved_peak) if device.type == "cuda" else None,
            "device_total_bytes": int(info["total_memory_bytes"]),
            "fits": bool(fits),
            "estimate": estimate.to_dict(),
            "estimate_over_measured": (estimate.peak / measured_peak) if measured_peak > 0 else None,
            "suggestions": suggestions,
            "full_depth": full_note,
        },
        "metrics": None if metrics is None else {k: metrics.get(k) for k in (
            "loss", "reward_mean", "acd_mean", "grad_norm", "clip_fraction", "skipped_update")},
        "error": error,
        "warnings": warns,
    }


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def format_report(r: dict) -> str:
    cfg, st, mem = r["config"], r["settings"], r["memory"]
    dev = r["device"]
    depth = cfg["depth"]
    tok = cfg["tokens"]
    lines = [
        f"rcgrpo dryrun: {cfg['arch']} with random weights on {dev['type']} ({dev['name']})",
        f"  blocks {depth['double']}/{depth['double_full']} double + {depth['single']}/{depth['single_full']} single "
        f"(depth-scale {st['depth_scale']:g}), {r['built']['transformer_params'] / 1e9:.3f} B params, {cfg['dtype']}; "
        f"LoRA r={st['lora_rank']} ({r['built']['lora_params'] / 1e6:.1f} M params)",
        f"  {st['resolution']}x{st['resolution']} px, G={st['group']}, B={st['anchors']}, T={st['steps']}, "
        f"train steps {st['train_steps']} (chunk {st['train_step_chunk']}), grad ckpt {'on' if st['gradient_checkpointing'] else 'off'}, "
        f"offload states {'on' if st['offload_states'] else 'off'}, ACD "
        + (f"{cfg['acd_backend']} over {cfg['acd_layers']} layers" if cfg['acd_backend'] else "off")
        + f", distances {cfg['distance_backend']}",
        f"  tokens: text {tok['text']} + target {tok['image']} + context {tok['context']} = {tok['total']}; "
        f"setup: model {r['setup_s']['build_model']:.1f} s, trainer {r['setup_s']['trainer']:.1f} s",
        "",
        f"{'phase':<26}{'time (s)':>10}{'calls':>7}{'share':>8}{'peak mem':>12}{'estimate':>12}",
    ]
    depth_of = {}
    for p in r["phases"]:
        level = 0 if p["parent"] is None else depth_of[p["parent"]] + 1
        depth_of[p["key"]] = level
        name = "  " * level + p["label"]
        peak = "-" if p["peak_bytes"] is None else _gib(p["peak_bytes"])
        est = _gib(p["estimate_bytes"]) if p["estimate_bytes"] is not None else ""
        lines.append(f"{name:<26}{p['time_s']:>10.3f}{p['calls']:>7}{100 * p['share']:>7.1f}%{peak:>12}{est:>12}")
    lines += [
        "",
        f"ACD share of the iteration: {100 * r['acd_share']:.2f}%   distance share: {100 * r['distance_share']:.2f}%",
        "",
        f"memory model (bytes live at the peak phase '{mem['estimate']['peak_phase']}' marked *)",
    ]
    full = mem.get("full_depth")
    header = f"{'  term':<38}{'this run':>12}" + (f"{'full depth':>12}" if full else "") + "   formula"
    lines.append(header)
    full_terms = {t["key"]: t for t in full["estimate"]["terms"]} if full else {}
    peak_phase = mem["estimate"]["peak_phase"]
    for t in mem["estimate"]["terms"]:
        mark = "*" if peak_phase in t["phases"] else " "
        row = f"{mark} {t['label']:<36}{_gib(t['bytes']):>12}"
        if full:
            row += f"{_gib(full_terms[t['key']]['bytes']):>12}"
        lines.append(row + "   " + t["formula"])
    est_peak = mem["estimate"]["peak_bytes"]
    row = f"  {'estimated peak':<36}{_gib(est_peak):>12}"
    if full:
        row += f"{_gib(full['estimate']['peak_bytes']):>12}"
    lines.append(row + f"   max over phases: " + ", ".join(
        f"{k} {_gib(v)}" for k, v in mem["estimate"]["phase_peaks_bytes"].items()))
    ratio = mem["estimate_over_measured"]
    lines += [
        f"  measured peak: {_gib(mem['measured_peak_bytes'])} in {mem['measured_peak_phase']} ({mem['measure']}); "
        f"estimate/measured = {ratio:.2f}" if ratio else f"  measured peak: {_gib(mem['measured_peak_bytes'])}",
    ]
    if mem["reserved_peak_bytes"] is not None:
        lines.append(f"  CUDA reserved peak: {_gib(mem['reserved_peak_bytes'])}")
    total = mem["device_total_bytes"]
    lines.append(f"  fits the device: {'yes' if mem['fits'] else 'NO'} (measured {_gib(mem['measured_peak_bytes'])} "
                 f"of {_gib(total)} {'GPU memory' if dev['type'] == 'cuda' else 'RAM'})")
    if full:
        fits = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in full["fits"].items())
        lines.append(f"  full-depth model at these settings: estimated {_gib(full['estimate']['peak_bytes'])} "
                     f"({full['estimate']['peak_phase']}); fits {fits}")
    if mem["suggestions"]:
        lines.append("  suggestions (estimated peak after the change):")
        for sug in mem["suggestions"]:
            if sug.get("peak_bytes") is not None:
                lines.append(f"    {sug['change']}: {_gib(sug['peak_bytes'])} ({sug['peak_phase']})"
                             + (" - fits" if sug["fits"] else ""))
            else:
                lines.append(f"    {sug['change']}: saves about {_gib(sug.get('saves_bytes'))}")
    if r["metrics"]:
        m = r["metrics"]
        lines.append("")
        lines.append("iteration metrics: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if v is not None))
    if r["warnings"]:
        lines.append("warnings during the iteration: " + " | ".join(r["warnings"][:3]))
    if r["error"]:
        lines.append(f"FAILED: {r['error']['type']} in phase {'/'.join(r['error']['phase'])}: {r['error']['message']}")
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_finite(report), indent=2, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_dryrun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("One RC-GRPO iteration (rollout, ACD, decode, reward, update) of a full-size model "
                          "with random weights: per-phase time and peak memory, and a memory model.")
    parser.add_argument("--arch", default="flux-kontext-dev", choices=sorted(ARCHS), help="model architecture")
    parser.add_argument("--resolution", type=int, default=1024, help="edit height and width in pixels (multiple of 16)")
    parser.add_argument("--group", type=int, default=12, help="G: candidates per group")
    parser.add_argument("--anchors", type=int, default=4, help="B: anchors (< G)")
    parser.add_argument("--steps", type=int, default=28, help="T: Euler ODE steps of the rollout")
    parser.add_argument("--train-steps", type=int, default=8, help="transitions trained (first n, high noise first)")
    parser.add_argument("--train-step-chunk", type=int, default=8, help="train transitions per backward pass")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--offload-states", action="store_true", help="keep rollout states on the CPU during the update")
    parser.add_argument("--depth-scale", type=float, default=1.0,
                        help="fraction of the double and single blocks kept (at least 1 each; width unchanged)")
    parser.add_argument("--no-acd", dest="acd", action="store_false", help="disable the ACD reward (w_acd = 0)")
    parser.add_argument("--attention", choices=["acd", "eager"], default="acd",
                        help="ACD mass from the fused op (acd) or from materialized attention weights (eager)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="model dtype")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--text-len", type=int, default=None, help="T5 tokens of the random prompt embeddings (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="run even when the memory model's estimate exceeds the device memory")
    parser.add_argument("--json", dest="json_path", default=None, metavar="OUT.json", help="also write the report as JSON")


def settings_from_args(args) -> DryRunSettings:
    names = {f.name for f in dataclasses.fields(DryRunSettings)}
    values = {k: v for k, v in vars(args).items() if k in names}
    s = DryRunSettings(**values)
    s.validate()
    return s


def run_dryrun(args) -> int:
    settings = settings_from_args(args)
    report = dry_run(settings, log=lambda msg: print(msg, flush=True))
    print(format_report(report), flush=True)
    if settings.json_path:
        path = write_json(report, settings.json_path)
        print(f"wrote {path}")
    if report["error"]:
        raise RuntimeError(f"dry run ran out of memory in phase {'/'.join(report['error']['phase'])}: "
                           f"{report['error']['message']} (see the memory model and suggestions above)")
    return 0


__all__ = [
    "ARCHS",
    "DryRunSettings",
    "MemoryEstimate",
    "PhaseTracker",
    "add_dryrun_arguments",
    "build_pipeline",
    "dry_run",
    "eager_acd_attention",
    "estimate_memory",
    "flux_transformer_params",
    "format_report",
    "lora_params",
    "memory_suggestions",
    "run_dryrun",
    "scaled_transformer_config",
    "vae_params",
]
