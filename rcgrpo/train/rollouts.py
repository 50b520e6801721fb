"""The rollouts of training and evaluation (SPEC §3-4) through the editor interface.

`Rollouts.group(item, index, slot, seed)` builds G Region-Decoupled noises on the example's token mask,
rolls them out with the editor (θ_old, no grad) while the ACD recorder (if any) captures the
instruction's attention mass, decodes the finals and returns a `GroupRollout` (rewards not yet in) with
what the reward functions need. `Rollouts.single(item, index, seed)` is the deterministic edit of one
example from one seeded noise (evaluation, samples, reports). Text conditions are encoded once per
instruction (and source image, for families whose text encoder sees it) and cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..editors.latents import background_drift
from ..method.masks import element_mask
from ..method.rdp import region_decoupled_noise
from .data import example_at_resolution
from .metrics import exploration_sums

TEXT_CACHE_SIZE = 1024


@dataclass
class GroupRollout:
    """Everything the update needs about one group, kept from the rollout phase."""

    slot: int  # global position of the group in this step's minibatch
    example_id: str
    states: torch.Tensor  # [G, T+1, N_img, C]
    sigmas: torch.Tensor  # [T+1]
    timesteps: torch.Tensor  # [T]
    conditioning: object  # the editor family's conditioning (`Editor.velocity`)
    mask: torch.Tensor  # element mask [D]
    token_mask: torch.Tensor  # [N_img]
    task_components: dict  # reward name → [G] (empty until the rewards are in)
    task_reward: torch.Tensor | None  # [G] weighted sum of the components (None until the rewards are in)
    acd: torch.Tensor | None  # [G]
    images: torch.Tensor  # [G, 3, H, W]
    background_drift: torch.Tensor  # [G − 1]
    advantages: torch.Tensor | None = None
    filtered: bool = False  # low-variance group given no update (config filter_low_variance)
    diag: dict = field(default_factory=dict)  # exploration sums, then the post-update diagnostics


class BadExampleError(ValueError):
    """An example that cannot be trained on (its mask selects no token, or every token)."""


class RewardInputs(NamedTuple):
    """The reward functions' arguments for one group (SPEC §6, `rcgrpo.rewards`)."""

    edited: torch.Tensor  # [G, 3, H, W] in [0, 1]
    sources: torch.Tensor  # [G, 3, H, W]
    masks: torch.Tensor  # [G, 1, H, W]
    instructions: list
    metadata: list


class Rollouts:
    def __init__(self, editor, config, phases, device, recorder=None, negative_prompt: str | None = None):
        self.editor = editor
        self.config = config
        self.phases = phases
        self.device = device
        self.recorder = recorder
        self.negative_prompt = negative_prompt
        self._text_cache: dict = {}

    # ------------------------------------------------------------------ inputs
    def edit_input(self, item, index: int):
        """(image, mask, instruction, id, metadata) of a dataset item at the size the trainer edits it:
        about resolution² pixels, the aspect kept unless `keep_aspect` is off."""
        return example_at_resolution(item, index, self.config.resolution, edit_size=self.editor.edit_size,
                                     keep_aspect=self.config.keep_aspect)

    def set_text_conditions(self, instruction: str, conditions) -> None:
        self._text_cache[("given", instruction)] = conditions

    def text_conditions(self, instruction: str, source: torch.Tensor | None):
        """The editor's text conditions of `instruction` (with the source image `[1, 3, H, W]` where the
        family's text encoder sees it), cached when `cache_text_embeddings`."""
        cfg = self.config
        if ("given", instruction) in self._text_cache:
            return self._text_cache[("given", instruction)]
        negative = self.negative_prompt if cfg.guidance_scale > 1 else None
        key = self.editor.text_cache_key(instruction, source, length=cfg.max_sequence_length,
                                         acd=cfg.acd_text_tokens, negative=negative)
        if key in self._text_cache:
            return self._text_cache[key]
        text = self.editor.encode_text(instruction, source, max_sequence_length=cfg.max_sequence_length,
                                       acd_text_tokens=cfg.acd_text_tokens, negative_prompt=negative)
        if cfg.cache_text_embeddings:
            if len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[key] = text
        return text

    def _rollout_kwargs(self, height: int, width: int, text) -> dict:
        cfg = self.config
        return dict(num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=height,
                    width=width, max_sequence_length=cfg.max_sequence_length, text=text)

    # ------------------------------------------------------------------ one training group
    @torch.no_grad()
    def group(self, item, index: int, slot: int, seed: int) -> tuple[GroupRollout, RewardInputs]:
        """Roll out one group of G candidates from RDP noises drawn with `seed`; `BadExampleError` (naming
        the example) when its mask is unusable."""
        cfg, editor = self.config, self.editor
        image, pixel_mask, instruction, example_id, metadata = self.edit_input(item, index)
        height, width = image.shape[1:]
        try:
            token_mask = editor.token_mask(pixel_mask, height, width, pooling=cfg.mask_pooling,
                                           threshold=cfg.mask_threshold, name=f"example {example_id!r}")
        except ValueError as exc:
            raise BadExampleError(str(exc)) from None
        n_img, channels = editor.latent_shape(height, width)
        alpha_edit, alpha_base = cfg.perturbation_scales()
        dtype = editor.dtype
        noises = region_decoupled_noise(
            (n_img, channels), token_mask[:, None], group_size=cfg.group_size, alpha_edit=alpha_edit,
            alpha_base=alpha_base, generator=torch.Generator().manual_seed(seed),
        ).to(device=self.device, dtype=dtype)
        source = image[None].to(device=self.device, dtype=dtype)
        text = self.text_conditions(instruction, source)
        kwargs = dict(self._rollout_kwargs(height, width, text), decode=False)
        acd = None
        with self.phases("rollout"):
            if self.recorder is not None:
                with self.recorder.capture(token_mask.to(self.device), text_weights=text.acd_weights) as cap:
                    result = editor.rollout(source, instruction, noises, **kwargs)
                acd = cap.reward().float().cpu()
            else:
                result = editor.rollout(source, instruction, noises, **kwargs)
        with self.phases("decode"):
            images = editor.decode(result.states[:, -1], height, width).float().clamp(0, 1)
        g = cfg.group_size
        inputs = RewardInputs(images, image[None].expand(g, -1, -1, -1).to(images.device),
                              pixel_mask[None, None].expand(g, -1, -1, -1).to(images.device),
                              [instruction] * g, [metadata] * g)
        states = result.states
        drift = background_drift(states[:, -1], token_mask)[1:]
        mask = element_mask(token_mask, channels).to(self.device)
        diag = exploration_sums(states[:, -1], mask)
        if cfg.offload_states:
            states = states.cpu()
        group = GroupRollout(
            slot=slot, example_id=example_id, states=states, sigmas=result.sigmas, timesteps=result.timesteps,
            conditioning=result.conditioning, mask=mask, token_mask=token_mask, task_components={},
            task_reward=None, acd=acd, images=images.cpu(), background_drift=drift.cpu(), diag=diag,
        )
        return group, inputs

    # ------------------------------------------------------------------ one deterministic edit
    @torch.no_grad()
    def single(self, item, index: int, *, seed: int) -> RewardInputs:
        """The edit of one example from the noise `seed` draws (batch 1), with the reward functions' inputs."""
        editor = self.editor
        image, pixel_mask, instruction, _, metadata = self.edit_input(item, index)
        height, width = image.shape[1:]
        n_img, channels = editor.latent_shape(height, width)
        noise = torch.randn((1, n_img, channels), generator=torch.Generator().manual_seed(seed))
        source = image[None].to(self.device, editor.dtype)
        result = editor.rollout(source, instruction, noise.to(self.device, editor.dtype),
                                **self._rollout_kwargs(height, width, self.text_conditions(instruction, source)))
        edited = result.images.float().clamp(0, 1)
        return RewardInputs(edited, image[None].to(edited.device), pixel_mask[None, None].to(edited.device),
                            [instruction], [metadata])


__all__ = ["BadExampleError", "GroupRollout", "RewardInputs", "Rollouts"]
