"""Global perturbation vs RDP on one example, side by side: the job of `rcgrpo edit`.

For one source image, mask and instruction, a group is rolled out from the same ε* twice — with Neighbor
GRPO's global perturbation (α_edit = α_base = σ, σ = α_edit unless given) and with RDP — and every
candidate is compared with the reference candidate 0: its RMS change inside the mask, its background
drift outside it (pixels and final latents), and its ACD reward over the instruction's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.synthetic import EditExample
from ..method.rdp import region_decoupled_noise
from .acd import attach_acd, detach_acd
from .base import Editor
from .latents import background_drift


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
    editor: Editor,
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
    negative_prompt: str | None = None,
    acd_layers: int = 10,
    acd_backend: str = "auto",
    acd_text_tokens: str = "prompt",
) -> tuple[list[CandidateReport], dict[str, torch.Tensor]]:
    """Roll out both schemes; returns per-candidate reports and `{scheme: images [G, 3, H, W]}`.
    ACD counts the instruction's own tokens (`acd_text_tokens="prompt"`) or every text position ("all")."""
    _, height, width = example.image.shape
    token_mask = editor.token_mask(example.mask, height, width, name=example.example_id)
    n_img, channels = editor.latent_shape(height, width)
    latent_mask = token_mask[:, None].expand(n_img, channels)
    device, dtype = editor.device, editor.dtype
    source = example.image[None].to(device=device, dtype=dtype)
    text = editor.encode_text(example.instruction, source, max_sequence_length=max_sequence_length,
                              acd_text_tokens=acd_text_tokens, negative_prompt=negative_prompt)
    recorder = attach_acd(editor.transformer, last_k=min(acd_layers, len(editor.attention_modules())),
                          backend=acd_backend)
    reports: list[CandidateReport] = []
    images: dict[str, torch.Tensor] = {}
    try:
        for scheme, (a_edit, a_base) in perturbation_schemes(alpha_edit, alpha_base, global_sigma).items():
            gen = torch.Generator().manual_seed(seed)
            noises = region_decoupled_noise((n_img, channels), latent_mask, group_size=group_size,
                                            alpha_edit=a_edit, alpha_base=a_base, generator=gen)
            with recorder.capture(token_mask.to(device), text_weights=text.acd_weights) as cap:
                result = editor.rollout(source, example.instruction, noises.to(device=device, dtype=dtype),
                                        num_steps=num_steps, guidance_scale=guidance_scale, height=height,
                                        width=width, max_sequence_length=max_sequence_length, text=text)
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
        detach_acd(editor.transformer)
    return reports, images


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


__all__ = ["CandidateReport", "edit_group", "format_report", "perturbation_schemes", "region_rms"]
