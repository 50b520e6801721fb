"""The analytic memory model of one RC-GRPO iteration, and the settings that make a config fit."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .archs import flux_transformer_params, lora_params, vae_params

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
) -> MemoryEstimate:
    """Analytic peak memory of one RC-GRPO iteration (bytes), as the sum of the terms live in each phase.

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
        VAE decode              4·G·H·W·2w·e (all G finals decoded in one batch)
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
    e = 2 if dtype == "bf16" else 4
    if autocast is None:
        autocast = dtype == "bf16" and device_type == "cuda"
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
    if groups < 1:
        raise ValueError(f"groups must be ≥ 1, got {groups}")
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
    vae_dec = VAE_DECODE_COEF * G * height * width * 2 * width0 * e
    add("vae_decode", "VAE decode (G finals)", vae_dec,
        f"{VAE_DECODE_COEF} x G {G} x {height}x{width} x {2 * width0} x {e} B", ("decode",))

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
    inputs = dict(resolution=resolution, groups=groups, group_size=G, num_anchors=B, num_steps=T, train_steps=n,
                  train_step_chunk=train_step_chunk, text_len=text_len, lora_rank=lora_rank, dtype=dtype,
                  autocast=autocast, gradient_checkpointing=gradient_checkpointing, offload_states=offload_states,
                  acd=acd, acd_backend=acd_backend, device_type=device_type, num_layers=n_double,
                  num_single_layers=n_single, tokens=dict(text=n_txt, image=n_img, context=n_img, total=seq),
                  token_px=token_px,
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


__all__ = ["GIB", "MemoryEstimate", "MemoryTerm", "REFERENCE_GPUS", "estimate_memory", "memory_suggestions"]
