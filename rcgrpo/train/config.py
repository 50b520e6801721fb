"""`RCGRPOConfig`: every knob of an RC-GRPO run, with defaults, documentation and validation.

A dataclass in the style of TRL's configs: each field's `metadata["help"]` documents it, choices are
`Literal` types, so `transformers.HfArgumentParser` turns it into flags (`--learning-rate 5e-5`,
`--gradient-checkpointing` / `--no-gradient-checkpointing`, `--reward-funcs a b`) with every default
shown in `--help`. YAML files (safe_load) set the same fields; unknown or repeated keys, wrong types
(quoted strings where booleans or numbers are expected) and non-finite numbers are errors naming the
file, key and line, and numbers written the usual way (`1e-4`, which YAML 1.1 reads as a string) are
accepted. Every float field refuses NaN and ±inf. Range checks live in `validate()`, which runs on
construction. Presets give complete starting points.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
# Fields a resumed run cannot change: the LoRA's shape and the model it adapts.
RESUME_FIXED = ("model", "lora_rank", "lora_alpha", "lora_target_modules")


def _doc(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RCGRPOConfig:
    """Configuration of `RCGRPOTrainer` (SPEC §3-7 defaults)."""

    # --- model and data
    model: str = _doc("FLUX.1-Kontext pipeline: 'tiny' (random offline test model), 'tiny-editor' (the pretrained "
                      "tiny MiniBench editor), a local diffusers directory or a hub id", default="tiny")
    source_resolution: Optional[int] = _doc(
        "Qwen-Image-Edit: side in pixels of the source image's area as the VAE (and QwenImageEditPipeline's "
        "vision-language encoder) sees it; unset: the pipelines' 1024² whatever the edit size (4096 source tokens "
        "in every transformer call). Smaller is cheaper but is not what the stock pipeline feeds at inference",
        default=None)
    cfg_batch: bool = _doc("Qwen-Image-Edit's true CFG: the conditional and the unconditional pass in one "
                           "transformer call (faster); off: two calls (lower peak memory)", default=True)
    offload_text_encoder: bool = _doc("keep the text encoder(s) in CPU memory, on the device only while an "
                                      "instruction is encoded (once each with cache_text_embeddings): frees their "
                                      "weights (Qwen2.5-VL-7B: 15.4 GiB in bf16) for the rest of the step",
                                      default=False)
    dataset: str = _doc("'squares' (built-in toy task), 'minibench' (procedural MiniBench train split) or a "
                        "CompBench-format directory", default="squares")
    train_size: int = _doc("examples in the built-in training sets", default=16)
    eval_size: int = _doc("held-out examples used for the before/after reward", default=8)
    eval_split: Literal["val", "test"] = _doc("MiniBench split of the evaluation examples (dataset 'minibench'; "
                                              "'val' is what 'heldout' meant before the test split existed; "
                                              "keep 'test' for a final, once-only measurement)", default="val")
    resolution: int = _doc("edit size in pixels: height × width ≈ resolution² (multiple of 16)", default=512)
    keep_aspect: bool = _doc("keep each image's aspect ratio (the pipeline's resolution buckets scaled to "
                             "resolution²) instead of resizing it to resolution × resolution", default=True)
    max_sequence_length: int = _doc("T5 prompt tokens (the pipeline pads the instruction to this length)", default=512)
    skip_bad_examples: bool = _doc("report and skip examples with unusable masks instead of stopping", default=False)
    mask_pooling: Literal["max", "mean"] = _doc("pixel→token mask pooling", default="max")
    mask_threshold: float = _doc("threshold for mask_pooling='mean'", default=0.5)
    # --- group rollouts (RDP, SPEC §3-4)
    group_size: int = _doc("G: candidates per group, index 0 the unperturbed reference", default=12)
    groups_per_step: int = _doc("groups (examples) per process per rollout batch", default=1)
    num_inference_steps: int = _doc("T: Euler ODE steps of each rollout", default=28)
    guidance_scale: float = _doc("the family's guidance: Kontext's embedded guidance scale, Qwen-Image-Edit's "
                                 "true-CFG scale (CFG runs when > 1 with a negative prompt)", default=2.5)
    negative_prompt: Optional[str] = _doc("true CFG's negative prompt (Qwen-Image-Edit); unset: the model's default "
                                          "(' ' for Qwen-Image-Edit, none for FLUX.1-Kontext)", default=None)
    perturbation: Literal["rdp", "global"] = _doc("'rdp' (region-decoupled) or 'global' (Neighbor GRPO's global "
                                                  "perturbation, the ablation baseline)", default="rdp")
    alpha_edit: float = _doc("RDP perturbation scale α_edit inside the edit mask", default=0.3)
    alpha_base: float = _doc("RDP perturbation scale α_base in the background (ε_bg)", default=0.02)
    global_sigma: Optional[float] = _doc("σ of perturbation='global' (α_edit = α_base = σ); unset: σ = alpha_edit, "
                                         "so the ablation compares the same strength inside the mask", default=None)
    # --- surrogate policy (SPEC §5)
    num_anchors: int = _doc("B: anchors drawn from the perturbed candidates", default=4)
    train_timesteps: str = _doc("transitions trained: 'all', an int n (first n, high noise first) or a fraction "
                                "like '0.5'", default="all")
    tau_edit: float = _doc("τ_edit of the region-normalized distance", default=0.9)
    tau_base: float = _doc("τ_base of the region-normalized distance", default=1.1)
    distance_scale: float = _doc("s: scale of the distance", default=1.0)
    distance_eps: float = _doc("ε in the region normalization", default=1e-6)
    distance_backend: Literal["auto", "triton", "cpp", "torch"] = _doc("region_sq_dists backend", default="auto")
    # --- rewards and objective (SPEC §6-7)
    reward_funcs: list[str] = _doc("task reward names (background_psnr, background_ssim, clip_lct, clip_lci, "
                                   "editscore, minibench, redness) or 'module:function'",
                                   default_factory=lambda: ["background_psnr"])
    reward_weights: list[float] = _doc("weights of reward_funcs, one each (empty: 1 each)", default_factory=list)
    editscore_url: str = _doc("URL of an EditScore reward server (python -m rcgrpo.reward_server) for 'editscore', "
                              "or several separated by commas or spaces (in YAML also a list): batches go to the "
                              "least busy, a failing one is set aside and its batch resent to another; the token "
                              "goes in RCGRPO_REWARD_TOKEN or each URL's password", default="")
    editscore_timeout: float = _doc("seconds to wait for one EditScore request, and with no server usable before "
                                    "the run stops (bad_reward_policy 'skip': the group is skipped)", default=300.0)
    editscore_batch_size: int = _doc("images per EditScore request", default=8)
    overlap_rewards: bool = _doc("score each group with the remote rewards (EditScore) in the background while the "
                                 "next group of the step rolls out; results are identical either way", default=True)
    max_reward_requests_in_flight: int = _doc("remote reward calls (one per group) pending at once per process; "
                                              "a rollout waits for the oldest beyond", default=4)
    clip_model: str = _doc("CLIP weights for 'clip_lct' / 'clip_lci': hub id, local path or 'tiny-clip'",
                           default="openai/clip-vit-large-patch14")
    w_task: float = _doc("weight of the standardized task reward", default=1.0)
    w_acd: float = _doc("weight of the standardized ACD reward (0 disables ACD)", default=0.5)
    acd_layers: int = _doc("ACD uses the last K attention layers", default=10)
    acd_text_tokens: Literal["prompt", "all"] = _doc("text queries v of ACD: the instruction's real T5 tokens "
                                                     "('prompt', SPEC §7) or every padded position ('all')",
                                                     default="prompt")
    acd_backend: Literal["auto", "triton", "cpp", "torch"] = _doc("acd_attention backend", default="auto")
    acd_mode: Literal["auto", "fused", "sdpa", "eager"] = _doc(
        "ACD attention: 'auto' (the op's default: on CUDA SDPA output + the Triton mass kernel), 'fused' (one "
        "kernel), 'sdpa', or 'eager' (materialized weights, the measurement baseline)", default="auto")
    advantage: Literal["std", "quasi_norm"] = _doc("group advantage normalization ('quasi_norm': Neighbor GRPO)",
                                                   default="std")
    advantage_std: Literal["group", "global"] = _doc(
        "divide the group-centered rewards by each group's std ('group', SPEC §6) or by one std over the step's "
        "groups on all ranks ('global': groups keep their relative spread; rcgrpo.method.advantages)",
        default="group")
    low_variance_threshold: float = _doc(
        "a group whose task reward (weighted sum, before standardization) has a population std over its G "
        "candidates below this is 'low-variance': counted in low_variance_fraction every step, and given no "
        "update with filter_low_variance (in the task reward's units; 0.005 suits rewards in [0, 1] like "
        "minibench, whose noise-level groups sit near 0.001)", default=0.005)
    filter_low_variance: bool = _doc(
        "give low-variance groups no update: advantages 0, no backward, left out of the loss's mean over groups "
        "and of the global std (counted as filtered_groups; no optimizer step when every group is filtered)",
        default=False)
    quasi_norm_p: float = _doc("p of the quasi-norm advantage", default=0.8)
    clip_eps: float = _doc("ε_clip of the clipped objective", default=0.2)
    beta: float = _doc("weight of the deviation from the base model's prediction", default=0.0)
    bad_reward_policy: Literal["stop", "skip"] = _doc("non-finite or malformed rewards: stop the run or skip the "
                                                      "group", default="stop")
    # --- LoRA and optimization
    lora_rank: int = _doc("LoRA rank", default=16)
    lora_alpha: float = _doc("LoRA alpha", default=16.0)
    lora_target_modules: list[str] = _doc("modules that get LoRA adapters",
                                          default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    learning_rate: float = _doc("AdamW learning rate", default=1e-4)
    weight_decay: float = _doc("AdamW weight decay", default=0.0)
    adam_beta1: float = _doc("AdamW β1", default=0.9)
    adam_beta2: float = _doc("AdamW β2", default=0.999)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _doc(
        "learning-rate schedule (diffusers get_scheduler)", default="constant")
    warmup_steps: int = _doc("learning-rate warm-up steps", default=0)
    max_grad_norm: float = _doc("gradient clipping norm (0 disables)", default=1.0)
    gradient_accumulation_steps: int = _doc("rollout batches per optimizer step: the step's groups are "
                                            "groups_per_step × this; rewards are standardized over all of them, "
                                            "the update runs one group at a time", default=1)
    inner_epochs: int = _doc("updates on each batch of rollouts", default=1)
    train_step_chunk: int = _doc("train transitions per backward pass (bounds activation memory)", default=8)
    mixed_precision: Literal["no", "bf16"] = _doc("bf16 autocast on GPU", default="no")
    gradient_checkpointing: bool = _doc("recompute transformer activations in backward", default=False)
    vae_slicing: bool = _doc("decode the G candidates one at a time (lower peak memory)", default=False)
    cache_text_embeddings: bool = _doc("encode each instruction once", default=True)
    offload_states: bool = _doc("keep rollout states on the CPU between rollout and update (moved to the device "
                                "one group at a time)", default=False)
    ema_decay: float = _doc("EMA of the LoRA weights: decay per optimizer step (0 disables); the EMA is what "
                            "evaluation uses, saved as <output_dir>/lora_ema/ beside lora/ (rcgrpo.train.ema)",
                            default=0.0)
    ema_start_step: int = _doc("the EMA copies the weights up to this training step and averages after it",
                               default=0)
    max_nonfinite_steps: int = _doc("stop after this many consecutive non-finite losses/gradients", default=3)
    log_policy_kl: bool = _doc("after each update, measure the surrogate policy's movement on the same batch: "
                               "policy_kl, approx_kl, clip_frac_high/low, leap_rms_edit/background (one extra "
                               "no-grad forward per anchor transition)", default=True)
    # --- run control
    max_steps: int = _doc("optimizer steps", default=100)
    seed: int = _doc("seed of data order, noises and anchors", default=0)
    output_dir: str = _doc("run directory", default="runs/train")
    checkpoint_every: int = _doc("save a checkpoint every N steps (0: only at the end)", default=10)
    keep_checkpoints: int = _doc("complete checkpoints kept", default=2)
    log_every: int = _doc("log every N steps", default=1)
    sample_every: int = _doc("save sample edits and ACD heatmaps every N steps (0: never)", default=0)
    eval_every: int = _doc("every N steps, log the mean task reward of the evaluation set's deterministic edits "
                           "(eval/task_reward; eval/task_reward_ema with the EMA on) to metrics.jsonl (0: never)",
                           default=0)
    report_to: str = _doc("trackers: tensorboard, wandb, mlflow or none (comma-separated for several); "
                          "metrics.jsonl is always written", default="tensorboard")
    device: str = _doc("'auto', 'cpu', 'cuda' or 'cuda:N'", default="auto")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_type(f)))
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
        need(self.max_sequence_length >= 1, "max_sequence_length", "an int ≥ 1")
        need(self.source_resolution is None or (self.source_resolution >= 64 and self.source_resolution % 32 == 0),
             "source_resolution", "unset or a multiple of 32 ≥ 64 (the pipelines round sizes to 32 px)")
        for name in ("alpha_edit", "alpha_base"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "a value in [0, 1]")
        need(self.global_sigma is None or 0.0 <= self.global_sigma <= 1.0, "global_sigma", "unset or a value in [0, 1]")
        for name in ("tau_edit", "tau_base", "distance_scale", "learning_rate"):
            need(getattr(self, name) > 0 and math.isfinite(getattr(self, name)), name, "a finite value > 0")
        need(self.clip_eps > 0, "clip_eps", "a value > 0")
        need(self.beta >= 0, "beta", "a value ≥ 0")
        need(0.0 <= self.mask_threshold <= 1.0, "mask_threshold", "a value in [0, 1]")
        need(self.w_acd >= 0 and math.isfinite(self.w_acd), "w_acd", "a finite value ≥ 0")
        need(self.low_variance_threshold >= 0 and math.isfinite(self.low_variance_threshold),
             "low_variance_threshold", "a finite value ≥ 0")
        need(self.advantage_std == "group" or self.advantage == "std", "advantage_std",
             "'group' with advantage='quasi_norm' (the global std applies to advantage='std')")
        need(self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0, "ema_decay", "0 (off) or a value in (0, 1)")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", "'auto', 'cpu' or 'cuda'")
        need(len(self.reward_funcs) >= 1, "reward_funcs", "at least one reward function")
        need(not self.reward_weights or len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
             f"{len(self.reward_funcs)} weights (one per reward function) or none")
        need(all(math.isfinite(w) for w in self.reward_weights), "reward_weights", "finite numbers")
        for name in ("max_steps", "lora_rank", "gradient_accumulation_steps", "inner_epochs", "train_step_chunk",
                     "max_nonfinite_steps", "keep_checkpoints", "log_every", "train_size", "acd_layers"):
            need(getattr(self, name) >= 1, name, "an int ≥ 1")
        for name in ("checkpoint_every", "sample_every", "warmup_steps", "weight_decay", "eval_size", "max_grad_norm",
                     "eval_every", "ema_start_step"):
            need(getattr(self, name) >= 0, name, "a value ≥ 0")
        need(bool(str(self.output_dir).strip()), "output_dir", "a directory path (not empty)")
        need(self.editscore_timeout > 0, "editscore_timeout", "a value > 0")
        need(self.editscore_batch_size >= 1, "editscore_batch_size", "an int ≥ 1")
        need(self.max_reward_requests_in_flight >= 1, "max_reward_requests_in_flight", "an int ≥ 1")
        if self.editscore_url.strip():
            from ..rewards.pool import split_urls

            split_urls(self.editscore_url, "config editscore_url")  # ValueError naming the bad URL
        trackers = self.trackers()
        need(all(t in REPORT_TO for t in trackers) and ("none" not in trackers or len(trackers) == 1), "report_to",
             f"one or more of {', '.join(REPORT_TO[:-1])} (comma-separated), or none")
        self.train_timestep_indices(self.num_inference_steps)  # raises on a bad spec

    def editor_options(self) -> dict:
        """The options `Editor.configure` takes (the trainer applies them to its editor)."""
        return dict(offload_text_encoder=self.offload_text_encoder, source_resolution=self.source_resolution,
                    cfg_batch=self.cfg_batch)

    def trackers(self) -> list[str]:
        """The trackers of `report_to` ([] for "none")."""
        names = [t.strip() for t in str(self.report_to).split(",") if t.strip()]
        return [] if names == ["none"] else names

    def perturbation_scales(self) -> tuple[float, float]:
        """(α_edit, α_base) of the configured perturbation: RDP's, or the global σ for both (SPEC §3)."""
        if self.perturbation == "global":
            sigma = self.alpha_edit if self.global_sigma is None else self.global_sigma
            return sigma, sigma
        return self.alpha_edit, self.alpha_base

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
    def read_yaml(cls, path) -> dict:
        """The field values of a YAML file, each checked against its field (`check_yaml_value`): a mapping
        of known fields, no key twice, the field's type (no quoted strings for booleans and numbers;
        `1e-4` written plainly is a number), finite numbers, the field's choices. Errors name the file,
        the key and its line. Range checks that involve several fields stay in `validate()`."""
        path = Path(path)
        where = f"config file {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where} cannot be read ({exc})") from None
        try:
            lines, plain = _yaml_key_lines(text, where)
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise ValueError(f"{where} is not valid YAML ({detail})") from None
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ValueError(f"{where} must hold a mapping of field: value, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, values)) - names)
        if unknown:
            first = unknown[0]
            raise ValueError(f"{where}: unknown keys {unknown} (line {lines.get(first, '?')}); known keys are the "
                             "fields of RCGRPOConfig")
        return {name: check_yaml_value(name, value, f"{where}, line {lines.get(name, '?')}: {name}",
                                       plain=plain.get(name, True))
                for name, value in values.items()}

    @classmethod
    def from_yaml(cls, path) -> "RCGRPOConfig":
        return cls.from_dict(cls.read_yaml(path), source=f"config file {str(Path(path))!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> "RCGRPOConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def resume_changes(saved: dict, config: RCGRPOConfig) -> tuple[dict, dict]:
    """(fixed, changed): fields that differ between a checkpoint's saved config and `config`, split into
    those a resume cannot change (`RESUME_FIXED`) and those it applies. Each maps name → (saved, new)."""
    fixed, changed = {}, {}
    for name, new in config.to_dict().items():
        if name not in saved or saved[name] == new or name == "output_dir":
            continue
        (fixed if name in RESUME_FIXED else changed)[name] = (saved[name], new)
    return fixed, changed


PRESETS: dict[str, dict] = {
    # Offline, CPU, minutes: the built-in "make the square red" task on the tiny random model.
    # perturbation="global" would use σ = alpha_edit = 0.5 (global_sigma unset).
    "tiny": dict(
        model="tiny", dataset="squares", resolution=32, max_sequence_length=16, group_size=8, groups_per_step=2,
        num_inference_steps=4, num_anchors=4, reward_funcs=["redness", "background_psnr"], reward_weights=[1.0, 0.002],
        w_acd=0.5, acd_layers=4, lora_rank=8, lora_alpha=8.0, learning_rate=1e-2, max_steps=80, train_size=16,
        eval_size=8, checkpoint_every=20, sample_every=20, max_grad_norm=1.0, alpha_edit=0.5,
    ),
    # Offline, CPU, minutes: the shipped tiny editor on MiniBench (programmatic task reward + ACD); the
    # base of `rcgrpo ablate` and of `make demo`. alpha_edit 0.6: the 2026-12-07 validation study's best
    # task reward at 100, 200 and 400 steps (0.3 explored too little; 0.9 no better); perturbation="global"
    # would use σ = alpha_edit.
    "minibench": dict(
        model="tiny-editor", dataset="minibench", resolution=64, max_sequence_length=32, group_size=8,
        groups_per_step=2, num_inference_steps=8, num_anchors=4, train_timesteps="4", reward_funcs=["minibench"],
        w_acd=0.5, acd_layers=4, lora_rank=8, lora_alpha=8.0, learning_rate=5e-4, max_steps=40, train_size=512,
        eval_size=12, checkpoint_every=20, sample_every=20, alpha_edit=0.6, alpha_base=0.02,
    ),
    # One H100: FLUX.1-Kontext-dev at 512 px (see the README recipe); global σ = alpha_edit = 0.3.
    "kontext-512": dict(
        model="black-forest-labs/FLUX.1-Kontext-dev", resolution=512, group_size=12, num_anchors=4,
        num_inference_steps=28, train_timesteps="8", mixed_precision="bf16", gradient_checkpointing=True,
        lora_rank=32, lora_alpha=32.0, learning_rate=1e-4, reward_funcs=["background_psnr", "clip_lct"],
        max_steps=300, checkpoint_every=25, sample_every=25,
    ),
    # One H100 at 1024 px: states offloaded, 2 transitions per backward; global σ = alpha_edit = 0.3.
    "kontext-1024": dict(
        model="black-forest-labs/FLUX.1-Kontext-dev", resolution=1024, group_size=12, num_anchors=4,
        num_inference_steps=28, train_timesteps="8", train_step_chunk=2, mixed_precision="bf16",
        gradient_checkpointing=True, offload_states=True, vae_slicing=True, lora_rank=32, lora_alpha=32.0, learning_rate=1e-4,
        reward_funcs=["background_psnr", "clip_lct"], max_steps=300, checkpoint_every=25, sample_every=25,
    ),
    # One H100: Qwen-Image-Edit (20B MMDiT, Qwen2.5-VL-7B encoder) at 512 px edits of a source the model sees
    # at its stock 1024², true CFG 4 with the negative prompt " ". The 7B encoder stays in CPU memory between
    # encodings, states offloaded, one train transition per backward, CFG's passes one after the other and
    # B = 2 anchors: estimated 65.5 GiB (`rcgrpo dryrun --arch qwen-image-edit --estimate-only`; B = 4 needs
    # 91 GiB, or the source at 512², which the stock pipeline does not do).
    "qwen-edit-512": dict(
        model="Qwen/Qwen-Image-Edit", resolution=512, max_sequence_length=128, group_size=12, num_anchors=2,
        num_inference_steps=28, train_timesteps="8", train_step_chunk=1, guidance_scale=4.0, negative_prompt=" ",
        mixed_precision="bf16", gradient_checkpointing=True, offload_text_encoder=True, offload_states=True,
        cfg_batch=False, lora_rank=32, lora_alpha=32.0, learning_rate=1e-4,
        reward_funcs=["background_psnr", "clip_lct"], max_steps=300, checkpoint_every=25, sample_every=25,
    ),
    # One H100 at 1024 px: as qwen-edit-512 with the VAE decoding one candidate at a time and B = 1 anchor:
    # estimated 58.9 GiB (B = 2: 77.1 GiB of the 78 usable, too close to call without a GPU measurement).
    "qwen-edit-1024": dict(
        model="Qwen/Qwen-Image-Edit", resolution=1024, max_sequence_length=128, group_size=12, num_anchors=1,
        num_inference_steps=28, train_timesteps="8", train_step_chunk=1, guidance_scale=4.0, negative_prompt=" ",
        mixed_precision="bf16", gradient_checkpointing=True, offload_text_encoder=True, offload_states=True,
        cfg_batch=False, vae_slicing=True, lora_rank=32, lora_alpha=32.0, learning_rate=1e-4,
        reward_funcs=["background_psnr", "clip_lct"], max_steps=300, checkpoint_every=25, sample_every=25,
    ),
}


def preset(name: str, **overrides) -> RCGRPOConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: unknown preset; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    return RCGRPOConfig.from_dict(values, source=f"preset {name!r}")


@functools.lru_cache(maxsize=1)
def _hints() -> dict:
    return typing.get_type_hints(RCGRPOConfig)


def _field_type(f):
    """The runtime kind of a field: bool, int, float, str or list (Optional and Literal unwrapped)."""
    kind = _hints()[f.name]
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    if origin is Literal:
        return type(typing.get_args(kind)[0])
    return origin or kind


def _choices(name: str) -> tuple | None:
    """The allowed values of a `Literal` field (None for other fields)."""
    kind = _hints()[name]
    if typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def _optional(name: str) -> bool:
    kind = _hints()[name]
    return typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)


def _coerce(name, value, kind):
    """Numbers written as strings ("1e-4" from YAML 1.1, "3" from a flag default) become numbers."""
    if value is None and _optional(name):
        return None
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value) if kind is float else int(value, 10)
        except ValueError:
            return value  # reported by validate() with the field's name
    if isinstance(value, int) and not isinstance(value, bool) and kind is float:
        return float(value)
    if name == "editscore_url" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML list of URLs
    if isinstance(value, tuple) and kind is list:
        return list(value)
    if kind is list and isinstance(value, list) and name == "reward_weights":
        return [_coerce("_", v, float) for v in value]
    if name == "train_timesteps" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _yaml_key_lines(text: str, where: str) -> tuple[dict, dict]:
    """({key: 1-based line}, {key: whether its value is written plainly, i.e. without quotes}) of the
    top-level mapping of a YAML document; ValueError naming the key and both lines when a key appears
    twice (PyYAML would keep the last value silently). Reads the node graph only (`yaml.compose` with
    the safe loader), no object is constructed."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict = {}
    plain: dict = {}
    if not isinstance(root, yaml.MappingNode):
        return lines, plain
    for key_node, value_node in root.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key is None:
            continue
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ValueError(f"{where}: key {key!r} appears twice (lines {lines[key]} and {line}); keep one")
        lines[key] = line
        if isinstance(value_node, yaml.ScalarNode):
            plain[key] = value_node.style is None
        elif isinstance(value_node, yaml.SequenceNode):
            plain[key] = all(not isinstance(v, yaml.ScalarNode) or v.style is None for v in value_node.value)
    return lines, plain


def yaml_key_lines(path) -> dict:
    """{key: 1-based line} of the top-level keys of a YAML file ({} when it cannot be read)."""
    try:
        return _yaml_key_lines(Path(path).read_text(), str(path))[0]
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return {}


def _yaml_number(value, kind, where: str, plain: bool):
    """A YAML value for an int or float field: the number, or ValueError naming `where`."""
    expected = kind.__name__
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        if not plain:
            raise ValueError(f"{where}: expected {expected}, got the quoted string {value!r} (write numbers "
                             "without quotes)")
        try:  # YAML 1.1 reads plain `1e-4` (no dot) as a string: a number written the usual way
            value = float(value) if kind is float else int(value, 10)
        except ValueError:
            raise ValueError(f"{where}: expected {expected}, got the string {value!r}") from None
    if kind is int and isinstance(value, float):
        raise ValueError(f"{where}: expected int, got {value!r}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return value


def check_yaml_value(name: str, value, where: str, *, plain: bool = True):
    """The value of field `name` read from a YAML file, checked and converted (floats as floats), or
    ValueError naming `where` (the file, key and line). `plain`: the scalar was written without quotes."""
    kind = _field_type(next(f for f in dataclasses.fields(RCGRPOConfig) if f.name == name))
    if value is None:
        if _optional(name):
            return None
        raise ValueError(f"{where}: expected a value, got nothing (null)")
    if kind is bool:
        if not isinstance(value, bool):
            shown = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
            raise ValueError(f"{where}: expected true or false, got {shown}")
        return value
    if kind in (int, float):
        return _yaml_number(value, kind, where, plain)
    if kind is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if name == "reward_weights":
            return [_yaml_number(v, float, f"{where}, item {i}", plain) for i, v in enumerate(value)]
        bad = next((v for v in value if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"{where}: expected a list of strings, got the item {bad!r}")
        return list(value)
    if name == "train_timesteps" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if name == "editscore_url" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # a list of reward server URLs
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    choices = _choices(name)
    if choices and value not in choices:
        raise ValueError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_type(name, value, kind):
    if value is None and _optional(name):
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
    }.get(kind, True)
    if ok and kind is list and name == "reward_weights":
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ValueError(f"config {name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"config {name}: expected a finite number, got {value!r}")
    if kind is list and name == "reward_weights" and not all(math.isfinite(v) for v in value):
        raise ValueError(f"config {name}: expected finite numbers, got {value!r}")
    choices = _choices(name)
    if choices and value not in choices:
        raise ValueError(f"config {name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
