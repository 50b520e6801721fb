"""`RCGRPOTrainer`: the RC-GRPO loop (SPEC §3-7) on a stock FluxKontextPipeline with a peft LoRA.

One step: for each group (one example) build G RDP noises, roll them out under θ_old without grad
while the ACD processor records attention mass, decode, score with the reward functions,
standardize rewards over the global minibatch and form group advantages; then for B anchors and
the train transitions predict one Euler step under θ (with grad), score the stored candidate
states under the surrogate policy, and minimize the clipped objective over the LoRA parameters.

Data parallel over processes through `accelerate` (groups are sharded by rank, reward statistics
and gradients are reduced over all ranks, rank 0 logs and saves).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..flux.rollout import background_drift, decode_latents, latent_shape, predict_velocity, rollout
from ..method.advantages import combine_rewards, group_advantages
from ..method.masks import element_mask, token_mask_for_image
from ..method.policy import grpo_loss, surrogate_log_probs
from ..method.rdp import region_decoupled_noise
from .checkpoints import (clean_run_directory, list_checkpoints, prune_checkpoints, read_checkpoint,
                          set_rng_state, write_checkpoint, write_lora)
from .config import RCGRPOConfig
from .data import as_edit_example, example_at_resolution, resize_example
from .phases import Phases


class BadRewardError(RuntimeError):
    """A reward function returned a malformed or non-finite value."""


@dataclass
class GroupRollout:
    """Everything the update needs about one group, kept from the rollout phase."""

    slot: int  # global position of the group in this step's minibatch
    example_id: str
    states: torch.Tensor  # [G, T+1, N_img, C]
    sigmas: torch.Tensor  # [T+1]
    timesteps: torch.Tensor  # [T]
    conditioning: object
    mask: torch.Tensor  # element mask [D]
    token_mask: torch.Tensor  # [N_img]
    task_components: dict  # reward name → [G]
    task_reward: torch.Tensor  # [G] weighted sum of the components
    acd: torch.Tensor | None  # [G]
    images: torch.Tensor  # [G, 3, H, W]
    background_drift: torch.Tensor  # [G − 1]
    advantages: torch.Tensor | None = None


@dataclass
class StepMetrics:
    values: dict = field(default_factory=dict)


class RCGRPOTrainer:
    """Train a LoRA on `pipeline.transformer` with RC-GRPO.

    Args:
        pipeline: a diffusers FluxKontextPipeline (its transformer gets a LoRA adapter).
        config: `RCGRPOConfig`.
        reward_funcs: callables `(edited, sources, masks, instructions, metadata) -> Tensor[B]`, or
            `(name, callable)` pairs; weights come from `config.reward_weights` (default 1).
        train_dataset / eval_dataset: indexable datasets of edit examples (see `as_edit_example`).
        accelerator: an `accelerate.Accelerator` (one is created when None).
    """

    def __init__(self, pipeline, config: RCGRPOConfig, reward_funcs, train_dataset, eval_dataset=None, *,
                 accelerator=None):
        from accelerate import Accelerator

        config.validate()
        self.config = config
        self.pipe = pipeline
        self.transformer = pipeline.transformer
        if accelerator is None:
            cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
            accelerator = Accelerator(cpu=cpu)
        self.accelerator = accelerator
        self.device = accelerator.device
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.reward_funcs = self._named_rewards(reward_funcs)
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_groups = 0
        self.skipped_examples = 0
        self._stop_signal: int | None = None
        self._text_cache: dict[str, tuple] = {}
        self._writer = None
        self.phases = Phases()
        self.pipe.to(self.device)
        if config.vae_slicing:
            self.pipe.vae.enable_slicing()
        self._setup_lora()
        self.optimizer = torch.optim.AdamW(
            self.lora_parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, self.optimizer, num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * config.inner_epochs,
        )
        self.recorder = None
        if config.w_acd > 0:
            from ..flux.attention import attach_acd

            self.recorder = attach_acd(self.transformer, last_k=config.acd_layers, backend=config.acd_backend,
                                       mode=config.acd_mode, phases=self.phases)

    # ------------------------------------------------------------------ set-up
    def _named_rewards(self, reward_funcs):
        if callable(reward_funcs) or (isinstance(reward_funcs, tuple) and len(reward_funcs) == 2 and callable(reward_funcs[1])):
            reward_funcs = [reward_funcs]
        named = []
        for i, item in enumerate(reward_funcs):
            name, fn = item if isinstance(item, tuple) else (getattr(item, "__name__", f"reward_{i}"), item)
            if not callable(fn):
                raise ValueError(f"reward function {name!r} is not callable")
            named.append((str(name), fn))
        if not named:
            raise ValueError("at least one reward function is needed")
        weights = self.config.reward_weights or [1.0] * len(named)
        if len(weights) != len(named):
            raise ValueError(f"config reward_weights has {len(weights)} entries for {len(named)} reward functions")
        return [(n, f, float(w)) for (n, f), w in zip(named, weights)]

    def _setup_lora(self):
        from peft import LoraConfig

        cfg = self.config
        self.transformer.requires_grad_(False)
        if not getattr(self.transformer, "peft_config", None):
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                              target_modules=list(cfg.lora_target_modules))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.transformer.add_adapter(lora)
        for name, param in self.transformer.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_" in name and param.dtype != torch.float32:
                param.data = param.data.float()  # master weights of the adapter stay fp32
        self.lora_parameters = [p for n, p in self.transformer.named_parameters() if "lora_" in n]
        if not self.lora_parameters:
            raise ValueError(f"no LoRA parameters were created for target modules {cfg.lora_target_modules}")
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ data
    def _step_slots(self, step: int) -> list[tuple[int, int]]:
        """This process's (global slot, dataset index) pairs for `step`."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        total = world * self.config.groups_per_step * self.config.gradient_accumulation_steps
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        order = torch.cat([torch.randperm(len(self.train_dataset), generator=gen)
                           for _ in range(math.ceil(total / len(self.train_dataset)))])[:total]
        return [(slot, int(order[slot])) for slot in range(rank, total, world)]

    def _seed(self, *parts: int) -> int:
        value = self.config.seed
        for p in parts:
            value = (value * 1_000_003 + int(p)) % (2**62)
        return value

    def set_text_embeddings(self, instruction: str, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> None:
        """Use these embeddings (`[1, N_txt, C]`, `[1, C_pool]`) for `instruction` instead of the text
        encoders (pre-computed embeddings; a pipeline without text encoders)."""
        self._text_cache[instruction] = (prompt_embeds, pooled_prompt_embeds)

    def _text_embeddings(self, instruction: str):
        if instruction in self._text_cache:
            return self._text_cache[instruction]
        if not self.config.cache_text_embeddings:
            return None, None
        if instruction not in self._text_cache:
            with torch.no_grad():
                embeds, pooled, _ = self.pipe.encode_prompt(
                    prompt=instruction, prompt_2=None, device=self.device, num_images_per_prompt=1,
                    max_sequence_length=self.config.max_sequence_length,
                )
            if len(self._text_cache) > 1024:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[instruction] = (embeds, pooled)
        return self._text_cache[instruction]

    # ------------------------------------------------------------------ rollouts and rewards
    def _perturbation(self) -> tuple[float, float]:
        cfg = self.config
        if cfg.perturbation == "global":
            return cfg.global_sigma, cfg.global_sigma
        return cfg.alpha_edit, cfg.alpha_base

    @torch.no_grad()
    def rollout_group(self, slot: int, index: int, step: int) -> GroupRollout | None:
        cfg = self.config
        image, pixel_mask, instruction, example_id, metadata = example_at_resolution(
            self.train_dataset[index], index, cfg.resolution)
        height = width = cfg.resolution
        try:
            token_mask = token_mask_for_image(pixel_mask, height, width, self.pipe.vae_scale_factor,
                                              pooling=cfg.mask_pooling, threshold=cfg.mask_threshold,
                                              name=f"example {example_id!r}")
        except ValueError as exc:
            if cfg.skip_bad_examples:
                warnings.warn(f"skipping {exc}")
                self.skipped_examples += 1
                return None
            raise
        n_img, channels = latent_shape(self.pipe, height, width)
        alpha_edit, alpha_base = self._perturbation()
        dtype = self.transformer.dtype
        noises = region_decoupled_noise(
            (n_img, channels), token_mask[:, None], group_size=cfg.group_size, alpha_edit=alpha_edit,
            alpha_base=alpha_base, generator=torch.Generator().manual_seed(self._seed(step, slot, 1)),
        ).to(device=self.device, dtype=dtype)
        embeds, pooled = self._text_embeddings(instruction)
        source = image[None].to(device=self.device, dtype=dtype)
        kwargs = dict(num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=height,
                      width=width, max_sequence_length=cfg.max_sequence_length, prompt_embeds=embeds,
                      pooled_prompt_embeds=pooled, decode=False)
        acd = None
        with self.phases("rollout"):
            if self.recorder is not None:
                with self.recorder.capture(token_mask.to(self.device)) as cap:
                    result = rollout(self.pipe, source, instruction, noises, **kwargs)
                acd = cap.reward().float().cpu()
            else:
                result = rollout(self.pipe, source, instruction, noises, **kwargs)
        with self.phases("decode"):
            images = decode_latents(self.pipe, result.states[:, -1], height, width).float().clamp(0, 1)
        group = cfg.group_size
        sources = image[None].expand(group, -1, -1, -1).to(images.device)
        masks = pixel_mask[None, None].expand(group, -1, -1, -1).to(images.device)
        components = {}
        try:
            with self.phases("reward"):
                for name, fn, _ in self.reward_funcs:
                    components[name] = _check_reward(
                        fn(images, sources, masks, [instruction] * group, [metadata] * group), group, name)
        except BadRewardError as exc:
            if cfg.bad_reward_policy == "skip":
                warnings.warn(f"skipping group of example {example_id!r}: {exc}")
                self.skipped_groups += 1
                return None
            raise
        task = sum(w * components[name] for name, _, w in self.reward_funcs)
        states = result.states
        drift = background_drift(states[:, -1], token_mask)[1:]
        if cfg.offload_states:
            states = states.cpu()
        return GroupRollout(
            slot=slot, example_id=example_id, states=states, sigmas=result.sigmas, timesteps=result.timesteps,
            conditioning=result.conditioning, mask=element_mask(token_mask, channels).to(self.device),
            token_mask=token_mask, task_components={k: v.cpu() for k, v in components.items()},
            task_reward=task.cpu(), acd=acd, images=images.cpu(), background_drift=drift.cpu(),
        )

    def _global_stats(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population std of `values` over all processes."""
        local = torch.stack([values.new_tensor(values.numel(), dtype=torch.float64),
                             values.double().sum(), values.double().square().sum()]).to(self.device)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="sum")
        count, total, sq = local.cpu().tolist()
        mean = total / max(count, 1)
        var = max(sq / max(count, 1) - mean * mean, 0.0)
        return torch.tensor(mean), torch.tensor(math.sqrt(var))

    def compute_advantages(self, groups: list[GroupRollout]) -> None:
        cfg = self.config
        task = torch.cat([g.task_reward for g in groups]) if groups else torch.zeros(0)
        task_stats = self._global_stats(task)
        acd = None
        acd_stats = None
        if cfg.w_acd > 0 and groups and groups[0].acd is not None:
            acd = torch.cat([g.acd for g in groups])
            acd_stats = self._global_stats(acd)
        if not groups:
            return
        combined = combine_rewards(task, acd, w_task=cfg.w_task, w_acd=cfg.w_acd, task_stats=task_stats,
                                   acd_stats=acd_stats)
        adv = group_advantages(combined, cfg.group_size, mode=cfg.advantage, p=cfg.quasi_norm_p)
        for i, g in enumerate(groups):
            g.advantages = adv[i * cfg.group_size : (i + 1) * cfg.group_size]

    # ------------------------------------------------------------------ update
    def _anchors(self, step: int, slot: int, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self._seed(step, slot, 2, epoch))
        return 1 + torch.randperm(self.config.group_size - 1, generator=gen)[: self.config.num_anchors]

    def _autocast(self):
        if self.config.mixed_precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def group_loss_backward(self, group: GroupRollout, step: int, epoch: int, weight: float) -> dict:
        """Backward of `weight ×` the group's objective, in chunks of train transitions; returns stats."""
        cfg = self.config
        anchors = self._anchors(step, group.slot, epoch)
        train_j = cfg.train_timestep_indices(group.sigmas.shape[0] - 1)
        stats_acc: dict[str, float] = {}
        total_loss = 0.0
        dim = group.mask.shape[0]
        for c0 in range(0, len(train_j), cfg.train_step_chunk):
            chunk = torch.tensor(train_j[c0 : c0 + cfg.train_step_chunk])
            n_chunk, n_anchor = len(chunk), len(anchors)
            x_j = group.states[anchors][:, chunk].to(self.device)  # [B, c, N, C]
            x_j = x_j.reshape(n_anchor * n_chunk, *x_j.shape[2:])
            t_j = group.timesteps[chunk].repeat(n_anchor).to(self.device)
            sigma = group.sigmas[chunk].repeat(n_anchor).to(self.device)
            sigma_next = group.sigmas[chunk + 1].repeat(n_anchor).to(self.device)
            with self.phases("anchor_forward"), self._autocast():
                v = predict_velocity(self.transformer, group.conditioning, x_j, t_j)
            dt = (sigma_next - sigma).float()[:, None, None]
            pred = x_j.float() + dt * v.float()  # x̄^(k)_{j+1}(θ), fp32
            pred = pred.reshape(n_anchor, n_chunk, dim).transpose(0, 1)  # [c, B, D]
            states_next = group.states[:, chunk + 1].to(self.device).float().reshape(cfg.group_size, n_chunk, dim)
            states_next = states_next.transpose(0, 1).contiguous()  # [c, G, D]
            old_pred = states_next[:, anchors]  # x̄^(k)_{j+1}(old) = the stored state
            dist_kwargs = dict(tau_edit=cfg.tau_edit, tau_base=cfg.tau_base, scale=cfg.distance_scale,
                               eps=cfg.distance_eps, backend=cfg.distance_backend)
            with self.phases("distances"):
                anchor_in = self.phases.wrap_inputs(pred.contiguous(), "distances")
                log_probs = surrogate_log_probs(states_next, anchor_in, group.mask, **dist_kwargs)
                log_probs = self.phases.wrap_outputs(log_probs, "distances")
                with torch.no_grad():
                    old_log_probs = surrogate_log_probs(states_next, old_pred.contiguous(), group.mask, **dist_kwargs)
            ref_pred = None
            if cfg.beta > 0:
                with torch.no_grad(), self._autocast():
                    self.transformer.disable_adapters()
                    try:
                        v_ref = predict_velocity(self.transformer, group.conditioning, x_j, t_j)
                    finally:
                        self.transformer.enable_adapters()
                ref_pred = (x_j.float() + dt * v_ref.float()).reshape(n_anchor, n_chunk, dim).transpose(0, 1)
            loss, stats = grpo_loss(log_probs, old_log_probs, group.advantages.to(self.device), clip_eps=cfg.clip_eps,
                                    beta=cfg.beta, anchor_pred=pred, anchor_ref=ref_pred, return_stats=True)
            share = n_chunk / len(train_j)
            (loss * share * weight).backward()
            total_loss += float(loss.detach()) * share
            for key, value in vars(stats).items():
                stats_acc[key] = stats_acc.get(key, 0.0) + value * share
        stats_acc["loss"] = total_loss
        return stats_acc

    def _reduce_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.lora_parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in self.lora_parameters:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg = self.config
        start = time.perf_counter()
        step = self.step
        groups = []
        for slot, index in self._step_slots(step):
            group = self.rollout_group(slot, index, step)
            if group is not None:
                groups.append(group)
        rollout_time = time.perf_counter() - start
        with self.phases("advantages"):
            self.compute_advantages(groups)
        epoch_stats: list[dict] = []
        grad_norm = float("nan")
        skipped_update = False
        with self.phases("update"):
            for epoch in range(cfg.inner_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                stats = [self.group_loss_backward(g, step, epoch, 1.0 / len(groups)) for g in groups]
                epoch_stats.extend(stats)
                self._reduce_gradients()
                loss_value = sum(s["loss"] for s in stats) / max(len(stats), 1)
                with self.phases("optimizer"):
                    grad_norm = self._clip_and_norm()
                    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
                    if finite:
                        self.optimizer.step()
                        self.lr_scheduler.step()
                if not finite:
                    self.nonfinite_in_row += 1
                    skipped_update = True
                    self.optimizer.zero_grad(set_to_none=True)
                    warnings.warn(f"step {step}: non-finite loss or gradient (loss {loss_value}, grad norm "
                                  f"{grad_norm}); update skipped ({self.nonfinite_in_row} in a row)")
                    if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
                        raise RuntimeError(f"stopping: {self.nonfinite_in_row} consecutive non-finite steps "
                                           f"(max_nonfinite_steps = {cfg.max_nonfinite_steps})")
                    break
                self.nonfinite_in_row = 0
        return self._step_metrics(groups, epoch_stats, grad_norm, skipped_update, rollout_time,
                                  time.perf_counter() - start)

    def _clip_and_norm(self) -> float:
        if self.config.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.lora_parameters, self.config.max_grad_norm))
        grads = [p.grad.detach().float().norm() for p in self.lora_parameters if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _step_metrics(self, groups, stats, grad_norm, skipped, rollout_time, total_time) -> dict:
        def mean(values):
            values = [v for v in values if v is not None and math.isfinite(v)]
            return sum(values) / len(values) if values else None

        task = torch.cat([g.task_reward for g in groups]) if groups else torch.zeros(0)
        within = [float(g.task_reward.std(correction=0)) for g in groups]
        drift = torch.cat([g.background_drift for g in groups]).tolist() if groups else []
        adv = torch.cat([g.advantages for g in groups]) if groups else torch.zeros(0)
        metrics = {
            "step": self.step + 1,
            "loss": mean([s["loss"] for s in stats]),
            "policy_loss": mean([s["policy_loss"] for s in stats]),
            "kl_loss": mean([s["kl_loss"] for s in stats]),
            "reward_mean": float(task.mean()) if task.numel() else None,
            "reward_std_within_group": mean(within),
            "reward_std_within_group_values": within,
            "acd_mean": float(torch.cat([g.acd for g in groups]).mean()) if groups and groups[0].acd is not None else None,
            "background_drift": mean(drift),
            "background_drift_values": drift,
            "advantage_abs_mean": float(adv.abs().mean()) if adv.numel() else None,
            "advantage_max": float(adv.max()) if adv.numel() else None,
            "ratio_mean": mean([s["ratio_mean"] for s in stats]),
            "ratio_max": max([s["ratio_max"] for s in stats], default=None),
            "clip_fraction": mean([s["clip_fraction"] for s in stats]),
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "groups": len(groups),
            "skipped_groups": self.skipped_groups,
            "skipped_examples": self.skipped_examples,
            "skipped_update": skipped,
            "rollout_time_s": rollout_time,
            "time_s": total_time,
        }
        for name, _, _ in self.reward_funcs:
            metrics[f"reward/{name}"] = float(torch.cat([g.task_components[name] for g in groups]).mean()) if groups else None
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset=None, *, seed: int = 12345) -> float | None:
        """Mean task reward of the deterministic edit (one fixed noise per example) over `dataset`."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None or len(dataset) == 0:
            return None
        scores = []
        for index in range(len(dataset)):
            scores.append(float(self.edit_example(dataset[index], index, seed=seed)[1]))
        return sum(scores) / len(scores)

    @torch.no_grad()
    def edit_example(self, item, index: int, *, seed: int = 12345):
        """(image [3,H,W], task reward) of the edit of one example from a fixed seeded noise."""
        cfg = self.config
        image, pixel_mask, instruction, _, metadata = example_at_resolution(item, index, cfg.resolution)
        n_img, channels = latent_shape(self.pipe, cfg.resolution, cfg.resolution)
        noise = torch.randn((1, n_img, channels), generator=torch.Generator().manual_seed(seed + index))
        dtype = self.transformer.dtype
        embeds, pooled = self._text_embeddings(instruction)
        result = rollout(self.pipe, image[None].to(self.device, dtype), instruction, noise.to(self.device, dtype),
                         num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=cfg.resolution,
                         width=cfg.resolution, max_sequence_length=cfg.max_sequence_length, prompt_embeds=embeds,
                         pooled_prompt_embeds=pooled)
        edited = result.images.float().clamp(0, 1)
        source = image[None].to(edited.device)
        mask = pixel_mask[None, None].to(edited.device)
        total = 0.0
        for name, fn, w in self.reward_funcs:
            total += w * float(_check_reward(fn(edited, source, mask, [instruction], [metadata]), 1, name)[0])
        return edited[0].cpu(), total

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run until `config.max_steps`; returns the last step's metrics."""
        cfg = self.config
        is_main = self.accelerator.is_main_process
        if is_main:
            _prepare_output_dir(self.output_dir)
            clean_run_directory(self.output_dir)
        self.accelerator.wait_for_everyone()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not is_main, desc="rc-grpo", dynamic_ncols=True)
        self._stop_signal = None
        previous = self._install_signal_handlers()
        metrics: dict = {}
        try:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                self.step += 1
                if is_main:
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        self._log(metrics)
                    if cfg.sample_every and self.step % cfg.sample_every == 0:
                        self._save_samples()
                    bar.update(1)
                    bar.set_postfix(reward=_fmt(metrics.get("reward_mean")), loss=_fmt(metrics.get("loss")))
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self._stop_signal is not None:
                    self.save_checkpoint()
                if self._stop_signal is not None:
                    if is_main:
                        print(f"received signal {self._stop_signal}: checkpoint saved at step {self.step}, stopping")
                    break
            if self._stop_signal is None:
                self.save_checkpoint()
                if is_main:
                    self.save_lora(self.output_dir / "lora")
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
            if self._writer is not None:
                self._writer.flush()
        return metrics

    @property
    def stopped_by_signal(self) -> int | None:
        """The signal (SIGINT/SIGTERM) that ended the last `train()` early, or None."""
        return self._stop_signal

    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, _frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to finish
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous):
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _log(self, metrics: dict) -> None:
        line = json.dumps(metrics, allow_nan=False, default=float)
        with open(self.output_dir / "metrics.jsonl", "a") as fh:
            fh.write(line + "\n")
            fh.flush()
        if self.config.tensorboard:
            writer = self._tensorboard()
            if writer is not None:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                        writer.add_scalar(key, value, metrics["step"])

    def _tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.config.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        return self._writer

    def _save_samples(self) -> None:
        from ..io.images import image_grid, save_image

        dataset = self.eval_dataset if self.eval_dataset is not None and len(self.eval_dataset) else self.train_dataset
        tiles = []
        for index in range(min(4, len(dataset))):
            image, *_ = as_edit_example(dataset[index], index)
            edited, _ = self.edit_example(dataset[index], index)
            if image.shape[1:] != edited.shape[1:]:
                image, _ = resize_example(image, torch.ones(image.shape[1:]), edited.shape[1])
            tiles += [image, edited]
        save_image(image_grid(tiles, columns=2), self.output_dir / "samples" / f"step-{self.step:06d}.png")
        if self.recorder is not None:
            from .report import save_example_heatmap

            save_example_heatmap(self, dataset[0], 0, self.output_dir / "samples" / f"acd-step-{self.step:06d}.png")

    # ------------------------------------------------------------------ checkpoints
    def lora_state_dict(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def save_lora(self, directory) -> Path:
        """Write `directory/pytorch_lora_weights.safetensors` in the diffusers format (atomically)."""
        return write_lora(directory, self.lora_state_dict())

    def save_checkpoint(self) -> Path | None:
        """Write `output_dir/checkpoint-<step>/` completely or not at all (rank 0); keep the last N."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        state = {"step": self.step, "nonfinite_in_row": self.nonfinite_in_row,
                 "skipped_groups": self.skipped_groups, "skipped_examples": self.skipped_examples,
                 "config": _config_for_saving(self.config)}
        final = write_checkpoint(self.output_dir, self.step, lora_state=self.lora_state_dict(),
                                 optimizer_state=self.optimizer.state_dict(),
                                 scheduler_state=self.lr_scheduler.state_dict(), trainer_state=state)
        prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        return final

    def load_checkpoint(self, path) -> None:
        """Restore LoRA, optimizer, scheduler, RNG and step from a complete checkpoint directory."""
        from peft.utils import set_peft_model_state_dict

        ckpt = read_checkpoint(path)
        result = set_peft_model_state_dict(self.transformer, ckpt.lora, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint {str(ckpt.path)!r} has LoRA keys this model lacks: {unexpected[:4]}")
        for p in self.lora_parameters:
            p.data = p.data.float()
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.lr_scheduler.load_state_dict(ckpt.scheduler)
        set_rng_state(ckpt.rng)
        self.step = int(ckpt.state["step"])
        self.nonfinite_in_row = int(ckpt.state.get("nonfinite_in_row", 0))
        self.skipped_groups = int(ckpt.state.get("skipped_groups", 0))
        self.skipped_examples = int(ckpt.state.get("skipped_examples", 0))

    def resume(self, output_dir=None) -> bool:
        """Load the newest complete checkpoint under `output_dir` (default: the run's); False if none."""
        ckpts = list_checkpoints(Path(output_dir) if output_dir else self.output_dir)
        if not ckpts:
            return False
        self.load_checkpoint(ckpts[-1])
        return True


# ---------------------------------------------------------------------- helpers
def _prepare_output_dir(directory: Path) -> None:
    """Create the run directory and check that files can be written in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {str(directory)!r} is not writable ({exc.strerror or exc})") from None


def _config_for_saving(config: RCGRPOConfig) -> dict:
    from ..rewards.editscore import redact_url

    values = config.to_dict()
    if values.get("editscore_url"):
        values["editscore_url"] = redact_url(values["editscore_url"])
    return values


def _check_reward(values, batch: int, name: str) -> torch.Tensor:
    """`rcgrpo.rewards.check_reward_output` on the CPU; lists/arrays are accepted; failures raise BadRewardError."""
    from ..rewards.checks import check_reward_output

    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise BadRewardError(f"reward {name!r} returned {type(values).__name__}; expected a float tensor [{batch}]") from None
    try:
        return check_reward_output(values.detach(), batch, name).cpu()
    except ValueError as exc:
        raise BadRewardError(str(exc)) from None


def _fmt(value):
    return "-" if value is None else f"{value:.4f}"
