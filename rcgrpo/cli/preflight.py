"""Pre-flight checks that need the model's architecture but not its weights: the memory a training run
will need on its device, and the geometry (VAE scale factor) an edit's token grid has.

Architectures come from a loaded pipeline (`pipe.transformer.config`, `pipe.vae.config`) or, before
anything is loaded, from the model directory's `transformer/config.json` and `vae/config.json` (a
local directory, the shipped tiny editor, or a hub id already in the local Hugging Face cache).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from ..dryrun.memory import GIB, estimate_memory, memory_suggestions

# The memory model is one of FLUX.1's 16-pixel tokens; below this many bytes nothing is worth checking.
_SMALL_MODEL_BYTES = 2 * GIB
# On a CPU the run uses host memory (swap, overcommit): refused only when the estimate is clearly
# impossible, more than this many times the machine's total RAM.
CPU_REFUSE_FACTOR = 2.0


def _gib(value: float) -> str:
    return f"{value / GIB:.0f} GiB" if value >= 10 * GIB else f"{value / GIB:.1f} GiB"


# ------------------------------------------------------------------------------------------------
# architecture without the weights
# ------------------------------------------------------------------------------------------------
def model_directory(model: str) -> Path | None:
    """The local folder of `--model` whose config files can be read without loading weights, or None
    (the random `tiny` model, an uncached hub id)."""
    if model in (None, "tiny"):
        return None
    if model == "tiny-editor":
        from .. import testing

        return Path(testing.TINY_EDITOR_PATH)
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path
    try:  # a hub id already in the local cache: no network
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model), "transformer/config.json")
        if isinstance(found, str):
            return Path(found).parent.parent
    except Exception:  # noqa: BLE001 - not a valid repo id, no hub client: nothing to read
        return None
    return None


def read_component_config(model: str, component: str) -> dict | None:
    """`<model>/<component>/config.json` as a dict, or None when it cannot be read without loading the model."""
    folder = model_directory(model)
    if folder is None:
        return None
    file = folder / component / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def vae_scale_factor(model: str, pipe=None) -> int | None:
    """2^(levels − 1) of the model's VAE (8 for FLUX.1), from the pipeline or the model's vae/config.json;
    None when unknown before loading (`tiny`: the model loads in a fraction of a second)."""
    if pipe is not None:
        return int(pipe.vae_scale_factor)
    cfg = read_component_config(model, "vae")
    if not cfg or not cfg.get("block_out_channels"):
        return None
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def _vae_init_config(vae) -> dict | None:
    """The VAE config restricted to `AutoencoderKL`'s constructor arguments (what the memory model counts)."""
    if vae is None:
        return None
    from diffusers import AutoencoderKL

    config = dict(vae.config if not isinstance(vae, dict) else vae)
    accepted = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in accepted}


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def device_memory_budget(device) -> tuple[int, str]:
    """(bytes this process can use, how to name it) on a CUDA device: the free memory plus what this
    process already holds (the loaded pipeline counts in the estimate)."""
    dev = torch.device(device)
    free, total = torch.cuda.mem_get_info(dev)
    usable = min(total, free + torch.cuda.memory_reserved(dev))
    name = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    if usable >= 0.97 * total:
        return int(total), f"the {_gib(total)} of {name}"
    return int(usable), f"the {_gib(usable)} free on {name} (of {_gib(total)})"


def _host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_estimate_kwargs(config, device, *, transformer_config: dict, vae_config: dict | None = None,
                           text_dim: int = 4096, model_dtype: torch.dtype | None = None) -> dict:
    """`estimate_memory` keyword arguments of an RCGRPOConfig run on `device`."""
    dev = torch.device(device)
    half = (model_dtype in (torch.bfloat16, torch.float16)) if model_dtype is not None else (
        config.mixed_precision == "bf16" and dev.type == "cuda")
    acd = None if config.w_acd == 0 else ("eager" if config.acd_mode == "eager" else "fused")
    acd_backend = config.acd_backend
    if acd_backend == "auto":
        acd_backend = "triton" if dev.type == "cuda" else "cpp"
    train_steps = len(config.train_timestep_indices(config.num_inference_steps))
    return dict(
        transformer_config=dict(transformer_config), vae_config=vae_config, resolution=config.resolution,
        group_size=config.group_size, num_anchors=config.num_anchors, num_steps=config.num_inference_steps,
        train_steps=train_steps, train_step_chunk=config.train_step_chunk, text_len=config.max_sequence_length,
        text_dim=text_dim, lora_rank=config.lora_rank, dtype="bf16" if half else "fp32",
        autocast=config.mixed_precision == "bf16" and dev.type == "cuda",
        gradient_checkpointing=config.gradient_checkpointing, offload_states=config.offload_states,
        acd=acd, acd_layers=config.acd_layers, acd_backend=acd_backend, device_type=dev.type,
        groups=config.groups_per_step * config.gradient_accumulation_steps,
    )


def _architecture(config, pipe) -> tuple[dict, dict | None, int, torch.dtype | None] | None:
    """(transformer config, VAE config, T5 width, model dtype) from the pipeline or the model's config files."""
    if pipe is not None:
        text = getattr(pipe, "text_encoder_2", None)
        text_dim = int(getattr(getattr(text, "config", None), "d_model", 4096) or 4096)
        return (dict(pipe.transformer.config), _vae_init_config(getattr(pipe, "vae", None)), text_dim,
                pipe.transformer.dtype)
    transformer = read_component_config(config.model, "transformer")
    if transformer is None:
        return None
    text = read_component_config(config.model, "text_encoder_2") or {}
    vae = read_component_config(config.model, "vae")
    return transformer, _vae_init_config(vae) if vae else None, int(text.get("d_model", 4096)), None


def _peak(estimate, config) -> tuple[int, str]:
    """(peak bytes, phase) of an estimate, with the VAE decode of one candidate at a time when
    `config.vae_slicing` (the memory model decodes all G finals in one batch)."""
    peaks = dict(estimate.phase_peaks)
    if getattr(config, "vae_slicing", False):
        decode = estimate.term("vae_decode").bytes
        peaks["decode"] -= decode - decode // max(1, config.group_size)
    phase = max(peaks, key=peaks.get)
    return int(peaks[phase]), phase


def _train_flags(change: str) -> str:
    """The dry run's suggestion in `rcgrpo train` flags ("--group 48 (per device)" → "--group-size 48")."""
    return change.replace("--group ", "--group-size ").replace("--anchors ", "--num-anchors ").replace(" (per device)", "")


def check_memory_fits(config, device, pipe=None, *, budget_bytes: int | None = None) -> None:
    """Refuse a training run whose estimated peak memory (`rcgrpo.dryrun.memory.estimate_memory`, the dry
    run's analytic model) exceeds the device's memory, before the trainer is built: ValueError
    "--group-size 96: the estimated peak of 181 GiB (update) exceeds the 80 GiB of cuda:0; try ...".

    The architecture is the loaded `pipe`'s (`pipe.transformer.config`, `pipe.vae.config`), or without
    `pipe` the model directory's config files (so the check can run before the weights are loaded; a
    model whose configs cannot be read that way, e.g. `tiny`, is not checked). Only CUDA devices are
    checked against their memory (free + held by this process; `budget_bytes` overrides it, e.g. in
    tests); `vae_slicing` divides the decode term by G. Suggestions come from `memory_suggestions`
    (which decodes all G at once, so what it says fits does); on a CPU the run is refused only when the estimate exceeds CPU_REFUSE_FACTOR × the total RAM
    (host memory swaps and overcommits; smaller overruns are slow, not impossible). The estimate models
    FLUX.1's geometry (16-pixel tokens, FLUX coefficients); estimates under 2 GiB are not checked.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if budget_bytes is None and dev.type not in ("cuda", "cpu"):
        return
    arch = _architecture(config, pipe)
    if arch is None or config.resolution % 16 or config.resolution < 16:
        return
    transformer_config, vae_config, text_dim, model_dtype = arch
    kwargs = memory_estimate_kwargs(config, dev, transformer_config=transformer_config, vae_config=vae_config,
                                    text_dim=text_dim, model_dtype=model_dtype)
    estimate = estimate_memory(**kwargs)
    peak, phase = _peak(estimate, config)
    if peak < _SMALL_MODEL_BYTES and budget_bytes is None:
        return
    if budget_bytes is not None:
        budget, where = int(budget_bytes), f"the {_gib(budget_bytes)} of {dev}"
    elif dev.type == "cuda":
        budget, where = device_memory_budget(dev)
    else:
        ram = _host_memory_bytes()
        if not ram or peak <= CPU_REFUSE_FACTOR * ram:
            return
        budget, where = ram, f"the {_gib(ram)} of RAM of this machine (cpu)"
    if peak <= budget:
        return
    head = (f"--group-size {config.group_size}: the estimated peak of {_gib(peak)} ({phase}) "
            f"exceeds {where} at --resolution {config.resolution}")
    advice = [dict(a, change=_train_flags(a["change"])) for a in memory_suggestions(kwargs, budget) if a.get("peak_bytes")]
    if advice and advice[-1]["fits"]:
        hint = f"; try {advice[-1]['change']} (estimated at most {_gib(advice[-1]['peak_bytes'])})"
    elif advice:
        hint = (f"; even {advice[-1]['change']} leaves {_gib(advice[-1]['peak_bytes'])}: lower --group-size, "
                "--resolution or --num-anchors")
    else:
        hint = "; lower --group-size, --resolution or --num-anchors"
    raise ValueError(head + hint + " (`rcgrpo dryrun` measures the real peak)")


__all__ = ["CPU_REFUSE_FACTOR", "check_memory_fits", "device_memory_budget", "memory_estimate_kwargs",
           "model_directory", "read_component_config", "vae_scale_factor"]
