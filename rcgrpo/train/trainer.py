"""`RCGRPOTrainer`: the RC-GRPO loop (SPEC §3-7) on any editor family (`rcgrpo.editors`) with a peft LoRA.

One step: for each group (one example) build G RDP noises, roll them out under θ_old without grad
while the ACD processor records the instruction's attention mass, decode, score with the reward
functions, standardize rewards over the global minibatch (all groups of all ranks) and form group
advantages; then, one group at a time, predict one Euler step under θ for B anchors and the train
transitions, score the stored candidate states under the surrogate policy, and minimize the clipped
objective over the LoRA parameters (`rcgrpo.train.update`).

Data parallel over processes through `accelerate`: groups are sharded by global slot, reward
statistics, gradients, stop requests and logged metrics are reduced over all ranks
(`rcgrpo.train.distributed`), every rank joins every collective whatever its local work, and only
the main process writes files.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..editors.latents import background_drift
from ..editors.loading import editor_for_pipeline
from ..method.advantages import combine_rewards, step_advantages
from ..method.masks import element_mask
from ..method.rdp import region_decoupled_noise
from .checkpoints import (clean_run_directory, list_checkpoints, prune_checkpoints, read_checkpoint, set_rng_state,
                          write_checkpoint, write_lora)
from .config import RCGRPOConfig, resume_changes
from .data import example_at_resolution, resize_example
from .distributed import Collectives
from .ema import LoraEMA
from .metrics import GroupSummary, MovingAverage, RowLayout, exploration_sums, progress_fields, step_metrics
from .phases import Phases
from .signals import StopRequest
from .tracking import RunLog, check_trackers, write_run_info
from .update import SurrogateUpdate


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
    filtered: bool = False  # low-variance group given no update (config filter_low_variance)
    diag: dict = field(default_factory=dict)  # exploration sums, then the post-update diagnostics


class RCGRPOTrainer:
    """Train a LoRA on `pipeline.transformer` with RC-GRPO.

    Args:
        pipeline: an `rcgrpo.editors.Editor`, or a diffusers pipeline of a supported family (wrapped with
            `editor_for_pipeline`); its transformer gets a LoRA adapter.
        config: `RCGRPOConfig`.
        reward_funcs: callables `(edited, sources, masks, instructions, metadata) -> Tensor[B]`, or
            `(name, callable)` pairs; weights come from `config.reward_weights` (default 1).
        train_dataset / eval_dataset: indexable datasets of edit examples (see `train.data.as_edit_example`).
        accelerator: an `accelerate.Accelerator` (one is created when None, logging to `config.report_to`).
    """

    def __init__(self, pipeline, config: RCGRPOConfig, reward_funcs, train_dataset, eval_dataset=None, *,
                 accelerator=None):
        config.validate()
        self.config = config
        self.editor = editor_for_pipeline(pipeline)
        self.pipe = self.editor.pipe
        self.transformer = self.editor.transformer
        self.negative_prompt = config.negative_prompt if config.negative_prompt is not None \
            else self.editor.defaults.negative_prompt
        self.output_dir = Path(config.output_dir)
        if accelerator is None:
            accelerator = _make_accelerator(config, self.output_dir)
        self.accelerator = accelerator
        self.device = accelerator.device
        self.collectives = Collectives(accelerator)
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.reward_funcs = self._named_rewards(reward_funcs)
        self.rows = RowLayout(config.group_size, [name for name, _, _ in self.reward_funcs])
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_groups = 0  # by this process since it started
        self.skipped_examples = 0
        self.total_skipped = [0, 0]  # (groups, examples) over all ranks and the whole run (logged, checkpointed)
        self.reward_ema = MovingAverage()
        self._step_skips = [0, 0]  # this rank's skipped (groups, examples) in the current step
        self._text_cache: dict = {}
        self.stop = StopRequest()
        self.phases = Phases()
        self.run_log = RunLog(self.output_dir, accelerator, _config_for_saving(config))
        self.pipe.to(self.device)
        self.editor.configure(**config.editor_options())
        if config.vae_slicing:
            self.pipe.vae.enable_slicing()
        self._setup_lora()
        self.ema = None
        if config.ema_decay > 0:
            names = [n for n, _ in self.transformer.named_parameters() if "lora_" in n]
            self.ema = LoraEMA(names, self.lora_parameters, decay=config.ema_decay, start_step=config.ema_start_step)
        if config.eval_every and (eval_dataset is None or len(eval_dataset) == 0):
            raise ValueError(f"config eval_every = {config.eval_every} needs an evaluation set (eval_size > 0)")
        self.optimizer = torch.optim.AdamW(
            self.lora_parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, self.optimizer, num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * config.inner_epochs,
        )
        self.update = SurrogateUpdate(self.editor, config, self.phases, self.device, self._autocast)
        self.recorder = None
        if config.w_acd > 0:
            from ..editors.acd import attach_acd

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
        total = world * self.slots_per_rank
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        order = torch.cat([torch.randperm(len(self.train_dataset), generator=gen)
                           for _ in range(math.ceil(total / len(self.train_dataset)))])[:total]
        return [(slot, int(order[slot])) for slot in range(rank, total, world)]

    @property
    def slots_per_rank(self) -> int:
        return self.config.groups_per_step * self.config.gradient_accumulation_steps

    def _seed(self, *parts: int) -> int:
        value = self.config.seed
        for p in parts:
            value = (value * 1_000_003 + int(p)) % (2**62)
        return value

    def set_text_conditions(self, instruction: str, conditions) -> None:
        """Use `conditions` (the editor family's text conditions, e.g. `FluxKontextEditor.text_conditions(
        embeds, pooled, acd_weights)`) for `instruction` instead of the text encoders (pre-computed
        embeddings; a pipeline without text encoders). Their `acd_weights` mark the instruction's tokens."""
        self._text_cache[("given", instruction)] = conditions

    def _text_conditioning(self, instruction: str, source: torch.Tensor):
        """The editor's text conditions of `instruction` (with the source image where the family's text
        encoder sees it), cached when `cache_text_embeddings`."""
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
            if len(self._text_cache) > 1024:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[key] = text
        return text

    # ------------------------------------------------------------------ rollouts and rewards
    @torch.no_grad()
    def rollout_group(self, slot: int, index: int, step: int) -> GroupRollout | None:
        cfg = self.config
        image, pixel_mask, instruction, example_id, metadata = self.edit_input(self.train_dataset[index], index)
        height, width = image.shape[1:]
        try:
            token_mask = self.editor.token_mask(pixel_mask, height, width, pooling=cfg.mask_pooling,
                                                threshold=cfg.mask_threshold, name=f"example {example_id!r}")
        except ValueError as exc:
            if cfg.skip_bad_examples:
                warnings.warn(f"skipping {exc}")
                self._step_skips[1] += 1
                self.skipped_examples += 1
                return None
            raise
        n_img, channels = self.editor.latent_shape(height, width)
        alpha_edit, alpha_base = cfg.perturbation_scales()
        dtype = self.transformer.dtype
        noises = region_decoupled_noise(
            (n_img, channels), token_mask[:, None], group_size=cfg.group_size, alpha_edit=alpha_edit,
            alpha_base=alpha_base, generator=torch.Generator().manual_seed(self._seed(step, slot, 1)),
        ).to(device=self.device, dtype=dtype)
        source = image[None].to(device=self.device, dtype=dtype)
        text = self._text_conditioning(instruction, source)
        kwargs = dict(num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=height,
                      width=width, max_sequence_length=cfg.max_sequence_length, text=text, decode=False)
        acd = None
        with self.phases("rollout"):
            if self.recorder is not None:
                with self.recorder.capture(token_mask.to(self.device), text_weights=text.acd_weights) as cap:
                    result = self.editor.rollout(source, instruction, noises, **kwargs)
                acd = cap.reward().float().cpu()
            else:
                result = self.editor.rollout(source, instruction, noises, **kwargs)
        with self.phases("decode"):
            images = self.editor.decode(result.states[:, -1], height, width).float().clamp(0, 1)
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
                self._step_skips[0] += 1
                self.skipped_groups += 1
                return None
            raise
        task = sum(w * components[name] for name, _, w in self.reward_funcs)
        states = result.states
        drift = background_drift(states[:, -1], token_mask)[1:]
        mask = element_mask(token_mask, channels).to(self.device)
        if cfg.offload_states:
            states = states.cpu()
        return GroupRollout(
            slot=slot, example_id=example_id, states=states, sigmas=result.sigmas, timesteps=result.timesteps,
            conditioning=result.conditioning, mask=mask,
            token_mask=token_mask, task_components={k: v.cpu() for k, v in components.items()},
            task_reward=task.cpu(), acd=acd, images=images.cpu(), background_drift=drift.cpu(),
            diag=exploration_sums(result.states[:, -1], mask),
        )

    def compute_advantages(self, groups: list[GroupRollout]) -> int:
        """Set each group's advantages from rewards standardized over all ranks' groups (SPEC §6; the
        low-variance filter and `advantage_std` of `rcgrpo.method.advantages`); returns the number of
        groups of the step over all ranks. Every rank calls the same reductions."""
        cfg = self.config
        size = cfg.group_size
        task = torch.cat([g.task_reward for g in groups]) if groups else torch.zeros(0)
        task_mean, task_std, count = self.collectives.mean_std(task)
        acd = acd_stats = None
        if self.recorder is not None:  # known to every rank, unlike whether its groups survived
            acd = torch.cat([g.acd for g in groups]) if groups else torch.zeros(0)
            mean, std, _ = self.collectives.mean_std(acd)
            acd_stats = (mean, std)
        combined = torch.zeros(0)
        if groups:
            combined = combine_rewards(task, acd, w_task=cfg.w_task, w_acd=cfg.w_acd,
                                       task_stats=(task_mean, task_std), acd_stats=acd_stats)
        adv, keep = step_advantages(combined, task, size, mode=cfg.advantage, p=cfg.quasi_norm_p, std=cfg.advantage_std,
                                    low_variance_threshold=cfg.low_variance_threshold if cfg.filter_low_variance else None,
                                    reduce_sum=self.collectives.sum)
        for i, g in enumerate(groups):
            g.filtered = not bool(keep[i])
            g.advantages = adv[i * size : (i + 1) * size]
        return count // size

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
        return self.update.backward(group, self._anchors(step, group.slot, epoch), weight)

    def _reduce_gradients(self, loss_sum: float) -> float:
        """Sum the LoRA gradients (already weighted by 1/global groups) and the losses over ranks, in one
        collective; returns the global loss sum. A rank without groups contributes zeros."""
        if self.accelerator.num_processes == 1:
            return loss_sum
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.lora_parameters]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss_sum], device=grads[0].device)])
        flat = self.accelerator.reduce(flat.to(self.device), reduction="sum")
        offset = 0
        for p in self.lora_parameters:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        return float(flat[-1])

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg = self.config
        start = time.perf_counter()
        step = self.step
        self._step_skips = [0, 0]
        groups = []
        for slot, index in self._step_slots(step):
            group = self.rollout_group(slot, index, step)
            if group is not None:
                groups.append(group)
        rollout_time = time.perf_counter() - start
        with self.phases("advantages"):
            n_global = self.compute_advantages(groups)
            updated = [g for g in groups if not g.filtered]
            n_update = n_global if not cfg.filter_low_variance else \
                int(self.collectives.sum(torch.tensor([float(len(updated))]))[0])
        epoch_stats: list[dict] = []
        grad_norm = float("nan")
        skipped_update = n_update == 0
        if n_update:  # the loss is the mean over the groups that get an update, on all ranks
            with self.phases("update"):
                grad_norm, skipped_update = self._update(updated, step, n_update, epoch_stats)
        if n_global and cfg.log_policy_kl:
            with self.phases("diagnostics"):
                for g in groups:
                    g.diag.update(self.update.diagnostics(g, self._anchors(step, g.slot, 0)))
        return self._step_metrics(groups, epoch_stats, grad_norm, skipped_update, rollout_time,
                                  time.perf_counter() - start)

    def _update(self, groups, step: int, n_global: int, epoch_stats: list) -> tuple[float, bool]:
        cfg = self.config
        grad_norm, skipped = float("nan"), False
        for epoch in range(cfg.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            stats = [self.group_loss_backward(g, step, epoch, 1.0 / n_global) for g in groups]
            epoch_stats.append({g.slot: st for g, st in zip(groups, stats)})
            loss_value = self._reduce_gradients(sum(s["loss"] for s in stats)) / n_global
            with self.phases("optimizer"):
                grad_norm = self._clip_and_norm()
                finite = math.isfinite(loss_value) and math.isfinite(grad_norm)  # global: the same on every rank
                if finite:
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    if self.ema is not None:
                        self.ema.update(step + 1)
            if not finite:
                self.nonfinite_in_row += 1
                skipped = True
                self.optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"step {step}: non-finite loss or gradient (loss {loss_value}, grad norm "
                              f"{grad_norm}); update skipped ({self.nonfinite_in_row} in a row)")
                if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
                    raise RuntimeError(f"stopping: {self.nonfinite_in_row} consecutive non-finite steps "
                                       f"(max_nonfinite_steps = {cfg.max_nonfinite_steps})")
                break
            self.nonfinite_in_row = 0
        return grad_norm, skipped

    def _clip_and_norm(self) -> float:
        if self.config.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.lora_parameters, self.config.max_grad_norm))
        grads = [p.grad.detach().float().norm() for p in self.lora_parameters if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _step_metrics(self, groups, epoch_stats, grad_norm, skipped, rollout_time, total_time) -> dict:
        """Metrics over all ranks' groups (one gather), the same on every rank."""
        summaries = []
        for g in groups:
            per_epoch = [epoch[g.slot] for epoch in epoch_stats if g.slot in epoch]
            stats = {k: sum(s[k] for s in per_epoch) / len(per_epoch) for k in per_epoch[0]} if per_epoch else {}
            summaries.append(GroupSummary(slot=g.slot, task=g.task_reward, acd=g.acd, drift=g.background_drift,
                                          advantages=g.advantages if g.advantages is not None
                                          else torch.zeros(self.config.group_size),
                                          components=g.task_components, stats=stats, diag=g.diag,
                                          filtered=g.filtered))
        rows = self.collectives.gather(self.rows.pack(summaries, self.slots_per_rank))
        everyone = self.rows.unpack(rows)
        skips = self.collectives.sum(torch.tensor(self._step_skips, dtype=torch.float64)).tolist()
        self.total_skipped = [self.total_skipped[0] + int(skips[0]), self.total_skipped[1] + int(skips[1])]
        metrics = {"step": self.step + 1, **step_metrics(everyone, self.rows.reward_names,
                                                         low_variance_threshold=self.config.low_variance_threshold)}
        metrics.update({
            "reward_ema": self.reward_ema.update(metrics["reward_mean"]),
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "groups": len(everyone),
            "skipped_groups": self.total_skipped[0],
            "skipped_examples": self.total_skipped[1],
            "skipped_update": skipped,
            "rollout_time_s": rollout_time,
            "time_s": total_time,
        })
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset=None, *, seed: int = 12345, ema: bool | None = None) -> float | None:
        """Mean task reward of the deterministic edit (one fixed noise per example) over `dataset`, with the
        weights `evaluation_weights(ema)` gives (the EMA when it is on)."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None or len(dataset) == 0:
            return None
        scores = []
        with self.evaluation_weights(ema):
            for index in range(len(dataset)):
                scores.append(float(self.edit_example(dataset[index], index, seed=seed)[1]))
        return sum(scores) / len(scores)

    def evaluation_weights(self, ema: bool | None = None):
        """A context with the LoRA weights evaluation uses: the EMA (`rcgrpo.train.ema`) when `ema` is True,
        or None and the EMA is on; the raw weights otherwise."""
        use = self.ema is not None if ema is None else ema
        if use and self.ema is None:
            raise ValueError("no EMA of the LoRA weights: config ema_decay is 0")
        return self.ema.applied() if use else contextlib.nullcontext()

    @torch.no_grad()
    def periodic_evaluation(self) -> dict:
        """`eval/task_reward` (raw weights) and, with the EMA on, `eval/task_reward_ema`: `evaluate` over the
        evaluation set, its examples sharded over ranks and summed (every rank joins)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        n = len(self.eval_dataset)
        keys = [("eval/task_reward", False)] + ([("eval/task_reward_ema", True)] if self.ema is not None else [])
        sums = []
        for _, ema in keys:
            with self.evaluation_weights(ema):
                sums.append(sum(float(self.edit_example(self.eval_dataset[i], i)[1]) for i in range(rank, n, world)))
        totals = self.collectives.sum(torch.tensor(sums)).tolist()
        return {key: total / n for (key, _), total in zip(keys, totals)}

    @torch.no_grad()
    def edit_example(self, item, index: int, *, seed: int = 12345):
        """(image [3,H,W], task reward) of the edit of one example from a fixed seeded noise."""
        cfg = self.config
        image, pixel_mask, instruction, _, metadata = self.edit_input(item, index)
        height, width = image.shape[1:]
        n_img, channels = self.editor.latent_shape(height, width)
        noise = torch.randn((1, n_img, channels), generator=torch.Generator().manual_seed(seed + index))
        dtype = self.transformer.dtype
        source = image[None].to(self.device, dtype)
        result = self.editor.rollout(source, instruction, noise.to(self.device, dtype),
                                     num_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                     height=height, width=width, max_sequence_length=cfg.max_sequence_length,
                                     text=self._text_conditioning(instruction, source))
        edited = result.images.float().clamp(0, 1)
        source = image[None].to(edited.device)
        mask = pixel_mask[None, None].to(edited.device)
        total = 0.0
        for name, fn, w in self.reward_funcs:
            total += w * float(_check_reward(fn(edited, source, mask, [instruction], [metadata]), 1, name)[0])
        return edited[0].cpu(), total

    def edit_input(self, item, index: int):
        """(image, mask, instruction, id, metadata) of a dataset item at the size the trainer edits it:
        about resolution² pixels, the aspect kept unless `keep_aspect` is off."""
        return example_at_resolution(item, index, self.config.resolution, edit_size=self.editor.edit_size,
                                     keep_aspect=self.config.keep_aspect)

    def acd_text_weights(self, instruction: str, source: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ACD text weights the trainer uses for `instruction` (config `acd_text_tokens`); `source`
        `[1, 3, H, W]` is needed for families whose text encoder sees the image."""
        return self._text_conditioning(instruction, source).acd_weights

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run until `config.max_steps`; returns the last step's metrics."""
        cfg = self.config
        is_main = self.accelerator.is_main_process
        if is_main:
            _prepare_output_dir(self.output_dir)
            clean_run_directory(self.output_dir)
            write_run_info(self.output_dir, _SavedConfig(self.config), world_size=self.accelerator.num_processes,
                           device=self.device, step=self.step)
        self.accelerator.wait_for_everyone()
        self.run_log.start(self.step)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not is_main, desc="rc-grpo", dynamic_ncols=True)
        metrics: dict = {}
        self.stopped_by_signal = None
        try:
            with self.stop.installed():
                while self.step < cfg.max_steps:
                    metrics = self.train_step()
                    self.step += 1
                    evaluated = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
                    if evaluated:
                        metrics.update(self.periodic_evaluation())
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or evaluated:
                        self.run_log.log(metrics)
                    if is_main and cfg.sample_every and self.step % cfg.sample_every == 0:
                        self._save_samples()
                    bar.update(1)
                    bar.set_postfix(progress_fields(metrics))
                    signum = self.collectives.max_int(self.stop.signum or 0)  # any rank's request stops all
                    if signum:
                        self.stopped_by_signal = signum
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or signum:
                        self.save_checkpoint()
                    if signum:
                        if is_main:
                            print(f"received signal {signum}: checkpoint saved at step {self.step}, stopping")
                        break
            if self.stopped_by_signal is None:
                self.save_checkpoint()
                if is_main:
                    self.save_lora(self.output_dir / "lora")
                    if self.ema is not None:
                        self.save_lora(self.output_dir / "lora_ema", ema=True)
                self.accelerator.wait_for_everyone()
        finally:
            bar.close()
            self.run_log.finish()
        return metrics

    stopped_by_signal: int | None = None
    """The signal (SIGINT/SIGTERM, on any rank) that ended the last `train()` early, or None."""

    def _save_samples(self) -> None:
        from ..io.images import image_grid, save_image
        from .data import as_edit_example
        from .report import save_example_heatmap, upscale_for_display

        dataset = self.eval_dataset if self.eval_dataset is not None and len(self.eval_dataset) else self.train_dataset
        tiles = []
        for index in range(min(4, len(dataset))):
            image, *_ = as_edit_example(dataset[index], index)
            edited, _ = self.edit_example(dataset[index], index)
            if image.shape[1:] != edited.shape[1:]:
                image, _ = resize_example(image, torch.ones(image.shape[1:]), edited.shape[1])
            tiles += [image, edited]
        grid = image_grid([upscale_for_display(t, 128) for t in tiles], columns=2)
        save_image(grid, self.output_dir / "samples" / f"step-{self.step:06d}.png")
        images = {"samples/edits": _hwc_uint8(grid)}
        if self.recorder is not None:
            path = self.output_dir / "samples" / f"acd-step-{self.step:06d}.png"
            save_example_heatmap(self, dataset[0], 0, path)
            from ..io.images import load_image

            images["samples/acd"] = _hwc_uint8(load_image(path))
        self.run_log.log_images(images, self.step)

    # ------------------------------------------------------------------ checkpoints
    def lora_state_dict(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def save_lora(self, directory, *, ema: bool = False) -> Path:
        """Write `directory/pytorch_lora_weights.safetensors` in the diffusers format (atomically): the raw
        LoRA, or its EMA with `ema=True`."""
        with self.evaluation_weights(ema):
            state = {k: v.clone() for k, v in self.lora_state_dict().items()}  # views of the swapped-in weights
        return write_lora(directory, state, save=self.editor.save_lora)

    def save_checkpoint(self) -> Path | None:
        """Write `output_dir/checkpoint-<step>/` completely or not at all (rank 0); keep the last N."""
        self.accelerator.wait_for_everyone()
        final = None
        if self.accelerator.is_main_process:
            state = {"step": self.step, "nonfinite_in_row": self.nonfinite_in_row,
                     "skipped_groups": self.total_skipped[0], "skipped_examples": self.total_skipped[1],
                     "reward_ema": self.reward_ema.state_dict(), "config": _config_for_saving(self.config)}
            final = write_checkpoint(self.output_dir, self.step, lora_state=self.lora_state_dict(),
                                     optimizer_state=self.optimizer.state_dict(),
                                     scheduler_state=self.lr_scheduler.state_dict(), trainer_state=state,
                                     ema_state=self.ema.state_dict() if self.ema is not None else None)
            prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path) -> dict:
        """Restore LoRA, optimizer, scheduler, RNG and step from a complete checkpoint directory.

        The checkpoint's config is compared with this trainer's: a change of the model or the LoRA's
        shape (`RESUME_FIXED`) is refused with ValueError; other changes (learning rate, max steps,
        logging, ...) are applied and returned as {field: (saved, new)}.
        """
        from peft.utils import set_peft_model_state_dict

        ckpt = read_checkpoint(path)
        fixed, changed = resume_changes(ckpt.state.get("config", {}), self.config)
        if fixed:
            what = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in fixed.items())
            raise ValueError(f"--resume {str(ckpt.path)!r}: the checkpoint was trained with other settings that a "
                             f"resume cannot change ({what}); start a new run instead")
        result = set_peft_model_state_dict(self.transformer, ckpt.lora, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint {str(ckpt.path)!r} has LoRA keys this model lacks: {unexpected[:4]}")
        for p in self.lora_parameters:
            p.data = p.data.float()
        if self.ema is not None:
            if ckpt.ema is None:  # EMA switched on at resume: it starts at the checkpoint's weights
                self.ema.reset()
            else:
                self.ema.load_state_dict(ckpt.ema["tensors"], ckpt.ema["updates"], source=f"checkpoint {str(ckpt.path)!r}")
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.lr_scheduler.load_state_dict(ckpt.scheduler)
        self._apply_optimizer_config()
        set_rng_state(ckpt.rng)
        self.step = int(ckpt.state["step"])
        self.nonfinite_in_row = int(ckpt.state.get("nonfinite_in_row", 0))
        self.total_skipped = [int(ckpt.state.get("skipped_groups", 0)), int(ckpt.state.get("skipped_examples", 0))]
        self.reward_ema = MovingAverage(**ckpt.state.get("reward_ema", {}))
        return changed

    def _apply_optimizer_config(self) -> None:
        """After loading optimizer and scheduler states, use this config's learning rate, betas and weight
        decay (a saved optimizer state carries the old ones)."""
        cfg = self.config
        scheduler = self.lr_scheduler
        scheduler.base_lrs = [cfg.learning_rate for _ in self.optimizer.param_groups]
        factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas] if hasattr(scheduler, "lr_lambdas") \
            else [1.0] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, factors):
            group["lr"] = cfg.learning_rate * factor
            group["initial_lr"] = cfg.learning_rate
            group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
            group["weight_decay"] = cfg.weight_decay
        scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def resume(self, path=None) -> bool:
        """Load the checkpoint `path` (a `checkpoint-N` directory) or the newest complete one of the run
        directory `path` (default: the run's); False when the run has none. The config changes applied
        (field → (saved, new)) are in `self.resume_changes`."""
        from .checkpoints import find_checkpoint

        target = Path(path) if path else self.output_dir
        if not path and not list_checkpoints(target):
            return False
        self.resume_changes = self.load_checkpoint(find_checkpoint(target))
        return True

    resume_changes: dict = {}


# ---------------------------------------------------------------------- helpers
def _make_accelerator(config: RCGRPOConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = config.trackers()
    check_trackers(trackers)
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    return Accelerator(cpu=cpu, log_with=trackers or None, project_config=project)


def _prepare_output_dir(directory: Path) -> None:
    """Create the run directory and check that files can be written in it."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"output directory {str(directory)!r} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {str(directory)!r} is not writable ({exc.strerror or exc})") from None


class _SavedConfig:
    """The config as written to the run directory (credentials redacted)."""

    def __init__(self, config: RCGRPOConfig):
        self.values = _config_for_saving(config)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.values, sort_keys=False)


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


def _hwc_uint8(image: torch.Tensor):
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")

