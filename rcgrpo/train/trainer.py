"""`RCGRPOTrainer`: the RC-GRPO loop (SPEC §3-7) on any editor family (`rcgrpo.editors`) with a peft LoRA.

One step: for each group (one example) build G RDP noises, roll them out under θ_old without grad
while the ACD processor records the instruction's attention mass, decode, score with the reward
functions, standardize rewards over the global minibatch (all groups of all ranks) and form group
advantages; then, one group at a time, predict one Euler step under θ for B anchors and the train
transitions, score the stored candidate states under the surrogate policy, and minimize the clipped
objective over the LoRA parameters (`rcgrpo.train.update`).

The parts live in their own modules: `rollouts` (RDP noises, the editor's rollout, the ACD capture),
`scoring` (rewards, overlapped with later rollouts), `update` (the surrogate objective's backward),
`evaluation`, `state` (checkpoints, resume, LoRA files), `lora`, `metrics`.

Data parallel over processes through `accelerate`: groups are sharded by global slot, reward
statistics, gradients, stop requests and logged metrics are reduced over all ranks
(`rcgrpo.train.distributed`), every rank joins every collective whatever its local work, and only
the main process writes files.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from ..editors.loading import editor_for_pipeline
from ..method.advantages import combine_rewards, step_advantages
from . import evaluation, state
from .checkpoints import clean_run_directory, find_checkpoint, list_checkpoints, prepare_run_directory
from .config import RCGRPOConfig
from .distributed import Collectives, make_accelerator
from .ema import LoraEMA
from .lora import add_lora, lora_parameter_names, lora_state_dict
from .metrics import GroupSummary, MovingAverage, RowLayout, progress_fields, step_metrics
from .phases import Phases
from .rollouts import BadExampleError, GroupRollout, Rollouts
from .scoring import POLICY_ERRORS, BadRewardError, RewardScheduler, check_reward  # noqa: F401 - public names
from .signals import StopRequest
from .tracking import RunLog, SavedConfig, config_for_saving, write_run_info
from .update import SurrogateUpdate


class RCGRPOTrainer:
    """Train a LoRA on `pipeline.transformer` with RC-GRPO.

    Args:
        pipeline: an `rcgrpo.editors.Editor`, or a diffusers pipeline of a supported family (wrapped with
            `editor_for_pipeline`); its transformer gets a LoRA adapter.
        config: `RCGRPOConfig`.
        reward_funcs: callables `(edited, sources, masks, instructions, metadata) -> Tensor[B]`, or
            `(name, callable)` pairs; weights come from `config.reward_weights` (default 1). Those with
            `asynchronous = True` (EditScore) score in the background while later groups roll out
            (`config.overlap_rewards`, `rcgrpo.train.scoring`).
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
            accelerator = make_accelerator(config, self.output_dir)
        self.accelerator = accelerator
        self.device = accelerator.device
        self.collectives = Collectives(accelerator)
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.reward_funcs = self._named_rewards(reward_funcs)
        self.phases = Phases()
        self.scoring = RewardScheduler(self.reward_funcs, overlap=config.overlap_rewards, phases=self.phases,
                                       max_in_flight=config.max_reward_requests_in_flight)
        self.rows = RowLayout(config.group_size, [name for name, _, _ in self.reward_funcs])
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped_groups = 0  # by this process since it started
        self.skipped_examples = 0
        self.total_skipped = [0, 0]  # (groups, examples) over all ranks and the whole run (logged, checkpointed)
        self.reward_ema = MovingAverage()
        self._step_skips = [0, 0]  # this rank's skipped (groups, examples) in the current step
        self.stop = StopRequest()
        self.run_log = RunLog(self.output_dir, accelerator, config_for_saving(config))
        self.pipe.to(self.device)
        self.editor.configure(**config.editor_options())
        if config.vae_slicing:
            self.pipe.vae.enable_slicing()
        self.lora_parameters = add_lora(self.transformer, config)
        self.ema = None
        if config.ema_decay > 0:
            self.ema = LoraEMA(lora_parameter_names(self.transformer), self.lora_parameters, decay=config.ema_decay,
                               start_step=config.ema_start_step)
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
        self.rollouts = Rollouts(self.editor, config, self.phases, self.device, self.recorder, self.negative_prompt)

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
        self.rollouts.set_text_conditions(instruction, conditions)

    # ------------------------------------------------------------------ rollouts and rewards
    def rollout_group(self, slot: int, index: int, step: int) -> GroupRollout | None:
        """One group rolled out and scored (None when it was skipped)."""
        group = self._rollout(slot, index, step)
        scored = self._with_rewards([group] if group is not None else [])
        return scored[0] if scored else None

    def _rollout(self, slot: int, index: int, step: int) -> GroupRollout | None:
        """One group rolled out and decoded, its rewards submitted to `self.scoring` (not yet in); None when
        the example or its rewards are skipped."""
        try:
            group, inputs = self.rollouts.group(self.train_dataset[index], index, slot, self._seed(step, slot, 1))
        except BadExampleError as exc:
            if not self.config.skip_bad_examples:
                raise
            warnings.warn(f"skipping {exc}")
            self._step_skips[1] += 1
            self.skipped_examples += 1
            return None
        try:
            self.scoring.submit(slot, *inputs)
        except POLICY_ERRORS as exc:
            return self._skip_group(group.example_id, exc)
        return group

    def _with_rewards(self, pending: list[GroupRollout]) -> list[GroupRollout]:
        """The groups with their rewards (waited for); a group whose rewards failed is skipped or stops the
        run (`bad_reward_policy`), in slot order."""
        results = self.scoring.collect()
        groups = []
        for g in pending:
            values = results[g.slot]
            if isinstance(values, POLICY_ERRORS):
                self._skip_group(g.example_id, values)
                continue
            if isinstance(values, BaseException):
                raise values
            g.task_components = values
            g.task_reward = sum(w * values[name] for name, _, w in self.reward_funcs)
            groups.append(g)
        return groups

    def _skip_group(self, example_id: str, exc: BaseException) -> None:
        if self.config.bad_reward_policy != "skip":
            raise exc
        warnings.warn(f"skipping group of example {example_id!r}: {exc}")
        self._step_skips[0] += 1
        self.skipped_groups += 1

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
        self.scoring.begin_step()
        pending = [self._rollout(slot, index, step) for slot, index in self._step_slots(step)]
        groups = self._with_rewards([g for g in pending if g is not None])
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
        skips = self.collectives.sum(torch.tensor([*self._step_skips, self.scoring.retries], dtype=torch.float64)).tolist()
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
            "perf/reward_wait_s": self.scoring.wait_s,
            "reward/retries": int(skips[2]),
            "time_s": total_time,
        })
        return metrics

    # ------------------------------------------------------------------ evaluation (rcgrpo.train.evaluation)
    def evaluate(self, dataset=None, *, seed: int = 12345, ema: bool | None = None) -> float | None:
        """Mean task reward of the deterministic edit (one fixed noise per example) over `dataset` (default:
        the evaluation set), with the weights `evaluation_weights(ema)` gives (the EMA when it is on)."""
        return evaluation.evaluate(self, dataset if dataset is not None else self.eval_dataset, seed=seed, ema=ema)

    def evaluation_weights(self, ema: bool | None = None):
        """A context with the LoRA weights evaluation uses: the EMA when `ema` is True, or None and the EMA
        is on; the raw weights otherwise."""
        return evaluation.evaluation_weights(self.ema, ema)

    def periodic_evaluation(self) -> dict:
        return evaluation.periodic_evaluation(self)

    def edit_example(self, item, index: int, *, seed: int = 12345):
        """(image [3,H,W], task reward) of the edit of one example from a fixed seeded noise."""
        return evaluation.edit_example(self, item, index, seed=seed)

    def edit_input(self, item, index: int):
        """(image, mask, instruction, id, metadata) of a dataset item at the size the trainer edits it."""
        return self.rollouts.edit_input(item, index)

    def acd_text_weights(self, instruction: str, source: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ACD text weights the trainer uses for `instruction` (config `acd_text_tokens`); `source`
        `[1, 3, H, W]` is needed for families whose text encoder sees the image."""
        return self.rollouts.text_conditions(instruction, source).acd_weights

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run until `config.max_steps`; returns the last step's metrics."""
        cfg = self.config
        is_main = self.accelerator.is_main_process
        if is_main:
            prepare_run_directory(self.output_dir)
            clean_run_directory(self.output_dir)
            write_run_info(self.output_dir, SavedConfig(self.config), world_size=self.accelerator.num_processes,
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
                        evaluation.save_samples(self)
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
            self.scoring.close()
            self.run_log.finish()
        return metrics

    stopped_by_signal: int | None = None
    """The signal (SIGINT/SIGTERM, on any rank) that ended the last `train()` early, or None."""

    # ------------------------------------------------------------------ checkpoints (rcgrpo.train.state)
    def lora_state_dict(self) -> dict:
        return lora_state_dict(self.transformer)

    def save_lora(self, directory, *, ema: bool = False) -> Path:
        """Write `directory/pytorch_lora_weights.safetensors` in the editor family's diffusers format
        (atomically): the raw LoRA, or its EMA with `ema=True`."""
        return state.save_lora(self, directory, ema=ema)

    def save_checkpoint(self) -> Path | None:
        """Write `output_dir/checkpoint-<step>/` completely or not at all (rank 0); keep the last N."""
        return state.save_checkpoint(self)

    def load_checkpoint(self, path) -> dict:
        """Restore LoRA, optimizer, scheduler, RNG and step from a complete checkpoint directory; a change of
        the model or the LoRA's shape is refused, other changes are applied and returned (field → (saved, new))."""
        return state.load_checkpoint(self, path)

    def resume(self, path=None) -> bool:
        """Load the checkpoint `path` (a `checkpoint-N` directory) or the newest complete one of the run
        directory `path` (default: the run's); False when the run has none. The config changes applied
        (field → (saved, new)) are in `self.resume_changes`."""
        target = Path(path) if path else self.output_dir
        if not path and not list_checkpoints(target):
            return False
        self.resume_changes = self.load_checkpoint(find_checkpoint(target))
        return True

    resume_changes: dict = {}
