"""`rcgrpo edit`: a real RDP edit with a Kontext pipeline, global perturbation vs RDP side by side.

For one source image, mask and instruction it rolls out a group from the same ε* twice — once with
Neighbor GRPO's global perturbation (α_edit = α_base = σ), once with RDP — and reports per
candidate how much the edit region changed and how much the background drifted relative to the
reference candidate (index 0), plus its ACD reward. Candidate images are saved.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ..data.synthetic import EditExample, square_example
from ..flux.rollout import background_drift, latent_shape, rollout
from ..flux.text import acd_text_weights
from ..io.files import atomic_write_text
from ..io.images import image_grid, load_image, load_mask, save_image
from ..method.masks import token_mask_for_image
from ..method.rdp import region_decoupled_noise
from .parsing import parse
from .validation import check_output_dir


def _opt(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class CandidateReport:
    scheme: str
    index: int
    edit_change: float  # RMS pixel change vs the reference candidate inside the mask
    background_drift: float  # RMS pixel change vs the reference candidate outside the mask
    latent_background_drift: float  # mean squared final-latent difference outside the mask
    acd: float  # R_acd of the candidate (mean over the recorded layers and steps)


def perturbation_schemes(alpha_edit: float, alpha_base: float, global_sigma: float | None = None
                         ) -> dict[str, tuple[float, float]]:
    """{name: (α_edit, α_base)} for the side-by-side comparison; the global σ defaults to α_edit, so
    both schemes perturb the edit region equally (SPEC §3)."""
    sigma = alpha_edit if global_sigma is None else global_sigma
    return {"global": (sigma, sigma), "rdp": (alpha_edit, alpha_base)}


def region_rms(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> float:
    """sqrt(Σ w (a − b)² / (C·Σ w)) for images `[C, H, W]` and a pixel weight `[H, W]`."""
    sq = (a.float() - b.float()).square().sum(0)
    return float((sq * weight).sum() / (a.shape[0] * weight.sum()).clamp_min(1e-12)) ** 0.5


def edit_group(
    pipe,
    example: EditExample,
    *,
    group_size: int = 4,
    num_steps: int = 4,
    guidance_scale: float = 2.5,
    alpha_edit: float = 0.3,
    alpha_base: float = 0.02,
    global_sigma: float | None = None,
    seed: int = 0,
    max_sequence_length: int = 512,
    acd_layers: int = 10,
    acd_backend: str = "auto",
    acd_text_tokens: str = "prompt",
) -> tuple[list[CandidateReport], dict[str, torch.Tensor]]:
    """Roll out both schemes; returns per-candidate reports and `{scheme: images [G, 3, H, W]}`.
    ACD counts the instruction's real T5 tokens (`acd_text_tokens="prompt"`) or every position ("all")."""
    _, height, width = example.image.shape
    token_mask = token_mask_for_image(example.mask, height, width, pipe.vae_scale_factor, name=example.example_id)
    n_img, channels = latent_shape(pipe, height, width)
    latent_mask = token_mask[:, None].expand(n_img, channels)
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    text_weights = acd_text_weights(pipe, example.instruction, max_sequence_length, acd_text_tokens)
    recorder = _attach_acd(pipe, acd_layers, acd_backend)
    reports: list[CandidateReport] = []
    images: dict[str, torch.Tensor] = {}
    try:
        for scheme, (a_edit, a_base) in perturbation_schemes(alpha_edit, alpha_base, global_sigma).items():
            gen = torch.Generator().manual_seed(seed)
            noises = region_decoupled_noise((n_img, channels), latent_mask, group_size=group_size,
                                            alpha_edit=a_edit, alpha_base=a_base, generator=gen)
            source = example.image[None].to(device=device, dtype=dtype)
            with recorder.capture(token_mask.to(device), text_weights=text_weights) as cap:
                result = rollout(pipe, source, example.instruction, noises.to(device=device, dtype=dtype),
                                 num_steps=num_steps, guidance_scale=guidance_scale, height=height,
                                 width=width, max_sequence_length=max_sequence_length)
            acd_values = cap.reward().float().cpu()
            imgs = result.images.float().cpu()
            images[scheme] = imgs
            latent_drift = background_drift(result.states[:, -1], token_mask).cpu()
            for i in range(group_size):
                reports.append(CandidateReport(
                    scheme=scheme,
                    index=i,
                    edit_change=region_rms(imgs[i], imgs[0], example.mask),
                    background_drift=region_rms(imgs[i], imgs[0], 1.0 - example.mask),
                    latent_background_drift=float(latent_drift[i]),
                    acd=float(acd_values[i]),
                ))
    finally:
        from ..flux.attention import detach_acd

        detach_acd(pipe.transformer)
    return reports, images


def _attach_acd(pipe, last_k: int, backend: str):
    from ..flux.attention import attach_acd, attention_modules

    last_k = min(last_k, len(attention_modules(pipe.transformer)))  # the tiny model has only 4 layers
    return attach_acd(pipe.transformer, last_k=last_k, backend=backend)


def format_report(reports: list[CandidateReport]) -> str:
    """The side-by-side table printed by `rcgrpo edit`."""
    by_scheme: dict[str, list[CandidateReport]] = {}
    for r in reports:
        by_scheme.setdefault(r.scheme, []).append(r)
    schemes = list(by_scheme)
    header = "cand | " + " | ".join(f"{s:>6s} edit Δ  bg drift   ACD" for s in schemes)
    lines = [header, "-" * len(header)]
    for i in range(len(by_scheme[schemes[0]])):
        cells = []
        for s in schemes:
            r = by_scheme[s][i]
            cells.append(f"     {r.edit_change:8.4f} {r.background_drift:8.4f} {r.acd:6.3f}")
        tag = f"{i:>4d}" + ("*" if i == 0 else " ")
        lines.append(tag + "| " + " | ".join(cells))
    lines.append("-" * len(header))
    for s in schemes:
        rs = [r for r in by_scheme[s] if r.index > 0]
        edit = sum(r.edit_change for r in rs) / len(rs)
        drift = sum(r.background_drift for r in rs) / len(rs)
        lines.append(f"{s:>6s}: mean edit change {edit:.4f}, mean background drift {drift:.4f}, "
                     f"drift/edit {drift / max(edit, 1e-12):.3f}")
    lines.append("(* = reference candidate ε*, unperturbed; changes are RMS pixel differences to it)")
    return "\n".join(lines)


@dataclass
class EditArguments:
    """Options of `rcgrpo edit`."""

    image: Optional[str] = _opt(None, "source image file (default: a built-in generated example)")
    mask: Optional[str] = _opt(None, "edit mask file, same size as the image (white = edit region)")
    prompt: Optional[str] = _opt(None, "edit instruction")
    model: str = _opt("tiny", "tiny | tiny-editor | a local FLUX.1-Kontext directory | a hub id")
    lora: Optional[str] = _opt(None, "directory with pytorch_lora_weights.safetensors to load")
    output_dir: str = _opt("runs/edit", "where candidate images and report.json go")
    group_size: int = _opt(4, "G: candidates per scheme (candidate 0 is the unperturbed reference)")
    steps: Optional[int] = _opt(None, "Euler steps (default: the model's, e.g. 4 for tiny, 28 for FLUX.1-Kontext)")
    guidance_scale: Optional[float] = _opt(None, "Kontext guidance (default: the model's, 2.5)")
    alpha_edit: float = _opt(0.3, "RDP α_edit inside the mask")
    alpha_base: float = _opt(0.02, "RDP α_base in the background")
    global_sigma: Optional[float] = _opt(None, "σ of the global-perturbation baseline (default: alpha_edit)")
    acd_text_tokens: Literal["prompt", "all"] = _opt("prompt", "ACD text queries: the instruction's tokens or every "
                                                               "padded T5 position")
    seed: int = _opt(0, "seed of ε* and the perturbations")
    device: Optional[str] = _opt(None, "cpu or cuda (default: cuda when available)")

    def validate(self) -> None:
        if (self.image is None) != (self.mask is None):
            raise ValueError("--image and --mask must be given together")
        if self.group_size < 2:
            raise ValueError(f"--group-size: expected an int ≥ 2 (the reference and a perturbed candidate), "
                             f"got {self.group_size}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps: expected an int ≥ 1, got {self.steps}")
        for name in ("alpha_edit", "alpha_base", "global_sigma"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')}: expected a value in [0, 1], got {value}")
        check_output_dir(self.output_dir, "--output-dir")


def main(argv: list[str], prog: str = "rcgrpo edit") -> int:
    args = parse((EditArguments,), argv, prog, description=__doc__.splitlines()[0])
    args.validate()
    return run_edit(args)


def run_edit(args: EditArguments) -> int:
    from ..flux.pipeline import load_pipeline

    if args.image:  # read the inputs before the model
        image = load_image(args.image, name="--image")
        mask = load_mask(args.mask, name="--mask")
    pipe, defaults = load_pipeline(args.model, device=args.device)
    if args.lora:
        from ..flux.pipeline import load_lora

        load_lora(pipe, args.lora)
    if args.image:
        example = EditExample(image=image, mask=mask, instruction=args.prompt or "edit the masked region",
                              example_id=Path(args.image).stem)
    else:
        example = square_example(args.seed, min(defaults.resolution, 512))
        if args.prompt:
            example.instruction = args.prompt
    steps = args.steps or defaults.num_inference_steps
    start = time.perf_counter()
    reports, images = edit_group(
        pipe, example, group_size=args.group_size, num_steps=steps,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults.guidance_scale,
        alpha_edit=args.alpha_edit, alpha_base=args.alpha_base, global_sigma=args.global_sigma, seed=args.seed,
        max_sequence_length=defaults.max_sequence_length, acd_text_tokens=args.acd_text_tokens,
    )
    elapsed = time.perf_counter() - start
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_image(example.image, out / "source.png")
    save_image(example.mask[None].expand(3, -1, -1), out / "mask.png")
    for scheme, imgs in images.items():
        for i, img in enumerate(imgs):
            save_image(img, out / scheme / f"candidate_{i:02d}.png")
        save_image(image_grid([example.image, *imgs], columns=len(imgs) + 1), out / f"{scheme}_grid.png")
    report = {"instruction": example.instruction, "steps": steps, "seconds": elapsed,
              "candidates": [asdict(r) for r in reports]}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    print(f'edit "{example.instruction}" ({example.image.shape[2]}x{example.image.shape[1]} px, '
          f"{args.group_size} candidates, {steps} steps, {elapsed:.2f} s)")
    print(format_report(reports))
    print(f"images written to {out}/")
    return 0
