"""Deterministic Euler rollouts of Qwen-Image-Edit (SPEC §4), our own loop over the stock pipeline's parts.

    x_{j+1} = scheduler.step(v(x_j, t_j), t_j, x_j),   x_0 = ε (σ_0 = 1),   j = 0..T−1

The stock `__call__` cannot run a training rollout: it resizes the source to about 1024² px whatever the
edit size. This loop does what `__call__` does, step for step, with the source area as an option: the
same prompt embeddings (`text.encode_text`), the same source latents (`source.source_latents`), the
sigma schedule `linspace(1, 1/T, T)` shifted by the scheduler with `mu = calculate_shift(N_img)`, the
same transformer inputs (target then source latents, `img_shapes`, timestep/1000), true CFG with the
norm rescale, and `scheduler.step`. With the stock areas its final image equals the stock pipeline's
under the same noise.

True CFG (`true_cfg_scale > 1` with a negative prompt) runs the conditional and the unconditional pass
either batched in one transformer call (`cfg_batch=True`: the shorter text is zero-padded and masked with
`encoder_hidden_states_mask`, which leaves the real tokens' attention, positions and outputs unchanged)
or as two calls, as the pipeline does. When an ACD recorder is attached, the passes are marked so that
only the conditional rows are recorded (`ACDRecorder.conditional_rows`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

from ..acd import get_acd_recorder


@dataclass
class QwenConditioning:
    """What `velocity` needs besides the latents and the timestep (batch 1, expanded on use)."""

    prompt_embeds: torch.Tensor  # [1, N_txt, C_txt]
    negative_embeds: torch.Tensor | None  # [1, N_neg, C_txt]; None: no true CFG
    source_latents: torch.Tensor  # [1, N_src, C] packed source latents (after the target in the sequence)
    img_shapes: tuple[tuple[int, int, int], ...]  # ((1, rows, cols) of the target, (1, rows, cols) of the source)
    true_cfg_scale: float  # the CFG scale (used only with negative_embeds)
    cfg_batch: bool  # True: conditional and unconditional pass in one transformer call

    @property
    def text_len(self) -> int:
        return self.prompt_embeds.shape[1]

    @property
    def image_len(self) -> int:
        """N_img: target tokens."""
        _, rows, cols = self.img_shapes[0]
        return rows * cols

    @property
    def do_cfg(self) -> bool:
        return self.negative_embeds is not None

    def to(self, device=None, dtype=None) -> "QwenConditioning":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, prompt_embeds=move(self.prompt_embeds), negative_embeds=move(self.negative_embeds),
                       source_latents=move(self.source_latents))


def sigma_schedule(scheduler_config: dict, num_steps: int, image_seq_len: int, device=None):
    """A fresh scheduler set up as the pipelines set theirs: sigmas `linspace(1, 1/T, T)` shifted with
    `mu = calculate_shift(N_img)` (`image_seq_len` = target tokens). Returns (scheduler, timesteps [T])."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int ≥ 1, got {num_steps!r}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                         scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                         scheduler_config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, scheduler.timesteps


def _pass_mark(transformer, rows: int | None):
    """`recorder.conditional_rows(rows)` when an ACD recorder is attached, else nothing."""
    recorder = get_acd_recorder(transformer)
    return contextlib.nullcontext() if recorder is None else recorder.conditional_rows(rows)


def _transformer_call(transformer, cond: QwenConditioning, hidden, timestep, embeds, mask, attention_kwargs):
    batch = hidden.shape[0]
    return transformer(
        hidden_states=hidden,
        timestep=timestep / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=embeds,
        img_shapes=[list(cond.img_shapes)] * batch,
        attention_kwargs=attention_kwargs,
        return_dict=False,
    )[0]


def velocity(transformer, cond: QwenConditioning, latents: torch.Tensor, timestep: torch.Tensor,
             attention_kwargs: dict | None = None) -> torch.Tensor:
    """v(x, t, c) `[B, N_img, C]` for latents `[B, N_img, C]` at scheduler timesteps `[B]` (sigma·1000), with
    true CFG as the pipelines combine it:

        v = (v_neg + s (v_pos − v_neg)) · ‖v_pos‖ / ‖v_neg + s (v_pos − v_neg)‖     (norms over channels)

    Differentiable with respect to the transformer's parameters (LoRA)."""
    batch, n_img = latents.shape[:2]
    if n_img != cond.image_len:
        raise ValueError(f"latents have {n_img} tokens, the conditioning's target has {cond.image_len}")
    hidden = torch.cat([latents, cond.source_latents.to(latents.dtype).expand(batch, -1, -1)], dim=1)
    timestep = timestep.to(latents.dtype)
    pos = cond.prompt_embeds.to(latents.dtype).expand(batch, -1, -1)
    if not cond.do_cfg:
        with _pass_mark(transformer, None):
            return _transformer_call(transformer, cond, hidden, timestep, pos, None, attention_kwargs)[:, :n_img]
    neg = cond.negative_embeds.to(latents.dtype).expand(batch, -1, -1)
    if cond.cfg_batch:
        n_pos, n_neg = pos.shape[1], neg.shape[1]
        length = max(n_pos, n_neg)
        embeds = torch.cat([F.pad(pos, (0, 0, 0, length - n_pos)), F.pad(neg, (0, 0, 0, length - n_neg))])
        mask = None
        if n_pos != n_neg:
            positions = torch.arange(length, device=latents.device)
            mask = torch.cat([(positions < n_pos).expand(batch, -1), (positions < n_neg).expand(batch, -1)])
        with _pass_mark(transformer, batch):
            both = _transformer_call(transformer, cond, hidden.repeat(2, 1, 1), timestep.repeat(2), embeds, mask,
                                     attention_kwargs)[:, :n_img]
        v_pos, v_neg = both[:batch], both[batch:]
    else:
        with _pass_mark(transformer, None):
            v_pos = _transformer_call(transformer, cond, hidden, timestep, pos, None, attention_kwargs)[:, :n_img]
        with _pass_mark(transformer, 0):
            v_neg = _transformer_call(transformer, cond, hidden, timestep, neg, None, attention_kwargs)[:, :n_img]
    combined = v_neg + cond.true_cfg_scale * (v_pos - v_neg)
    cond_norm = torch.norm(v_pos, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


@torch.no_grad()
def euler_rollout(transformer, cond: QwenConditioning, noises: torch.Tensor, scheduler, timesteps,
                  attention_kwargs: dict | None = None) -> torch.Tensor:
    """`[G, T+1, N_img, C]`: the noises and every state after each `scheduler.step`."""
    latents = noises
    states = [noises.detach().clone()]
    for t in timesteps:
        v = velocity(transformer, cond, latents, t.expand(latents.shape[0]), attention_kwargs)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        states.append(latents)
    return torch.stack(states, dim=1)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [0, 1] from packed latents `[B, N_img, C]`, as the pipeline's own
    `output_type="pt"` decode (unpack, undo the latent normalization, decode the single frame, postprocess)."""
    vae = pipe.vae
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    latents = latents / inv_std + mean
    image = vae.decode(latents, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pt")


__all__ = ["QwenConditioning", "decode_latents", "euler_rollout", "sigma_schedule", "velocity"]
