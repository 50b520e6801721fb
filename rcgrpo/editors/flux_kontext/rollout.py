"""Deterministic Euler ODE rollouts of a stock FluxKontextPipeline (SPEC §4).

    x_{j+1} = x_j + (t_{j+1} − t_j) · v_θ(x_j, t_j, c),   j = 0..T−1,   x_0 = ε^(i) (t_0 = 1), t_T = 0

The pipeline itself runs the loop (its prompt and image encoding, its FlowMatchEulerDiscreteScheduler
with the resolution shift): we pass the group's noises as `latents`, record every state with
`callback_on_step_end`, and capture the transformer's conditioning inputs with a forward pre-hook so
the trainer can recompute one-step predictions `v_θ(x_j, t_j, c)` with gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ...method.masks import token_grid
from ..base import RolloutResult


@dataclass
class Conditioning:
    """The transformer inputs that do not depend on the latent state (batch 1, expanded on use)."""

    prompt_embeds: torch.Tensor  # [1, N_txt, C_txt]
    pooled_prompt_embeds: torch.Tensor  # [1, C_pool]
    text_ids: torch.Tensor  # [N_txt, 3]
    image_ids: torch.Tensor  # [N_img + N_ctx, 3] (target then context)
    context_latents: torch.Tensor | None  # [1, N_ctx, C] packed context image, None without an image
    guidance: torch.Tensor | None  # [1] guidance scale, None for models without guidance embedding

    @property
    def text_len(self) -> int:
        return self.prompt_embeds.shape[1]

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t):
            if t is None:
                return None
            if t.is_floating_point() and dtype is not None:
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return replace(
            self,
            prompt_embeds=move(self.prompt_embeds),
            pooled_prompt_embeds=move(self.pooled_prompt_embeds),
            context_latents=move(self.context_latents),
            guidance=None if self.guidance is None else self.guidance.to(device=device),
            text_ids=self.text_ids.to(device=device),
            image_ids=self.image_ids.to(device=device),
        )


def latent_shape(pipe, height: int, width: int) -> tuple[int, int]:
    """`(N_img, C)` of the packed target latents of an `height`×`width` edit."""
    rows, cols = token_grid(height, width, pipe.vae_scale_factor)
    return rows * cols, pipe.transformer.config.in_channels


@torch.no_grad()
def rollout(
    pipe,
    image,
    prompt: str,
    noises: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    max_sequence_length: int = 512,
    decode: bool = True,
    prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    joint_attention_kwargs: dict | None = None,
) -> RolloutResult:
    """Roll out G candidates from `noises` `[G, N_img, C]` with the pipeline's own Euler loop.

    `image` is the source image (PIL, or a `[1, 3, H, W]` tensor in [0, 1]); `prompt` the instruction.
    Pass `prompt_embeds`/`pooled_prompt_embeds` (batch 1) to skip the text encoders (caching).
    """
    n_img, channels = latent_shape(pipe, height, width)
    if noises.dim() != 3 or tuple(noises.shape[1:]) != (n_img, channels):
        raise ValueError(
            f"noises must have shape [G, N_img, C] = [G, {n_img}, {channels}] for a {height}x{width} edit, "
            f"got {tuple(noises.shape)}"
        )
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int ≥ 1, got {num_steps!r}")
    group = noises.shape[0]
    states: list[torch.Tensor] = [noises.detach().clone()]
    captured: dict = {}

    def record_inputs(module, args, kwargs):
        if not captured:
            hidden = kwargs["hidden_states"]
            captured.update(
                prompt_embeds=kwargs["encoder_hidden_states"][:1].detach().clone(),
                pooled_prompt_embeds=kwargs["pooled_projections"][:1].detach().clone(),
                text_ids=kwargs["txt_ids"].detach().clone(),
                image_ids=kwargs["img_ids"].detach().clone(),
                context_latents=hidden[:1, n_img:].detach().clone() if hidden.shape[1] > n_img else None,
                guidance=None if kwargs.get("guidance") is None else kwargs["guidance"][:1].detach().clone(),
            )

    def record_state(_pipe, _step, _timestep, tensors):
        states.append(tensors["latents"].detach().clone())
        return {}

    call_kwargs = dict(prompt=prompt)
    if prompt_embeds is not None:
        call_kwargs = dict(
            prompt=None,
            prompt_embeds=prompt_embeds.expand(group, -1, -1) if prompt_embeds.shape[0] == 1 else prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds.expand(group, -1)
            if pooled_prompt_embeds.shape[0] == 1 else pooled_prompt_embeds,
        )
        group_per_prompt = 1
    else:
        group_per_prompt = group
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] == 1 and prompt_embeds is not None:
        image = image.expand(group, -1, -1, -1)
    hook = pipe.transformer.register_forward_pre_hook(record_inputs, with_kwargs=True)
    try:
        out = pipe(
            image=image,
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=group_per_prompt,
            latents=noises,
            output_type="pt" if decode else "latent",
            max_area=height * width,
            _auto_resize=False,
            max_sequence_length=max_sequence_length,
            callback_on_step_end=record_state,
            callback_on_step_end_tensor_inputs=["latents"],
            joint_attention_kwargs=joint_attention_kwargs,
            **call_kwargs,
        )
    finally:
        hook.remove()
    if len(states) != num_steps + 1:
        raise RuntimeError(f"rollout recorded {len(states) - 1} steps, expected {num_steps}")
    scheduler = pipe.scheduler
    images = out.images if decode else None
    if images is not None and not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    return RolloutResult(
        states=torch.stack(states, dim=1),
        sigmas=scheduler.sigmas.detach().to(torch.float32).cpu().clone(),
        timesteps=scheduler.timesteps.detach().cpu().clone(),
        images=images,
        conditioning=Conditioning(**captured),
        height=height,
        width=width,
    )


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [0, 1] from packed latents `[B, N_img, C]`, exactly as the pipeline's
    own `output_type="pt"` decode (unpack, undo the VAE scaling and shift, decode, postprocess)."""
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")


def predict_velocity(transformer, cond: Conditioning, latents: torch.Tensor, timestep: torch.Tensor,
                     joint_attention_kwargs: dict | None = None) -> torch.Tensor:
    """v_θ(x, t, c) `[B, N_img, C]` for latents `[B, N_img, C]` at scheduler timesteps `[B]` (sigma·1000).

    Feeds the transformer exactly as FluxKontextPipeline does (target tokens first, then context).
    """
    batch, n_img = latents.shape[:2]
    hidden = latents
    if cond.context_latents is not None:
        hidden = torch.cat([latents, cond.context_latents.to(latents.dtype).expand(batch, -1, -1)], dim=1)
    guidance = None if cond.guidance is None else cond.guidance.expand(batch)
    pred = transformer(
        hidden_states=hidden,
        timestep=timestep.to(latents.dtype) / 1000,
        guidance=guidance,
        pooled_projections=cond.pooled_prompt_embeds.expand(batch, -1),
        encoder_hidden_states=cond.prompt_embeds.expand(batch, -1, -1),
        txt_ids=cond.text_ids,
        img_ids=cond.image_ids,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )[0]
    return pred[:, :n_img]
