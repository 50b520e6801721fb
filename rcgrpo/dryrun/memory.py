"""The analytic memory model of one RC-GRPO iteration, and the settings that make a config fit.

`estimate_memory` models both editor families; the family comes from the transformer config
(`archs.family_of`). FLUX.1-Kontext's terms and coefficients are unchanged from the first version of
this model; Qwen-Image-Edit has its own terms (true CFG, the source image's tokens, the vision-language
text stream, the text encoder's placement, its 3D VAE) and coefficients, measured where a CPU could
measure them (`benchmarks/qwen_block_memory.py`) and carried over from FLUX where not (see
`estimate_memory`'s docstring).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .archs import ARCHS, area_size, family_of, flux_transformer_params, lora_params, qwen_text_tokens, \
    qwen_transformer_params, vae_params

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

# Qwen-Image (all blocks double-stream), in units of S·d·e per sample. Measured on a CPU with
# `benchmarks/qwen_block_memory.py` (diffusers 0.42 QwenImageTransformer2DModel, H = 8, head_dim 128, LoRA
# rank 8 on the eight attention projections, frozen base, SDPA, S = 32 text + 2×256 image tokens): the
# growth of the peak RSS per added block (L = 1 → 3, batch 2) and per added sample (batch 2 → 4, the
# constant); fp32, bf16 without autocast, and bf16 under CPU autocast, which stands in for CUDA's bf16
# autocast (no GPU measurement). With checkpointing each block leaves ~2.6 units in bf16 (1.15 in fp32:
# about 5 bytes per element either way), not the single bf16 block input one might expect.
QWEN_ACT_COEF = {  # mode: (per block, per-sample constant) of forward + backward with grad
    "bf16-autocast": (20.7, 7.9),
    "bf16": (24.7, 8.6),
    "fp32": (13.7, 8.9),
}
QWEN_CKPT_COEF = {  # mode: (kept per block, the block recomputed in backward) with gradient checkpointing
    "bf16-autocast": (2.6, 26.6),
    "bf16": (2.6, 30.9),
    "fp32": (1.15, 22.4),
}
QWEN_ROLLOUT_FWD_COEF = {"bf16": 19.1, "fp32": 14.5}  # no-grad forward (the rollout runs without autocast)
# The Qwen-Image VAE (3D-causal, base_dim 96), units of B·H·W·96·e, measured on a CPU the same way
# (`benchmarks/qwen_block_memory.py --vae`): the encoder's peak for one source image, the decoder's for B latents.
QWEN_VAE_ENCODE_COEF = 13.0
QWEN_VAE_DECODE_COEF = 21.0  # the causal 3D convolutions keep a copy of each layer's input (feat_cache)
# Not measured (small next to the rest, a rough bound): the text encoder's forward at N tokens keeps every
# hidden state (the pipelines read hidden_states[-1]), one layer's MLP intermediates and the fp32 logits.
TEXT_ENCODER_PLACEMENTS = (None, "device", "offloaded")
GIB = 1024**3
REFERENCE_GPUS = {"H100 (78 GiB usable)": 78 * GIB, "H200 (139 GiB usable)": 139 * GIB}


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
    groups: int = 1,
    token_px: int = 16,
    family: str | None = None,
    arch: str | None = None,
    source_resolution: int | None = None,
    cfg_batch: bool = True,
    true_cfg: bool = True,
    text_encoder: str | None = None,
    text_encoder_params: int | None = None,
    vae_slicing: bool = False,
) -> MemoryEstimate:
    """Analytic peak memory of one RC-GRPO iteration (bytes), as the sum of the terms live in each phase.

    The family (`flux-kontext` or `qwen-image-edit`) is `family`, or read from `transformer_config`
    (`archs.family_of`). This docstring gives the FLUX.1-Kontext model; `_qwen_estimate` gives
    Qwen-Image-Edit's, whose own arguments are: `arch` (the ARCHS entry for the text stream's length:
    "qwen-image-edit" or "qwen-image-edit-plus"), `source_resolution` (side of the source image's area,
    None: the pipelines' 1024²), `cfg_batch` and `true_cfg` (true CFG's passes batched in one call; CFG on),
    `text_encoder` (None: not counted, the dry run builds none; "device": its weights on the GPU all along,
    as a pipeline moved to the device has them; "offloaded": on the GPU only while an instruction is
    encoded) and `text_encoder_params` (default: Qwen2.5-VL-7B's). For FLUX.1-Kontext these must keep
    their defaults (its T5/CLIP weights are not modelled). `vae_slicing` (both families): the finals are
    decoded one at a time (`RCGRPOConfig.vae_slicing`), the decode term counts one instead of G.

    Symbols: e = bytes per element of the model dtype; d = hidden size; L_d, L_s = double and single
    blocks; N_img = N_ctx = (resolution/token_px)² image tokens (token_px = 2 × the VAE scale factor ×
    the patch size: 16 for FLUX.1), N_txt = text_len, S = N_txt + N_img + N_ctx;
    C = latent channels after packing (64); G, B, T, n = group, anchors, ODE steps, train steps;
    c = min(train_step_chunk, n); b = B·c samples per backward; n_g = groups per device and optimizer
    step (groups_per_step × gradient_accumulation_steps): the trainer rolls them all out, then updates
    one group at a time, so only the states and conditioning scale with n_g.

    Terms:
        weights: transformer   P_T·e (P_T from `flux_transformer_params`)
        weights: VAE            P_VAE·e
        LoRA + AdamW            4 B/param × P_L × 4 (fp32 param, grad, exp_avg, exp_avg_sq; steady state)
        rollout states          n_g·G·(T+1)·N_img·C·e; offloaded: one group's, in the rollout only (on a
                                CPU device they are in RAM anyway)
        conditioning + ACD      (N_txt·text_dim + N_ctx·C)·e + ACD mass calls·G·N_img·4
        rollout activations     G·S·d·(k·e + x) for one no-grad block forward (k = 18.5 in bf16, 15.25
                                in fp32; the rollout runs without autocast), x = the ACD op's scratch
                                (C++: fp32 copies of q, k, v, out = 16 + e bytes; Triton: 0); eager ACD
                                adds H·S²·(2e + 4) (logits, fp32 softmax, cast; one sample at a time)
        VAE encode              6·G·H·W·w·e, w = the VAE's first block width (128 for FLUX.1; the
                                pipeline encodes the context image once per candidate)
        VAE decode              4·G·H·W·2w·e (all G finals decoded in one batch; with vae_slicing 1 instead of G)
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
    if resolution % token_px or resolution < token_px:
        raise ValueError(f"resolution must be a multiple of {token_px}, got {resolution}")
    if groups < 1:
        raise ValueError(f"groups must be ≥ 1, got {groups}")
    if text_encoder not in TEXT_ENCODER_PLACEMENTS:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODER_PLACEMENTS}, got {text_encoder!r}")
    family = family or family_of(transformer_config)
    if autocast is None:
        autocast = dtype == "bf16" and device_type == "cuda"
    if family == "qwen-image-edit":
        return _qwen_estimate(
            transformer_config, vae_config, resolution=resolution, group_size=group_size, num_anchors=num_anchors,
            num_steps=num_steps, train_steps=train_steps, train_step_chunk=train_step_chunk, text_len=text_len,
            text_dim=text_dim, lora_rank=lora_rank, dtype=dtype, autocast=autocast,
            gradient_checkpointing=gradient_checkpointing, offload_states=offload_states, acd=acd,
            acd_layers=acd_layers, acd_backend=acd_backend, device_type=device_type, groups=groups, arch=arch,
            source_resolution=source_resolution, cfg_batch=cfg_batch, true_cfg=true_cfg, text_encoder=text_encoder,
            text_encoder_params=text_encoder_params, vae_slicing=vae_slicing)
    if family != "flux-kontext":
        raise ValueError(f"family must be 'flux-kontext' or 'qwen-image-edit', got {family!r}")
    if source_resolution is not None or text_encoder is not None or text_encoder_params is not None:
        raise ValueError("source_resolution, text_encoder and text_encoder_params are Qwen-Image-Edit options; "
                         "FLUX.1-Kontext's context image is the edit size and its text encoders are not modelled")
    e = 2 if dtype == "bf16" else 4
    mode = "fp32" if dtype == "fp32" else ("bf16-autocast" if autocast else "bf16")
    cfg = transformer_config
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    heads = cfg["num_attention_heads"]
    n_double, n_single = cfg["num_layers"], cfg["num_single_layers"]
    channels = cfg["in_channels"]
    n_img = (resolution // token_px) ** 2
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
    on_device_in_update = not offload_states or device_type == "cpu"
    live = groups if on_device_in_update else 1
    states = live * G * (T + 1) * n_img * channels * e
    add("states", "rollout states" + ("" if on_device_in_update else " (one group; offloaded)"), states,
        f"{live} group(s) x G {G} x (T+1) {T + 1} x N_img {n_img} x C {channels} x {e} B",
        all_phases if on_device_in_update else ("rollout", "decode"))
    calls = (min(acd_layers, n_double + n_single) * T) if acd else 0
    cond = groups * (n_txt * text_dim + n_img * channels) * e + calls * G * n_img * 4
    add("conditioning", "conditioning + ACD record", cond,
        f"n_g {groups} x (N_txt {n_txt} x {text_dim} + N_ctx {n_img} x C) x {e} B + {calls} calls x G x N_img x 4 B")

    # The C++ op converts 16-bit q, k, v to fp32 (and casts out back); fp32 inputs are used in place.
    scratch = (16 + e) if (acd and acd == "fused" and acd_backend == "cpp" and e == 2) else 0
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
    width0 = int((vae_config or {}).get("block_out_channels", [128])[0])
    vae_enc = VAE_ENCODE_COEF * G * height * width * width0 * e
    add("vae_encode", "VAE encode (G context images)", vae_enc,
        f"{VAE_ENCODE_COEF} x G {G} x {height}x{width} x {width0} x {e} B", ("rollout",))
    decoded = 1 if vae_slicing else G
    vae_dec = VAE_DECODE_COEF * decoded * height * width * 2 * width0 * e
    add("vae_decode", "VAE decode (G finals)" if not vae_slicing else "VAE decode (one final at a time)", vae_dec,
        f"{VAE_DECODE_COEF} x {'1' if vae_slicing else f'G {G}'} x {height}x{width} x {2 * width0} x {e} B", ("decode",))

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

    phase_peaks = _phase_peaks(terms)
    inputs = dict(resolution=resolution, groups=groups, group_size=G, num_anchors=B, num_steps=T, train_steps=n,
                  train_step_chunk=train_step_chunk, text_len=text_len, lora_rank=lora_rank, dtype=dtype,
                  autocast=autocast, gradient_checkpointing=gradient_checkpointing, offload_states=offload_states,
                  acd=acd, acd_backend=acd_backend, device_type=device_type, num_layers=n_double,
                  num_single_layers=n_single, tokens=dict(text=n_txt, image=n_img, context=n_img, total=seq),
                  token_px=token_px, family=family, vae_slicing=vae_slicing, note="sizes in bytes")
    return MemoryEstimate(terms=terms, phase_peaks=phase_peaks, inputs=inputs)


def _phase_peaks(terms: list[MemoryTerm]) -> dict[str, int]:
    """Each phase's sum of its live terms; in the rollout the VAE encode (before the transformer runs) and
    the transformer's activations (+ eager ACD weights) are not live together: the larger one counts."""
    def phase_sum(phase: str, exclude=()) -> int:
        return sum(t.bytes for t in terms if phase in t.phases and t.key not in exclude)

    def bytes_of(*keys) -> int:
        return sum(t.bytes for t in terms if t.key in keys)

    rollout_peak = phase_sum("rollout", exclude=("rollout_activations", "acd_eager", "vae_encode"))
    rollout_peak += max(bytes_of("rollout_activations", "acd_eager"), bytes_of("vae_encode"))
    peaks = {"rollout": rollout_peak, "decode": phase_sum("decode"), "update": phase_sum("update")}
    if any("encode" in t.phases for t in terms):
        peaks["encode"] = phase_sum("encode")
    return peaks


def _qwen_estimate(
    transformer_config: dict, vae_config: dict | None, *, resolution: int, group_size: int, num_anchors: int,
    num_steps: int, train_steps: int, train_step_chunk: int, text_len: int, text_dim: int, lora_rank: int,
    dtype: str, autocast: bool, gradient_checkpointing: bool, offload_states: bool, acd: str | None,
    acd_layers: int, acd_backend: str, device_type: str, groups: int, arch: str | None,
    source_resolution: int | None, cfg_batch: bool, true_cfg: bool, text_encoder: str | None,
    text_encoder_params: int | None, vae_slicing: bool,
) -> MemoryEstimate:
    """Qwen-Image-Edit's memory model: `estimate_memory` for a `QwenImageTransformer2DModel` config.

    Symbols: e = bytes per element of the model dtype; d = hidden size (24·128); L = blocks (60, all
    double-stream); C = 64 packed latent channels; N_img = (resolution/16)² target tokens; N_src =
    (s/16)² source tokens, s² the source area (the pipelines resize the source to about 1024² px whatever
    the edit size: N_src = 4096; `source_resolution` s sets it); N_txt = V + t + n_instr text tokens
    (V = vision tokens of the image the VL encoder sees: the source at the source area for
    QwenImageEditPipeline (1369 at 1024²), a 384² condition image for the Plus pipeline (196); t = the
    template's own tokens (7; Plus 11); n_instr = `text_len`, the instruction's tokens), N_neg = V + t + 1
    (the negative prompt " "); S = N_txt + N_img + N_src, S_neg = N_neg + N_img + N_src. True CFG runs a
    conditional and an unconditional pass per velocity: P = 2 passes (1 without `true_cfg`); batched
    (`cfg_batch`), both are padded to S and run as one call of 2× the batch, otherwise they run one after
    the other. G, B, T, n, c, b = B·c, n_g as for FLUX.

    Terms:
        weights: transformer   P_T·e (P_T from `qwen_transformer_params`: 20,430,401,088)
        weights: VAE            P_VAE·e (AutoencoderKLQwenImage: 126,892,531)
        weights: text encoder   P_TE·e (Qwen2.5-VL-7B: 8,292,166,656) in every phase with text_encoder =
                                "device"; with "offloaded" only in the encode phase; None: not counted
        LoRA + AdamW            16 B × P_L (8 projections per block)
        rollout states          n_g·G·(T+1)·N_img·C·e (offloaded: one group's, rollout and decode only)
        conditioning + ACD      n_g·((N_txt + N_neg)·3584 + N_src·C)·e (text embeddings, source latents)
                                + ACD mass calls·G·N_img·4
        rollout activations     k_f·e·d·(2G·S batched | G·max(S, S_neg) separate) for one no-grad forward
                                (k_f per S·d·e), + the C++ ACD op's fp32 scratch G·S_a·d·(16 + e) (S_a = S
                                unbatched, N_txt + N_img batched: the masked pass scores [text | target]);
                                eager ACD adds H·S_a²·(2e + 4), one sample at a time
        VAE encode              k_enc·s²·96·e: the source image, once per rollout (batch 1)
        VAE decode              k_dec·G·H·W·96·e: all G finals in one batch (vae_slicing: one at a time, 1
                                instead of G)
        update activations      b·(S + S_neg)·d·e·(a·L + k0) without checkpointing ((2S) when batched: the
                                graphs of both passes live until backward); with checkpointing
                                b·(S + S_neg)·d·e·κ·L (κ: what each block and pass leaves, 2.6 in bf16) +
                                r·d·e·(2b·S batched | b·S separate) for the block recomputed in backward
        surrogate tensors       c·(G + 3B)·N_img·C·4 + b·N_img·C·e (as FLUX)
        text encoder forward    (encode phase) N·e·((L_te + 1)·d_te + 3·I_te) + N·vocab·4 for N = max(N_txt,
                                N_neg) (all hidden states kept, one MLP's intermediates, fp32 logits); rough

    Coefficients (per S·d·e): a, k0 (forward + backward with grad), κ, r (checkpointing), k_f (no-grad
    forward) are QWEN_ACT_COEF, QWEN_CKPT_COEF, QWEN_ROLLOUT_FWD_COEF, measured on a CPU in fp32 and
    bf16 (benchmarks/qwen_block_memory.py); the bf16-autocast (CUDA) values come from CPU autocast, not from
    a GPU; the C++ ACD scratch, the eager ACD weights and the surrogate tensors are FLUX's formulas carried
    over (the same ops on the same layouts). k_enc, k_dec (QWEN_VAE_*_COEF) were measured on a CPU.

    Phase peaks: encode (only with a text encoder) = persistent + the text encoder's weights and forward
    + the states of the n_g − 1 groups rolled out before (unless offloaded) + conditioning; rollout =
    persistent + states + conditioning + max(rollout activations, VAE encode); decode = persistent + states +
    conditioning + VAE decode; update = persistent + (states unless offloaded) + conditioning + update
    activations + surrogate tensors.
    """
    arch = arch or "qwen-image-edit"
    if arch not in ARCHS or ARCHS[arch]["family"] != "qwen-image-edit":
        raise ValueError(f"arch must be a Qwen-Image-Edit architecture "
                         f"({', '.join(a for a in ARCHS if ARCHS[a]['family'] == 'qwen-image-edit')}), got {arch!r}")
    spec = ARCHS[arch]
    e = 2 if dtype == "bf16" else 4
    mode = "fp32" if dtype == "fp32" else ("bf16-autocast" if autocast else "bf16")
    cfg = transformer_config
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    heads = cfg["num_attention_heads"]
    n_blocks = cfg["num_layers"]
    channels = cfg["in_channels"]
    text_dim = cfg["joint_attention_dim"]
    n_img = (resolution // 16) ** 2
    source_area = spec["source_area"] if source_resolution is None else source_resolution ** 2
    src_h, src_w = area_size(source_area)
    n_src = (src_h // 16) * (src_w // 16)
    n_txt, n_neg = qwen_text_tokens(arch, text_len, source_area=source_area)
    if not true_cfg:
        n_neg = 0
    seq, seq_neg = n_txt + n_img + n_src, n_neg + n_img + n_src
    passes = 2 if true_cfg else 1
    G, B, T, n = group_size, num_anchors, num_steps, train_steps
    c = min(train_step_chunk, n)
    b = B * c
    terms: list[MemoryTerm] = []
    all_phases = ("rollout", "decode", "update")
    with_encode = text_encoder is not None
    everywhere = all_phases + (("encode",) if with_encode else ())

    def add(key, label, value, formula, phases=everywhere):
        terms.append(MemoryTerm(key, label, int(value), formula, tuple(phases)))

    p_t = qwen_transformer_params(cfg)
    add("weights_transformer", "weights: transformer", p_t * e, f"{p_t:,} params x {e} B")
    if vae_config is not None:
        p_v = vae_params(dict(vae_config, _class_name="AutoencoderKLQwenImage"))
        add("weights_vae", "weights: VAE", p_v * e, f"{p_v:,} params x {e} B")
    if with_encode:
        p_te = spec["text_encoder_params"] if text_encoder_params is None else int(text_encoder_params)
        on_gpu = text_encoder == "device"
        add("weights_text_encoder", "weights: text encoder" + ("" if on_gpu else " (offloaded)"), p_te * e,
            f"{p_te:,} params x {e} B" + ("" if on_gpu else ", on the GPU only to encode an instruction"),
            everywhere if on_gpu else ("encode",))
    p_l = lora_params(cfg, lora_rank)
    add("lora_adamw", "LoRA + AdamW (fp32)", p_l * 4 * 4, f"{p_l:,} LoRA params x 4 B x 4 (param, grad, m, v)")
    on_device_in_update = not offload_states or device_type == "cpu"
    live = groups if on_device_in_update else 1
    states = live * G * (T + 1) * n_img * channels * e
    state_formula = f"x G {G} x (T+1) {T + 1} x N_img {n_img} x C {channels} x {e} B"
    add("states", "rollout states" + ("" if on_device_in_update else " (one group; offloaded)"), states,
        f"{live} group(s) " + state_formula, all_phases if on_device_in_update else ("rollout", "decode"))
    if with_encode and on_device_in_update and groups > 1:  # the groups rolled out before this encode
        add("states_before_encode", "states of earlier groups", (groups - 1) * G * (T + 1) * n_img * channels * e,
            f"{groups - 1} group(s) " + state_formula, ("encode",))
    calls = (min(acd_layers, n_blocks) * T) if acd else 0
    cond = groups * ((n_txt + n_neg) * text_dim + n_src * channels) * e + calls * G * n_img * 4
    add("conditioning", "conditioning + ACD record", cond,
        f"n_g {groups} x ((N_txt {n_txt} + N_neg {n_neg}) x {text_dim} + N_src {n_src} x C) x {e} B + {calls} calls "
        "x G x N_img x 4 B")

    batched = true_cfg and cfg_batch
    fwd_tokens = 2 * G * seq if batched else G * max(seq, seq_neg)
    acd_seq = n_txt + n_img if batched else seq
    scratch = G * acd_seq * d * (16 + e) if (acd == "fused" and acd_backend == "cpp" and e == 2) else 0
    k_fwd = QWEN_ROLLOUT_FWD_COEF["bf16" if mode == "bf16-autocast" else mode]  # the rollout runs without autocast
    rollout_act = fwd_tokens * d * k_fwd * e + scratch
    how = f"2G x S {seq} (CFG batched)" if batched else f"G x S {max(seq, seq_neg)}"
    add("rollout_activations", "rollout: transformer activations", rollout_act,
        f"{how} x d {d} x {k_fwd:g} x {e} B" + (f" + ACD op scratch G x {acd_seq} x d x {16 + e} B" if scratch else ""),
        ("rollout",))
    if acd == "eager":
        add("acd_eager", "rollout: eager ACD attention weights", heads * acd_seq ** 2 * (2 * e + 4),
            f"H {heads} x {acd_seq}² x (2x{e} + 4) B, one sample at a time", ("rollout",))
    vae_enc = QWEN_VAE_ENCODE_COEF * src_h * src_w * 96 * e
    add("vae_encode", "VAE encode (the source image)", vae_enc,
        f"{QWEN_VAE_ENCODE_COEF:g} x {src_h}x{src_w} x 96 x {e} B", ("rollout",))
    decoded = 1 if vae_slicing else G
    vae_dec = QWEN_VAE_DECODE_COEF * decoded * resolution * resolution * 96 * e
    add("vae_decode", "VAE decode (G finals)" if not vae_slicing else "VAE decode (one final at a time)", vae_dec,
        f"{QWEN_VAE_DECODE_COEF:g} x {'1' if vae_slicing else f'G {G}'} x {resolution}x{resolution} x 96 x {e} B",
        ("decode",))

    update_tokens = b * (2 * seq if batched else seq + (seq_neg if true_cfg else 0))
    pass_text = "2S" if batched else ("S + S_neg" if true_cfg else "S")
    if gradient_checkpointing:
        kept, r = QWEN_CKPT_COEF[mode]
        recompute_tokens = (2 if batched else 1) * b * seq
        update_act = update_tokens * d * e * kept * n_blocks + recompute_tokens * d * e * r
        act_formula = (f"b {b} (B {B} x c {c}) x ({pass_text}) {update_tokens // b} x d {d} x {e} B x {kept:g} x L "
                       f"{n_blocks} + {r:g} x {recompute_tokens} tokens x d x {e} B [checkpointing, {mode}]")
    else:
        a, k0 = QWEN_ACT_COEF[mode]
        update_act = update_tokens * d * e * (a * n_blocks + k0)
        act_formula = (f"b {b} (B {B} x c {c}) x ({pass_text}) {update_tokens // b} x d {d} x {e} B x "
                       f"({a:g} x {n_blocks} + {k0:g}) [{mode}]")
    add("update_activations", "update: transformer activations", update_act, act_formula, ("update",))
    surrogate = c * (G + 3 * B) * n_img * channels * 4 + b * n_img * channels * e
    add("surrogate", "update: surrogate tensors", surrogate,
        f"c {c} x (G + 3B) {G + 3 * B} x N_img x C x 4 B + b {b} x N_img x C x {e} B", ("update",))
    if with_encode:
        te = spec["text_encoder_config"]["text"]
        tokens = max(n_txt, n_neg)
        te_act = tokens * e * ((te["num_hidden_layers"] + 1) * te["hidden_size"] + 3 * te["intermediate_size"]) \
            + tokens * te["vocab_size"] * 4
        add("text_encoder_forward", "encode: text encoder forward", te_act,
            f"N {tokens} x ({e} B x ({te['num_hidden_layers'] + 1} x {te['hidden_size']} + 3 x "
            f"{te['intermediate_size']}) + {te['vocab_size']} x 4 B) [rough]", ("encode",))

    inputs = dict(resolution=resolution, groups=groups, group_size=G, num_anchors=B, num_steps=T, train_steps=n,
                  train_step_chunk=train_step_chunk, text_len=text_len, lora_rank=lora_rank, dtype=dtype,
                  autocast=autocast, gradient_checkpointing=gradient_checkpointing, offload_states=offload_states,
                  acd=acd, acd_backend=acd_backend, device_type=device_type, num_layers=n_blocks,
                  num_single_layers=0, family="qwen-image-edit", arch=arch, source_resolution=source_resolution,
                  source_size=[src_h, src_w], cfg_batch=cfg_batch, true_cfg=true_cfg, text_encoder=text_encoder,
                  vae_slicing=vae_slicing, tokens=dict(text=n_txt, negative=n_neg, image=n_img, context=n_src,
                                                       total=seq), note="sizes in bytes")
    return MemoryEstimate(terms=terms, phase_peaks=_phase_peaks(terms), inputs=inputs)


def memory_suggestions(estimate_kwargs: dict, budget: int) -> list[dict]:
    """Changes that bring the estimated peak under `budget` bytes, applied cumulatively, cheapest first.

    Order: (Qwen-Image-Edit: the text encoder off the GPU between encodings,) gradient checkpointing,
    offloading the states, fewer train transitions per backward (train_step_chunk 4, 2, 1), (Qwen: true
    CFG's passes one after the other,) the finals decoded one at a time, (Qwen: the source image at the
    edit size,) fewer anchors (B/2, then 1: fewer samples in each update), then a smaller group per device
    (G/2, G/4). A change is kept only if it lowers the estimate; the list stops at the first combination
    that fits (a change skipped because it did not lower the peak is tried again after each accepted one:
    it may help once the peak has moved to another phase). The labels are `rcgrpo dryrun` flags (`rcgrpo train` takes the same, `--group` is
    `--group-size` there).
    """
    kw = dict(estimate_kwargs)
    current = estimate_memory(**kw)
    if current.peak <= budget:
        return []
    qwen = (kw.get("family") or family_of(kw["transformer_config"])) == "qwen-image-edit"
    steps: list[tuple[str, dict]] = []
    if qwen and kw.get("text_encoder") == "device":
        steps.append(("--offload-text-encoder", {"text_encoder": "offloaded"}))
    if not kw.get("gradient_checkpointing"):
        steps.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if not kw.get("offload_states") and kw.get("device_type") != "cpu":
        steps.append(("--offload-states", {"offload_states": True}))
    chunk = min(kw.get("train_step_chunk", 8), kw["train_steps"])
    steps += [(f"--train-step-chunk {c}", {"train_step_chunk": c}) for c in (4, 2, 1) if c < chunk]
    if qwen:
        if kw.get("cfg_batch", True) and kw.get("true_cfg", True):
            steps.append(("--no-cfg-batch", {"cfg_batch": False}))
    if not kw.get("vae_slicing"):
        steps.append(("--vae-slicing", {"vae_slicing": True}))
    if qwen:
        source = kw.get("source_resolution") or int(ARCHS[kw.get("arch") or "qwen-image-edit"]["source_area"] ** 0.5)
        side = -(-kw["resolution"] // 32) * 32
        if side < source:
            steps.append((f"--source-resolution {side}", {"source_resolution": side}))
    anchors = kw["num_anchors"]
    for b in sorted({anchors // 2, 1}, reverse=True):
        if 1 <= b < anchors:
            steps.append((f"--anchors {b}", {"num_anchors": b}))
    group = kw["group_size"]
    for g in (group // 2, group // 4):
        if kw["num_anchors"] < g < group:
            steps.append((f"--group {g} (per device)", {"group_size": g, "num_anchors": min(kw["num_anchors"], g - 1)}))
    out: list[dict] = []
    labels: list[str] = []
    pending = list(steps)
    while pending:
        # the cheapest pending change that lowers the peak now (one that did not help before may help once
        # another has moved the peak to a different phase)
        for i, (label, change) in enumerate(pending):
            trial = estimate_memory(**(kw | change))
            if trial.peak < current.peak:
                break
        else:
            break
        del pending[i]
        kw |= change
        labels = [lab for lab in labels if lab.split()[0] != label.split()[0]] + [label]
        current = trial
        out.append({"change": " ".join(labels), "peak_bytes": int(trial.peak), "peak_phase": trial.peak_phase,
                    "fits": bool(trial.peak <= budget)})
        if trial.peak <= budget:
            break
    return out


__all__ = ["GIB", "MemoryEstimate", "MemoryTerm", "REFERENCE_GPUS", "estimate_memory", "memory_suggestions"]
