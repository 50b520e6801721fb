"""One GRPO iteration end to end: `RCGRPOTrainer.train_step()` on the tiny preset with w_acd on.

Each round is one full iteration (RDP rollouts with ACD capture, rewards, standardization, surrogate
update of the LoRA). Providers set both op backends of the config:
    kernels    acd_backend = distance_backend = "auto" (Triton on CUDA, C++ on CPU when built)
    torch_ref  acd_backend = distance_backend = "torch"
During the timed rounds the op implementations are wrapped with timers (inside this benchmark only,
via monkeypatch), which gives the time share of the ACD attention calls and of region_sq_dists
(forward and backward) in extra_info. On CUDA the timers synchronize around each op call, so shares
are exact attributions but the step itself gets slightly slower than without the timers.
`acd_overhead_share_est` compares the ACD calls with SDPA timed on the same call shapes afterwards:
the part of the step that ACD adds over plain attention.
"""
from __future__ import annotations

import collections
import os
import statistics
import importlib
import time

import pytest
import torch
import torch.nn.functional as F

import providers
import telemetry

E2E_PROVIDERS = {"torch_ref": "torch", "kernels": "auto"}  # baseline first
OP_KEYS = ("acd_attention", "region_sq_dists_fwd", "region_sq_dists_bwd")


class OpTimers:
    """Wraps `_run_backend` of acd_attention and `_forward`/`_backward` of region_sq_dists."""

    def __init__(self, monkeypatch, device: torch.device):
        self.device = device
        self.sync = providers.synchronizer(device)
        self.enabled = False
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self.backends: dict[str, set] = collections.defaultdict(set)
        self.acd_shapes = collections.Counter()
        # the package re-exports functions under the submodules' names: fetch the modules themselves
        attention_module = importlib.import_module("rcgrpo_kernels.acd_attention")
        distance_module = importlib.import_module("rcgrpo_kernels.region_sq_dists")

        monkeypatch.setattr(attention_module, "_run_backend",
                            self._wrap("acd_attention", attention_module._run_backend, 7))
        monkeypatch.setattr(distance_module, "_forward", self._wrap("region_sq_dists_fwd", distance_module._forward, 3))
        monkeypatch.setattr(distance_module, "_backward",
                            self._wrap("region_sq_dists_bwd", distance_module._backward, 4))

    def _wrap(self, key, fn, backend_arg):
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.sync()
            self.seconds[key] += time.perf_counter() - start
            self.calls[key] += 1
            self.backends[key].add(args[backend_arg])
            if key == "acd_attention":
                q = args[0]
                self.acd_shapes[(tuple(q.shape), q.dtype)] += 1
            return result
        return timed

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
    timers = OpTimers(monkeypatch, bench_device)
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
        "region_sq_dists_calls_per_step": med_of(lambda s: s["region_sq_dists_fwd_calls"] + s["region_sq_dists_bwd_calls"]),
        "region_sq_dists_fwd_s_per_step": med("region_sq_dists_fwd_s"),
        "region_sq_dists_bwd_s_per_step": med("region_sq_dists_bwd_s"),
        "region_sq_dists_share": share("region_sq_dists_fwd_s", "region_sq_dists_bwd_s"),
        "share_basis": "per timed step: op seconds / the step's own time_s; median over the timed steps",
        "telemetry": nvml.summary(),
    }
    extra.update(mem)
    bench_session.finish(benchmark, provider, median, extra)
