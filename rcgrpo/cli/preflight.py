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

from ..dryrun.archs import family_of
from ..dryrun.memory import GIB, estimate_memory, memory_suggestions

# On a GPU, estimates below this many bytes are not worth checking.
_SMALL_MODEL_BYTES = 2 * GIB
# A CPU run's resident memory is its live tensors (the estimate) plus what glibc's allocator keeps: freed
# blocks under its dynamic mmap threshold (up to 32 MiB) stay in the heap. Peak RSS over the estimate,
# measured on `rcgrpo train` steps here: MiniBench (tiny-editor) G = 512 2.1×, `tiny` G = 1024 3.4×
# (1.35× with the allocator tuned as the dry run tunes it). The check uses the lower end, so it refuses
# only runs that cannot fit.
CPU_ALLOCATOR_FACTOR = 2.0


def _gib(value: float) -> str:
    text = f"{value / GIB:.0f}" if value >= 100 * GIB else f"{value / GIB:.1f}".removesuffix(".0")
    return f"{text} GiB"


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
    if cfg and cfg.get("temperal_downsample"):  # AutoencoderKLQwenImage: one spatial halving per level
        return 2 ** len(cfg["temperal_downsample"])
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


def host_memory_available() -> int:
    """Bytes of host memory available to a new allocation without swapping (Linux: /proc/meminfo's
    MemAvailable; elsewhere psutil's `available` when psutil is installed); 0 when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil, or it cannot read this system: unknown
        return 0


def _pipeline_bytes(pipe) -> int:
    """Bytes of the parameters and buffers a loaded pipeline already holds (they are in the estimate)."""
    total = 0
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None or not hasattr(module, "parameters"):
            continue
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu":
                total += t.numel() * t.element_size()
    return total


def cpu_memory_budget(pipe=None) -> tuple[int, str]:
    """(bytes a CPU run can use, how to name them): the memory available now, plus what a loaded `pipe`
    already holds (its weights are counted in the estimate); 0 when unknown."""
    available = host_memory_available()
    if not available:
        return 0, ""
    held = _pipeline_bytes(pipe) if pipe is not None else 0
    return available + held, f"the {_gib(available + held)} of memory available on this machine (cpu)"


def token_pixels(transformer_config: dict, vae_config: dict | None) -> int:
    """Pixels per side of one image token: 2 × the VAE scale factor × the patch size (16 for FLUX.1)."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config and vae_config.get(
        "block_out_channels") else 8
    return 2 * factor * int(transformer_config.get("patch_size", 1) or 1)


def memory_estimate_kwargs(config, device, *, transformer_config: dict, vae_config: dict | None = None,
                           text_dim: int = 4096, model_dtype: torch.dtype | None = None,
                           token_px: int | None = None, source_area: int | None = None,
                           text_encoder_params: int | None = None) -> dict:
    """`estimate_memory` keyword arguments of an RCGRPOConfig run on `device` (`token_px`: pixels per side
    of an image token, by default from the VAE config's depth and the patch size)."""
    dev = torch.device(device)
    half = (model_dtype in (torch.bfloat16, torch.float16)) if model_dtype is not None else (
        config.mixed_precision == "bf16" and dev.type == "cuda")
    acd = None if config.w_acd == 0 else ("eager" if config.acd_mode == "eager" else "fused")
    acd_backend = config.acd_backend
    if acd_backend == "auto":
        acd_backend = "triton" if dev.type == "cuda" else "cpp"
    train_steps = len(config.train_timestep_indices(config.num_inference_steps))
    kwargs = dict(
        transformer_config=dict(transformer_config), vae_config=vae_config, resolution=config.resolution,
        group_size=config.group_size, num_anchors=config.num_anchors, num_steps=config.num_inference_steps,
        train_steps=train_steps, train_step_chunk=config.train_step_chunk, text_len=config.max_sequence_length,
        text_dim=text_dim, lora_rank=config.lora_rank, dtype="bf16" if half else "fp32",
        autocast=config.mixed_precision == "bf16" and dev.type == "cuda",
        gradient_checkpointing=config.gradient_checkpointing, offload_states=config.offload_states,
        acd=acd, acd_layers=config.acd_layers, acd_backend=acd_backend, device_type=dev.type,
        groups=config.groups_per_step * config.gradient_accumulation_steps,
        token_px=token_px or token_pixels(transformer_config, vae_config), vae_slicing=config.vae_slicing,
    )
    if family_of(transformer_config) == "qwen-image-edit":
        source = config.source_resolution or (round(source_area ** 0.5) if source_area else None)
        kwargs.update(family="qwen-image-edit", source_resolution=source, cfg_batch=config.cfg_batch,
                      text_encoder_params=text_encoder_params,
                      true_cfg=config.guidance_scale > 1.0,
                      text_encoder="offloaded" if config.offload_text_encoder else "device")
    return kwargs


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
    """(peak bytes, phase) of an estimate (which counts `config.vae_slicing` itself)."""
    return int(estimate.peak), estimate.peak_phase


def _train_flags(change: str) -> str:
    """The dry run's suggestion in `rcgrpo train` flags ("--group 48 (per device)" → "--group-size 48")."""
    return change.replace("--group ", "--group-size ").replace("--anchors ", "--num-anchors ").replace(" (per device)", "")


def check_memory_fits(config, device, pipe=None, *, budget_bytes: int | None = None,
                      source_area: int | None = None) -> None:
    """Refuse a training run whose estimated peak memory (`rcgrpo.dryrun.memory.estimate_memory`, the dry
    run's analytic model) exceeds the memory of its device, before the trainer is built: ValueError
    "--group-size 96: the estimated peak of 181 GiB (update) exceeds the 80 GiB of cuda:0 (with
    --resolution 1024, --num-inference-steps 28, ...); try ...".

    The architecture is the loaded `pipe`'s (`pipe.transformer.config`, `pipe.vae.config`), or without
    `pipe` the model directory's config files (so the check runs before any weights load; a model whose
    configs cannot be read that way, e.g. the random `tiny` one built in code, is checked once built).
    The budget: on CUDA the device's memory (free + held by this process), estimates under 2 GiB not
    checked; on a CPU the host memory available now (`host_memory_available`, plus the weights of a
    loaded `pipe`, which the estimate counts) against the estimate × CPU_ALLOCATOR_FACTOR (what the
    host allocator keeps besides the live tensors); `budget_bytes` overrides either budget (tests). Image tokens
    are the model's own (2 × VAE scale factor × patch size pixels per side); `vae_slicing` divides the
    decode term by G. Suggestions come from `memory_suggestions` (which decodes all G at once, so what
    it says fits does). Qwen-Image-Edit: the source image's area is `config.source_resolution`², else
    `source_area` (the editor's), else the pipelines' 1024²; the text encoder is the loaded `pipe`'s, else
    Qwen2.5-VL-7B.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if budget_bytes is None and dev.type not in ("cuda", "cpu"):
        return
    arch = _architecture(config, pipe)
    if arch is None or config.resolution % 16 or config.resolution < 16:
        return
    transformer_config, vae_config, text_dim, model_dtype = arch
    try:
        family_of(transformer_config)
    except ValueError:  # a transformer class the memory model does not know: nothing to check against
        return
    text_encoder = getattr(pipe, "text_encoder", None) if pipe is not None else None
    kwargs = memory_estimate_kwargs(
        config, dev, transformer_config=transformer_config, vae_config=vae_config, text_dim=text_dim,
        model_dtype=model_dtype, source_area=source_area,
        text_encoder_params=sum(p.numel() for p in text_encoder.parameters()) if text_encoder is not None else None)
    if config.resolution % kwargs["token_px"]:
        return
    estimate = estimate_memory(**kwargs)
    peak, phase = _peak(estimate, config)
    scale = CPU_ALLOCATOR_FACTOR if dev.type == "cpu" else 1.0
    if budget_bytes is not None:
        budget, where = int(budget_bytes), f"the {_gib(budget_bytes)} of {dev}"
    elif dev.type == "cuda":
        if peak < _SMALL_MODEL_BYTES:
            return
        budget, where = device_memory_budget(dev)
    else:
        budget, where = cpu_memory_budget(pipe)
        if not budget:
            return
    if peak * scale <= budget:
        return
    shown = f"{_gib(peak * scale)} ({phase}" + (f"; {_gib(peak)} of tensors × {scale:g} for the host allocator)"
                                                  if scale != 1 else ")")
    head = (f"--group-size {config.group_size}: the estimated peak of {shown} exceeds {where} "
            f"(with {_driving_options(config)})")
    advice = [dict(a, change=_train_flags(a["change"]))
              for a in memory_suggestions(kwargs, int(budget / scale)) if a.get("peak_bytes")]
    if advice and advice[-1]["fits"]:
        hint = f"; try {advice[-1]['change']} (estimated at most {_gib(advice[-1]['peak_bytes'] * scale)})"
    elif advice:
        hint = (f"; even {advice[-1]['change']} leaves {_gib(advice[-1]['peak_bytes'] * scale)}: lower "
                "--group-size, --resolution or --num-anchors")
    else:
        hint = "; lower --group-size, --resolution or --num-anchors"
    raise ValueError(head + hint + " (`rcgrpo dryrun` measures the real peak)")


def _driving_options(config) -> str:
    """The other options the estimate grows with, as flags with their values."""
    parts = [f"--resolution {config.resolution}", f"--num-inference-steps {config.num_inference_steps}",
             f"--num-anchors {config.num_anchors}", f"--train-step-chunk {config.train_step_chunk}",
             f"--max-sequence-length {config.max_sequence_length}"]
    if config.groups_per_step > 1:
        parts.append(f"--groups-per-step {config.groups_per_step}")
    if config.gradient_accumulation_steps > 1:
        parts.append(f"--gradient-accumulation-steps {config.gradient_accumulation_steps}")
    return ", ".join(parts)


__all__ = ["CPU_ALLOCATOR_FACTOR", "check_memory_fits", "cpu_memory_budget", "device_memory_budget", "host_memory_available",
           "memory_estimate_kwargs", "model_directory", "read_component_config", "token_pixels", "vae_scale_factor"]
