"""`rcgrpo dryrun`: one full RC-GRPO iteration of a full-size editor with random weights.

The real architectures (FLUX.1-Kontext-dev: `FluxTransformer2DModel` + `AutoencoderKL`; Qwen-Image-Edit:
`QwenImageTransformer2DModel` + `AutoencoderKLQwenImage`) are built from the configs in `archs` (no
download), their parameters created directly on the target device in the target dtype (no fp32 host
copy), the pipeline wrapped in its family's Editor, and random prompt embeddings of the real shapes stand
in for the text encoders (FLUX: T5 512 × 4096 and pooled 768; Qwen: the vision-language template's
tokens × 3584, and the negative prompt's for true CFG). Then ONE iteration of the trainer's own code
path runs (`RCGRPOTrainer.train_step` on the synthetic square task at the requested resolution, with
the built-in redness reward). The trainer marks its phases itself (`rcgrpo.train.phases`); a
`PhaseTracker` listens to them, and forward hooks add the transformer and VAE-encoder sub-phases:

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

For a Qwen-Image-Edit architecture the report adds a "full model" estimate: all 60 blocks plus the
7B text encoder's weights on the GPU (as a pipeline moved to the device has them) unless
--offload-text-encoder; when it does not fit one H100, the options that make it fit are listed.

Caveats: on the CPU, glibc's mmap threshold stays at 256 KiB for the rest of the process, and the
measured peaks are RSS (including allocator slack) above the RSS before the model was built. One
iteration is the first one: AdamW's moments do not exist yet during it, while the model counts
them (steady state; 2·4 B per LoRA parameter, small).

    rcgrpo dryrun --arch flux-kontext-dev --resolution 1024 --group 12 --anchors 4 --steps 28 \\
        --train-steps 8 --gradient-checkpointing --offload-states --train-step-chunk 2 --json dry.json
    rcgrpo dryrun --depth-scale 0.06 --resolution 256 --group 3 --anchors 2 --steps 2 --train-steps 1
    rcgrpo dryrun --arch qwen-image-edit --resolution 512 --gradient-checkpointing --train-step-chunk 1
"""
from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
import warnings

import torch

from .archs import ARCHS, area_size, block_counts, build_pipeline, param_bytes, qwen_text_tokens, \
    scaled_transformer_config
from .measure import DERIVED_PHASES, PHASES, TOP_PHASES, PhaseTracker, trim_host_heap, tune_host_allocator, module_timers
from .memory import REFERENCE_GPUS, estimate_memory, memory_suggestions
from .report import gib
from .settings import DryRunSettings

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
    kwargs = dict(
        transformer_config=transformer_config, vae_config=spec["vae"], resolution=s.resolution, group_size=s.group,
        num_anchors=s.anchors, num_steps=s.steps, train_steps=s.train_steps, train_step_chunk=s.train_step_chunk,
        text_len=s.effective_text_len(), text_dim=spec["text_dim"], lora_rank=s.lora_rank, dtype=s.dtype,
        autocast=s.dtype == "bf16" and device.type == "cuda", gradient_checkpointing=s.gradient_checkpointing,
        offload_states=s.offload_states, acd=("eager" if s.attention == "eager" else "fused") if s.acd else None,
        groups=s.groups,
        acd_layers=10, acd_backend=acd_backend, device_type=device.type,
    )
    if s.vae_slicing:  # left out otherwise: the FLUX estimate's arguments stay as they were
        kwargs["vae_slicing"] = True
    if spec["family"] == "qwen-image-edit":  # the dry run builds no text encoder: text_encoder None
        kwargs.update(family="qwen-image-edit", arch=s.arch, source_resolution=s.source_resolution,
                      cfg_batch=s.cfg_batch)
    return kwargs


def _full_model_kwargs(s: DryRunSettings, est_kwargs: dict) -> dict | None:
    """The estimate's arguments for the real run on one GPU: every block, CUDA's semantics (bf16 weights
    under bf16 autocast, as `rcgrpo train` loads a model on a GPU; Triton ACD; states offloadable) and, for
    Qwen-Image-Edit, the text encoder's weights (on the GPU unless --offload-text-encoder). None when that
    is the dry run's own estimate."""
    changes = {}
    if s.depth_scale < 1:
        changes["transformer_config"] = scaled_transformer_config(s.arch, 1.0)
    gpu = dict(device_type="cuda", dtype="bf16", autocast=True, acd_backend="triton")
    if any(est_kwargs.get(k) != v for k, v in gpu.items()):
        changes.update(gpu)
    if ARCHS[s.arch]["family"] == "qwen-image-edit":
        changes["text_encoder"] = "offloaded" if s.offload_text_encoder else "device"
    return (est_kwargs | changes) if changes else None


def _qwen_text_conditions(s: DryRunSettings, editor, instruction: str, text_len: int, gen, device, dtype):
    """Random `QwenTextConditions` of the real shapes: the template's N_txt tokens (the instruction's
    `text_len` tokens just before the 5 closing ones get the ACD weights) and the negative prompt's N_neg."""
    from ..editors.qwen_image_edit import QwenTextConditions

    spec = ARCHS[s.arch]
    area = editor.source_area
    n_txt, n_neg = qwen_text_tokens(s.arch, text_len, source_area=area)
    weights = torch.zeros(n_txt)
    weights[n_txt - 5 - text_len: n_txt - 5] = 1.0
    embeds = torch.randn(1, n_txt, spec["text_dim"], generator=gen).to(device=device, dtype=dtype)
    negative = torch.randn(1, n_neg, spec["text_dim"], generator=gen).to(device=device, dtype=dtype)
    return QwenTextConditions(prompt_embeds=embeds, negative_embeds=negative, acd_weights=weights,
                              instruction=instruction, negative_prompt=editor.defaults.negative_prompt,
                              vl_size=area_size(spec["vl_area"] or area))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _h100_advice(full_estimate, kwargs: dict) -> dict | None:
    """The options that make the real run fit one H100 (`memory_suggestions`), None when it fits already."""
    name = next(iter(REFERENCE_GPUS))
    budget = REFERENCE_GPUS[name]
    if full_estimate.peak <= budget:
        return None
    return {"gpu": name, "budget_bytes": budget, "suggestions": memory_suggestions(kwargs, budget)}


def _full_note(full_estimate, full_kwargs: dict | None) -> dict:
    return {"estimate": full_estimate.to_dict(),
            "fits": {name: full_estimate.peak <= size for name, size in REFERENCE_GPUS.items()},
            "text_encoder": (full_kwargs or {}).get("text_encoder")}


def estimate_only(s: DryRunSettings) -> dict:
    """The memory model of the settings without building anything (`rcgrpo dryrun --estimate-only`): the
    estimate on this machine's device, the real run's on one GPU, and the options that make it fit an H100."""
    s.validate()
    device = s.torch_device()
    from rcgrpo_kernels import resolve_backend

    est_kwargs = _estimate_kwargs(s, scaled_transformer_config(s.arch, s.depth_scale), device,
                                  resolve_backend("auto", device, "acd_attention"))
    estimate = estimate_memory(**est_kwargs)
    full_kwargs = _full_model_kwargs(s, est_kwargs)
    full_estimate = estimate if full_kwargs is None else estimate_memory(**full_kwargs)
    return {"command": "rcgrpo dryrun --estimate-only", "settings": dataclasses.asdict(s),
            "memory": {"estimate": estimate.to_dict(),
                       "full_depth": None if full_kwargs is None else _full_note(full_estimate, full_kwargs),
                       "h100_advice": _h100_advice(full_estimate, full_kwargs or est_kwargs)}}


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
    full_kwargs = _full_model_kwargs(s, est_kwargs)
    full_estimate = estimate if full_kwargs is None else estimate_memory(**full_kwargs)
    info = _device_info(device)
    budget = info["total_memory_bytes"] if device.type == "cuda" else (info.get("available_memory_bytes") or
                                                                        info["total_memory_bytes"])
    if budget and estimate.peak > budget:
        advice = memory_suggestions(est_kwargs, budget)
        sized = [a for a in advice if a.get("peak_bytes")]
        hint = ""
        if sized and sized[-1]["fits"]:
            hint = f"; try {sized[-1]['change']} (estimated {gib(sized[-1]['peak_bytes'])})"
        elif sized:
            hint = (f"; even {sized[-1]['change']} leaves {gib(sized[-1]['peak_bytes'])}: "
                    "lower --depth-scale or --resolution")
        message = (f"estimated peak {gib(estimate.peak)} ({estimate.peak_phase}) exceeds the "
                   f"{'GPU' if device.type == 'cuda' else 'available host'} memory {gib(budget)} for "
                   f"--resolution {s.resolution} --group {s.group} --depth-scale {s.depth_scale:g}{hint}")
        if not s.force:
            raise ValueError(message + " (or pass --force to run anyway)")
        warnings.warn(message)

    n_double, n_single = block_counts(tcfg)
    qwen = spec["family"] == "qwen-image-edit"
    acd_layers = min(10, n_double + n_single)
    text_len = s.effective_text_len()
    from ..data.synthetic import SquareDataset, redness_reward
    from ..editors.loading import editor_for_pipeline
    from ..train.config import RCGRPOConfig
    from ..train.trainer import RCGRPOTrainer

    tracker = PhaseTracker(device)
    allocator_tuned = False
    if device.type == "cpu":
        allocator_tuned = tune_host_allocator()
        import gc

        gc.collect()
        trim_host_heap()
    baseline = tracker.current_memory()

    t0 = time.perf_counter()
    pipe = build_pipeline(s.arch, tcfg, device=device, dtype=dtype, seed=s.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    built = {"transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
             "transformer_param_bytes": param_bytes(pipe.transformer),
             "vae_params": sum(p.numel() for p in pipe.vae.parameters()),
             "vae_param_bytes": param_bytes(pipe.vae)}
    log(f"built {s.arch} ({n_double} double + {n_single} single blocks, "
        f"{built['transformer_params'] / 1e9:.2f} B params) on {device} in {build_s:.1f} s")

    tmp = tempfile.TemporaryDirectory(prefix="rcgrpo-dryrun-")
    config = RCGRPOConfig(
        model="random", resolution=s.resolution, max_sequence_length=text_len, group_size=s.group,
        groups_per_step=s.groups, num_inference_steps=s.steps, num_anchors=s.anchors, train_timesteps=str(s.train_steps),
        train_step_chunk=s.train_step_chunk, reward_funcs=["redness"], w_acd=0.5 if s.acd else 0.0,
        acd_layers=acd_layers, acd_mode="eager" if s.attention == "eager" else "auto", acd_text_tokens="all",
        lora_rank=s.lora_rank, guidance_scale=spec.get("guidance_scale", 2.5), source_resolution=s.source_resolution,
        cfg_batch=s.cfg_batch,
        lora_alpha=float(s.lora_rank),
        mixed_precision="bf16" if (s.dtype == "bf16" and device.type == "cuda") else "no",
        gradient_checkpointing=s.gradient_checkpointing, offload_states=s.offload_states, vae_slicing=s.vae_slicing,
        max_steps=1, seed=s.seed,
        output_dir=tmp.name, checkpoint_every=0, report_to="none", train_size=s.groups, eval_size=0,
        device="cuda" if device.type == "cuda" else "cpu",
    )
    t1 = time.perf_counter()
    dataset = SquareDataset(s.groups, size=s.resolution, seed=s.seed)
    # The family's Editor; the trainer applies the run's editor options (source area, CFG batching) to it.
    trainer = RCGRPOTrainer(editor_for_pipeline(pipe), config, [("redness", redness_reward)], dataset)
    gen = torch.Generator().manual_seed(s.seed + 1)
    for example in dataset.examples:
        if qwen:
            text = _qwen_text_conditions(s, trainer.editor, example.instruction, text_len, gen, device, dtype)
        else:
            embeds = torch.randn(1, text_len, spec["text_dim"], generator=gen).to(device=device, dtype=dtype)
            pooled = torch.randn(1, spec["pooled_dim"], generator=gen).to(device=device, dtype=dtype)
            text = trainer.editor.text_conditions(embeds, pooled)
        trainer.set_text_conditions(example.instruction, text)
    trainer.phases.add_listener(tracker)
    setup_s = time.perf_counter() - t1
    built["lora_params"] = sum(p.numel() for p in trainer.lora_parameters)

    log(f"running one iteration: {s.group} candidates x {s.steps} steps at {s.resolution}x{s.resolution} px, "
        f"update on {s.anchors} anchors x {s.train_steps} train steps")
    metrics, error, caught = None, None, []
    tracker.enter("iteration")
    start = time.perf_counter()
    try:
        with module_timers(tracker, trainer.transformer, pipe.vae), warnings.catch_warnings(record=True) as caught:
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
        s, device, info, tcfg, tracker, estimate, full_estimate, est_kwargs, full_kwargs, budget, baseline, built,
        build_s, setup_s,
        iteration_s, metrics, error, [str(w.message) for w in caught][:10], acd_backend, distance_backend,
        allocator_tuned, acd_layers,
    )
    return report


def _assemble_report(s, device, info, tcfg, tracker, estimate, full_estimate, est_kwargs, full_kwargs, budget,
                     baseline, built, build_s, setup_s, iteration_s, metrics, error, warns, acd_backend, distance_backend,
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
    full_note = None if full_estimate is estimate else _full_note(full_estimate, full_kwargs)
    h100_advice = _h100_advice(full_estimate, full_kwargs or est_kwargs)
    share = lambda key: (times.get(key, 0.0) / total) if total > 0 else 0.0  # noqa: E731
    return {
        "command": "rcgrpo dryrun",
        "settings": dataclasses.asdict(s),
        "config": {
            "arch": s.arch, "description": ARCHS[s.arch]["description"], "transformer": tcfg,
            "depth": dict(zip(("double", "single"), block_counts(tcfg)))
            | dict(zip(("double_full", "single_full"), block_counts(ARCHS[s.arch]["transformer"]))),
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
            "h100_advice": h100_advice,
        },
        "metrics": None if metrics is None else {k: metrics.get(k) for k in (
            "loss", "reward_mean", "acd_mean", "grad_norm", "clip_fraction", "skipped_update")},
        "error": error,
        "warnings": warns,
    }


__all__ = ["DryRunSettings", "dry_run", "estimate_only"]
