"""One GRPO iteration end to end: `RCGRPOTrainer.train_step()` on the tiny preset with w_acd on.

Each round is one full iteration (RDP rollouts with ACD capture, rewards, standardization, surrogate
update of the LoRA). Providers set both op backends of the config:
    kernels    acd_backend = distance_backend = "auto" (Triton on CUDA, C++ on CPU when built)
    torch_ref  acd_backend = distance_backend = "torch"
During the timed rounds a listener of the trainer's own phases (`trainer.phases`, see
rcgrpo.train.phases) times the ACD attention calls (phase `acd`) and region_sq_dists forward and
backward (phase `distances`), which gives their time shares in extra_info; nothing in the package is
replaced. On CUDA the listener synchronizes at each phase boundary, so shares are exact attributions
but the step itself gets slightly slower than without it.
`acd_overhead_share_est` compares the ACD calls with SDPA timed on the same call shapes afterwards:
the part of the step that ACD adds over plain attention.
"""
from __future__ import annotations

import collections
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import providers
import telemetry

E2E_PROVIDERS = {"torch_ref": "torch", "kernels": "auto"}  # baseline first
OP_KEYS = ("acd_attention", "region_sq_dists")


class OpTimers:
    """A listener of the trainer's phases: seconds and calls of `acd` and `distances` (forward inside
    the update, backward inside loss.backward()), and the shapes of the ACD calls (from the config)."""

    PHASES = {"acd": "acd_attention", "distances": "region_sq_dists"}

    def __init__(self, trainer, device: torch.device):
        from rcgrpo_kernels import resolve_backend

        self.device = device
        self.sync = providers.synchronizer(device)
        self.enabled = False
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self._open: dict[str, list[float]] = collections.defaultdict(list)
        cfg = trainer.config
        self.backends = {"acd_attention": {resolve_backend(cfg.acd_backend, device, "acd_attention")},
                         "region_sq_dists": {resolve_backend(cfg.distance_backend, device, "region_sq_dists")}}
        tcfg = trainer.transformer.config
        n_img = (cfg.resolution // (2 * trainer.pipe.vae_scale_factor)) ** 2
        shape = (cfg.group_size, tcfg.num_attention_heads, cfg.max_sequence_length + 2 * n_img,
                 tcfg.attention_head_dim)
        self.acd_shape = (shape, trainer.transformer.dtype)
        trainer.phases.add_listener(self)

    def phase_start(self, name):
        if self.enabled and name in self.PHASES:
            self.sync()
            self._open[name].append(time.perf_counter())

    def phase_end(self, name, error=None):
        if self.enabled and name in self.PHASES and self._open[name]:
            self.sync()
            key = self.PHASES[name]
            self.seconds[key] += time.perf_counter() - self._open[name].pop()
            self.calls[key] += 1

    @property
    def acd_shapes(self):
        return {self.acd_shape: self.calls["acd_attention"]}

    def sdpa_equivalent_s(self, reps: int = 21) -> float:
        """Total time SDPA takes on the recorded ACD call shapes (same counts; median of `reps` per shape)."""
        total = 0.0
        for (shape, dtype), count in self.acd_shapes.items():
            q, k, v = (torch.randn(shape, device=self.device, dtype=dtype) for _ in range(3))
            times = []
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)
                for _ in range(reps):
                    self.sync()
                    start = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v)
                    self.sync()
                    times.append(time.perf_counter() - start)
            total += statistics.median(times) * count
        return total


def _build_trainer(backend: str, output_dir):
    from rcgrpo.train.config import preset
    from rcgrpo.testing import tiny_kontext_pipeline
    from rcgrpo.rewards.registry import reward_funcs_from_config
    from rcgrpo.train.data import build_datasets
    from rcgrpo.train.trainer import RCGRPOTrainer

    config = preset("tiny", output_dir=str(output_dir), acd_backend=backend, distance_backend=backend,
                    device="cuda" if providers.bench_device().type == "cuda" else "cpu")
    assert config.w_acd > 0, "the tiny preset must have ACD on for this benchmark"
    train, held_out = build_datasets(config)
    trainer = RCGRPOTrainer(tiny_kontext_pipeline(), config, reward_funcs_from_config(config), train, held_out)
    return trainer, config


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("provider", list(E2E_PROVIDERS))
def test_grpo_iteration(benchmark, bench_session, bench_device, monkeypatch, tmp_path, provider):
    pytest.importorskip("diffusers", reason="the end-to-end benchmark needs diffusers")
    backend = E2E_PROVIDERS[provider]
    trainer, config = _build_trainer(backend, tmp_path / provider)
    benchmark.group = (f"grpo_iteration tiny: G={config.group_size} groups={config.groups_per_step} "
                       f"T={config.num_inference_steps} {config.resolution}px w_acd={config.w_acd}")
    timers = OpTimers(trainer, bench_device)
    sync = providers.synchronizer(bench_device)

    per_step: list[dict] = []  # op seconds/calls and the step's own metrics, one entry per timed step

    def step():
        before_s, before_n = dict(timers.seconds), dict(timers.calls)
        metrics = trainer.train_step()
        trainer.step += 1
        sync()
        if timers.enabled:
            per_step.append({
                "time_s": metrics["time_s"], "rollout_time_s": metrics["rollout_time_s"],
                **{f"{k}_s": timers.seconds[k] - before_s.get(k, 0.0) for k in OP_KEYS},
                **{f"{k}_calls": timers.calls[k] - before_n.get(k, 0) for k in OP_KEYS},
            })
        return metrics

    step()  # first iteration: lazy initialisation, kernel compilation/autotuning
    t0 = time.perf_counter()
    if bench_device.type == "cuda":
        mem = {"peak_mem_mb": providers.cuda_peak_mb(step, bench_device), "peak_mem_method": providers.CUDA_MEM_METHOD}
    else:
        mb, method = providers.rss_peak_growth_mb(step)
        mem = {"peak_mem_mb": mb, "peak_mem_method": f"in-process {method} over one train_step "
               "(approximate: memory freed by earlier steps may be reused without RSS growth)"}
    once = time.perf_counter() - t0
    timers.enabled = True
    # Rounds: RCGRPO_BENCH_E2E_ROUNDS, else about 2× the per-provider target time (5 to 20 steps).
    knobs = providers.timing_knobs(bench_device)
    rounds = int(os.environ.get("RCGRPO_BENCH_E2E_ROUNDS") or min(max(round(2 * knobs["target_s"] / once), 5), 20))
    with telemetry.NvmlSampler(bench_device) as nvml:
        median = providers.run_benchmark(benchmark, step, bench_device, rounds=rounds, warmup_rounds=0,
                                         prewarm=False)
    timers.enabled = False

    # Shares per step, then the median over steps: robust to a step slowed down by a noisy neighbour.
    def med(key):
        return statistics.median(s[key] for s in per_step) if per_step else None

    def share(*keys):
        return med_of(lambda s: sum(s[k] for k in keys) / s["time_s"])

    def med_of(fn):
        return statistics.median(fn(s) for s in per_step) if per_step else None

    sdpa_s = timers.sdpa_equivalent_s() / max(len(per_step), 1)
    extra = {
        "op": "grpo_iteration",
        "config": {k: getattr(config, k) for k in ("group_size", "groups_per_step", "num_inference_steps",
                                                       "resolution", "num_anchors", "acd_layers", "w_acd",
                                                       "acd_backend", "distance_backend")},
        "backends_used": {k: sorted(v) for k, v in timers.backends.items()},
        "steps_timed": len(per_step),
        "step_median_s": med("time_s"),
        "rollout_share": share("rollout_time_s"),
        "acd_attention_calls_per_step": med("acd_attention_calls"),
        "acd_attention_s_per_step": med("acd_attention_s"),
        "acd_attention_share": share("acd_attention_s"),
        "sdpa_equivalent_s_per_step": sdpa_s,
        "acd_overhead_share_est": med_of(lambda s: (s["acd_attention_s"] - sdpa_s) / s["time_s"]),
        "region_sq_dists_phases_per_step": med("region_sq_dists_calls"),
        "region_sq_dists_s_per_step": med("region_sq_dists_s"),
        "region_sq_dists_share": share("region_sq_dists_s"),
        "share_basis": "per timed step: op seconds / the step's own time_s; median over the timed steps",
        "telemetry": nvml.summary(),
    }
    extra.update(mem)
    bench_session.finish(benchmark, provider, median, extra)
