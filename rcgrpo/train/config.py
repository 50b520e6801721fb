"""`RCGRPOConfig`: every knob of an RC-GRPO run, with defaults, documentation and validation.

Loaded from YAML (safe_load; unknown keys and wrong types are errors) and overridable from the CLI
as `--field-name value`. Presets give complete starting points (`tiny` runs offline on a CPU).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _doc(text: str, **kwargs):
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class RCGRPOConfig:
    """Configuration of `RCGRPOTrainer` (SPEC §3-7 defaults)."""

    # --- model and data
    model: str = _doc("FLUX.1-Kontext pipeline: 'tiny' (offline test model), a hub id or a local path", default="tiny")
    dataset: str = _doc("'squares' (built-in synthetic task) or a CompBench-format directory", default="squares")
    train_size: int = _doc("examples in the built-in training set", default=16)
    eval_size: int = _doc("held-out examples used for the before/after reward", default=8)
    resolution: int = _doc("edit height and width in pixels (multiple of 16)", default=512)
    max_sequence_length: int = _doc("T5 prompt tokens", default=512)
    skip_bad_examples: bool = _doc("report and skip examples with unusable masks instead of stopping", default=False)
    mask_pooling: str = _doc("pixel→token mask pooling: 'max' or 'mean'", default="max")
    mask_threshold: float = _doc("threshold for mask_pooling='mean'", default=0.5)
    # --- group rollouts (RDP, SPEC §3-4)
    group_size: int = _doc("G: candidates per group, index 0 the unperturbed reference", default=12)
    groups_per_step: int = _doc("groups (examples) per process per optimizer step", default=1)
    num_inference_steps: int = _doc("T: Euler ODE steps of each rollout", default=28)
    guidance_scale: float = _doc("Kontext guidance scale", default=2.5)
    perturbation: str = _doc("'rdp' (region-decoupled) or 'global' (Neighbor GRPO ablation)", default="rdp")
    alpha_edit: float = _doc("RDP perturbation scale inside the edit mask", default=0.3)
    alpha_base: float = _doc("RDP perturbation scale in the background (ε_bg)", default=0.02)
    global_sigma: float = _doc("σ of the global perturbation when perturbation='global'", default=0.3)
    # --- surrogate policy (SPEC §5)
    num_anchors: int = _doc("B: anchors drawn from the perturbed candidates", default=4)
    train_timesteps: str = _doc("transitions trained: 'all', an int n (first n, high noise first) or a fraction like '0.5'", default="all")
    tau_edit: float = _doc("τ_edit of the region-normalized distance", default=0.9)
    tau_base: float = _doc("τ_base of the region-normalized distance", default=1.1)
    distance_scale: float = _doc("s: scale of the distance", default=1.0)
    distance_eps: float = _doc("ε in the region normalization", default=1e-6)
    distance_backend: str = _doc("region_sq_dists backend: auto|triton|cpp|torch", default="auto")
    # --- rewards and objective (SPEC §6-7)
    reward_funcs: list = _doc("task reward names (see rcgrpo.rewards) or 'module:function'", default_factory=lambda: ["background_psnr"])
    reward_weights: list = _doc("weights of reward_funcs (default 1 each)", default_factory=list)
    editscore_url: str = _doc("URL of an EditScore reward server (python -m rcgrpo.reward_server) for 'editscore'", default="")
    clip_model: str = _doc("CLIP weights (hub id or local path) for 'clip_lct' / 'clip_lci'", default="openai/clip-vit-large-patch14")
    w_task: float = _doc("weight of the standardized task reward", default=1.0)
    w_acd: float = _doc("weight of the standardized ACD reward (0 disables ACD)", default=0.5)
    acd_layers: int = _doc("ACD uses the last K attention layers", default=10)
    acd_backend: str = _doc("acd_attention backend: auto|triton|cpp|torch", default="auto")
    acd_mode: str = _doc("ACD attention: 'fused' (one kernel), 'sdpa' (SDPA output + mass kernel) or 'eager' "
                         "(materialized weights, the measurement baseline)", default="fused")
    advantage: str = _doc("'std' or 'quasi_norm' (Neighbor GRPO)", default="std")
    quasi_norm_p: float = _doc("p of the quasi-norm advantage", default=0.8)
    clip_eps: float = _doc("ε_clip of the clipped objective", default=0.2)
    beta: float = _doc("weight of the deviation from the base model's prediction", default=0.0)
    bad_reward_policy: str = _doc("non-finite or malformed rewards: 'stop' the run or 'skip' the group", default="stop")
    # --- LoRA and optimization
    lora_rank: int = _doc("LoRA rank", default=16)
    lora_alpha: float = _doc("LoRA alpha", default=16.0)
    lora_target_modules: list = _doc("modules that get LoRA adapters", default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    learning_rate: float = _doc("AdamW learning rate", default=1e-4)
    weight_decay: float = _doc("AdamW weight decay", default=0.0)
    adam_beta1: float = _doc("AdamW β1", default=0.9)
    adam_beta2: float = _doc("AdamW β2", default=0.999)
    lr_scheduler: str = _doc("diffusers scheduler name: constant, constant_with_warmup, linear, cosine", default="constant")
    warmup_steps: int = _doc("learning-rate warm-up steps", default=0)
    max_grad_norm: float = _doc("gradient clipping norm (0 disables)", default=1.0)
    gradient_accumulation_steps: int = _doc("iterations accumulated per optimizer step", default=1)
    inner_epochs: int = _doc("updates on each batch of rollouts", default=1)
    train_step_chunk: int = _doc("train transitions per backward pass (bounds activation memory)", default=8)
    mixed_precision: str = _doc("'no' or 'bf16' (autocast on GPU)", default="no")
    gradient_checkpointing: bool = _doc("recompute transformer activations in backward", default=False)
    vae_slicing: bool = _doc("decode the G candidates one at a time (lower peak memory)", default=False)
    cache_text_embeddings: bool = _doc("encode each instruction once", default=True)
    offload_states: bool = _doc("keep rollout states on the CPU between rollout and update", default=False)
    max_nonfinite_steps: int = _doc("stop after this many consecutive non-finite losses/gradients", default=3)
    # --- run control
    max_steps: int = _doc("optimizer steps", default=100)
    seed: int = _doc("seed of data order, noises and anchors", default=0)
    output_dir: str = _doc("run directory", default="runs/train")
    checkpoint_every: int = _doc("save a checkpoint every N steps (0: only at the end)", default=10)
    keep_checkpoints: int = _doc("complete checkpoints kept", default=2)
    log_every: int = _doc("log every N steps", default=1)
    sample_every: int = _doc("save sample edits and ACD heatmaps every N steps (0: never)", default=0)
    tensorboard: bool = _doc("also write TensorBoard events", default=True)
    device: str = _doc("'auto', 'cpu' or 'cuda'", default="auto")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, name: str, expected: str):
            if not cond:
                raise ValueError(f"config {name}: expected {expected}, got {getattr(self, name)!r}")

        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _field_type(f))
        need(self.group_size >= 2, "group_size", "an int ≥ 2")
        need(1 <= self.num_anchors <= self.group_size - 1, "num_anchors", f"1 ≤ num_anchors ≤ group_size − 1 = {self.group_size - 1}")
        need(self.groups_per_step >= 1, "groups_per_step", "an int ≥ 1")
        need(self.num_inference_steps >= 1, "num_inference_steps", "an int ≥ 1")
        need(self.resolution >= 16 and self.resolution % 16 == 0, "resolution", "a multiple of 16")
        need(self.perturbation in ("rdp", "global"), "perturbation", "'rdp' or 'global'")
        for name in ("alpha_edit", "alpha_base", "global_sigma"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "a value in [0, 1]")
        for name in ("tau_edit", "tau_base", "distance_scale", "learning_rate"):
            need(getattr(self, name) > 0 and math.isfinite(getattr(self, name)), name, "a finite value > 0")
        need(self.clip_eps > 0, "clip_eps", "a value > 0")
        need(self.beta >= 0, "beta", "a value ≥ 0")
        need(self.advantage in ("std", "quasi_norm"), "advantage", "'std' or 'quasi_norm'")
        need(self.bad_reward_policy in ("stop", "skip"), "bad_reward_policy", "'stop' or 'skip'")
        need(self.mixed_precision in ("no", "bf16"), "mixed_precision", "'no' or 'bf16'")
        need(self.mask_pooling in ("max", "mean"), "mask_pooling", "'max' or 'mean'")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", "'auto', 'cpu' or 'cuda'")
        need(self.acd_mode in ("fused", "sdpa", "eager"), "acd_mode", "'fused', 'sdpa' or 'eager'")
        for name in ("acd_backend", "distance_backend"):
            need(getattr(self, name) in ("auto", "triton", "cpp", "torch"), name, "auto|triton|cpp|torch")
        need(len(self.reward_funcs) >= 1, "reward_funcs", "at least one reward function")
        need(not self.reward_weights or len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
             f"{len(self.reward_funcs)} weights (one per reward function) or none")
        for name in ("max_steps", "lora_rank", "gradient_accumulation_steps", "inner_epochs", "train_step_chunk",
                     "max_nonfinite_steps", "keep_checkpoints", "log_every", "train_size", "eval_size"):
            need(getattr(self, name) >= 1 if name not in ("eval_size",) else getattr(self, name) >= 0, name, "a positive int")
        for name in ("checkpoint_every", "sample_every", "warmup_steps", "weight_decay"):
            need(getattr(self, name) >= 0, name, "a value ≥ 0")
        self.train_timestep_indices(self.num_inference_steps)  # raises on a bad spec

    def train_timestep_indices(self, num_steps: int) -> list[int]:
        """Transitions j trained (SPEC §5): all, the first n, or the first fraction (high noise first)."""
        spec = str(self.train_timesteps).strip()
        if spec == "all":
            return list(range(num_steps))
        try:
            value = float(spec) if "." in spec else int(spec)
        except ValueError:
            raise ValueError(f"config train_timesteps: expected 'all', an int n or a fraction like '0.5', got {spec!r}") from None
        if isinstance(value, float):
            if not 0 < value <= 1:
                raise ValueError(f"config train_timesteps: a fraction must lie in (0, 1], got {spec!r}")
            count = max(1, math.ceil(value * num_steps))
        else:
            if value < 1:
                raise ValueError(f"config train_timesteps: a count must be ≥ 1, got {spec!r}")
            count = value
        return list(range(min(count, num_steps)))

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "RCGRPOConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys are the fields of RCGRPOConfig")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path) -> "RCGRPOConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
        return cls.from_dict(values, source=f"config file {str(path)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> "RCGRPOConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


PRESETS: dict[str, dict] = {
    # Offline, CPU, minutes: the built-in "make the square red" task on the tiny random model.
    "tiny": dict(
        model="tiny", dataset="squares", resolution=32, max_sequence_length=16, group_size=8, groups_per_step=2,
        num_inference_steps=4, num_anchors=4, reward_funcs=["redness", "background_psnr"], reward_weights=[1.0, 0.002],
        w_acd=0.5, acd_layers=4, lora_rank=8, lora_alpha=8.0, learning_rate=1e-2, max_steps=80, train_size=16,
        eval_size=8, checkpoint_every=20, sample_every=20, max_grad_norm=1.0, alpha_edit=0.5,
    ),
    # One H100: FLUX.1-Kontext-dev at 512 px (see the README recipe).
    "kontext-512": dict(
        model="black-forest-labs/FLUX.1-Kontext-dev", resolution=512, group_size=12, num_anchors=4,
        num_inference_steps=28, train_timesteps="8", mixed_precision="bf16", gradient_checkpointing=True,
        lora_rank=32, lora_alpha=32.0, learning_rate=1e-4, reward_funcs=["background_psnr", "clip_lct"],
        max_steps=300, checkpoint_every=25, sample_every=25,
    ),
    "kontext-1024": dict(
        model="black-forest-labs/FLUX.1-Kontext-dev", resolution=1024, group_size=12, num_anchors=4,
        num_inference_steps=28, train_timesteps="8", train_step_chunk=2, mixed_precision="bf16",
        gradient_checkpointing=True, offload_states=True, vae_slicing=True, lora_rank=32, lora_alpha=32.0, learning_rate=1e-4,
        reward_funcs=["background_psnr", "clip_lct"], max_steps=300, checkpoint_every=25, sample_every=25,
    ),
}


def preset(name: str, **overrides) -> RCGRPOConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: unknown preset; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    return RCGRPOConfig.from_dict(values, source=f"preset {name!r}")


def parse_override(name: str, text: str):
    """Convert a CLI string to the type of config field `name`."""
    fields = {f.name: f for f in dataclasses.fields(RCGRPOConfig)}
    if name not in fields:
        raise ValueError(f"unknown config field --{name.replace('_', '-')}")
    kind = _field_type(fields[name])
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return lowered in ("1", "true", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is list:
            return [_scalar(v) for v in text.split(",") if v.strip()]
        return text
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')}: expected {kind.__name__}, got {text!r}") from None


def _scalar(text: str):
    text = text.strip()
    try:
        return float(text) if any(c in text for c in ".e") and not text.isalpha() else int(text)
    except ValueError:
        return text


def _field_type(f):
    hints = typing.get_type_hints(RCGRPOConfig)
    kind = hints[f.name]
    return typing.get_origin(kind) or kind


def _check_type(name, value, kind):
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool) if name == "train_timesteps" else isinstance(value, str),
        list: isinstance(value, (list, tuple)),
    }.get(kind, True)
    if not ok:
        raise ValueError(f"config {name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
