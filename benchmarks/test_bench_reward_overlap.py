"""Rewards off the critical path, measured: the GRPO step of the tiny MiniBench editor whose task reward
comes from reward servers on 127.0.0.1 (`python -m rcgrpo.reward_server --scorer
rcgrpo.rewards.latency_scorer:score`, which waits `$RCGRPO_SCORER_LATENCY_S` per image, as EditScore's
model would, and scores deterministically).

Groups and providers (ratios only within one run; `benchmarks/reward_overlap.py` runs this file and
writes the JSON and a Markdown table):
    reward_overlap latency=L   one process, one server: `sync` (overlap_rewards off: each group waits for
                               its rewards before the next rollout) and `overlap` (rewards of a group in
                               the background while the next group rolls out), at each latency L
    reward_servers latency=L   two processes (torchrun, gloo), the largest L: `sync_1_server`,
                               `overlap_1_server`, `overlap_3_servers`
Each round is one `train_step()`. In-process groups: one untimed step, then the timed rounds. The
torchrun providers run one job each (one pytest-benchmark round = the whole job, start-up included);
their step times come from the job's metrics.jsonl (timed steps after one untimed step). Every
provider records, per timed step, `time_s`, `rollout_time_s` (start of the step to all rewards in),
`perf/reward_wait_s` and `reward/retries` in extra_info, with their medians.

Settings (the `minibench` preset, small): tiny editor, 64 px, G = 8, T = 8, 4 train transitions,
`RCGRPO_BENCH_GROUPS` groups per step and process (default 4), one request per group (batch = G),
`max_reward_requests_in_flight` = groups, ACD and distance ops on the torch backend (the C++ backends'
OpenMP threads collapse when the servers and the client threads share the cores). Knobs:
`RCGRPO_BENCH_REWARD_LATENCIES` (s per image, comma-separated, default "0.05,0.2": 0.4 and 1.6 s per group of 8),
`RCGRPO_BENCH_E2E_ROUNDS` (timed steps, default 5), `RCGRPO_BENCH_GROUPS`, `RCGRPO_BENCH_TORCH_THREADS`
(CPU only, default 1).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import providers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _floats(name: str, default: str) -> list[float]:
    return [float(x) for x in (os.environ.get(name, "").strip() or default).split(",") if x.strip()]


LATENCIES = _floats("RCGRPO_BENCH_REWARD_LATENCIES", "0.05,0.2")
ROUNDS = int(os.environ.get("RCGRPO_BENCH_E2E_ROUNDS", "").strip() or 5)
GROUPS = int(os.environ.get("RCGRPO_BENCH_GROUPS", "").strip() or 4)
SERVERS = 3
STEP_KEYS = ("time_s", "rollout_time_s", "perf/reward_wait_s", "reward/retries")


def settings(output_dir, urls, *, overlap: bool, device: str) -> dict:
    """The RCGRPOConfig values of every provider (only the URLs and `overlap_rewards` differ)."""
    return dict(output_dir=str(output_dir), report_to="none", checkpoint_every=0, sample_every=0, eval_size=0,
                train_size=64, groups_per_step=GROUPS, reward_funcs=["editscore"], reward_weights=[],
                editscore_url=",".join(urls), editscore_batch_size=8, editscore_timeout=120.0,
                overlap_rewards=overlap, max_reward_requests_in_flight=GROUPS, acd_backend="torch",
                distance_backend="torch", device=device, max_steps=10_000)


# ---------------------------------------------------------------- reward servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerSet:
    """`count` reward server processes with the latency scorer; killed at `close`."""

    def __init__(self, latency: float, count: int):
        env = {k: v for k, v in os.environ.items() if k != "RCGRPO_REWARD_TOKEN"}
        env["RCGRPO_SCORER_LATENCY_S"] = repr(latency)
        self.procs, self.urls = [], []
        for _ in range(count):
            port = _free_port()
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "rcgrpo.reward_server", "--port", str(port), "--scorer",
                 "rcgrpo.rewards.latency_scorer:score"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        for url, proc in zip(self.urls, self.procs):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"reward server {url} exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"reward server {url} did not start in 180 s") from None
                    time.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def servers():
    started: dict[float, ServerSet] = {}

    def get(latency: float) -> ServerSet:
        if latency not in started:
            started[latency] = ServerSet(latency, SERVERS)
        return started[latency]

    yield get
    for s in started.values():
        s.close()


@pytest.fixture(autouse=True)
def _torch_threads(bench_device):
    """On a CPU the benchmark process uses `RCGRPO_BENCH_TORCH_THREADS` torch threads (default 1, as each
    torchrun process gets OMP_NUM_THREADS=1): OpenMP threads that spin while the servers and the client
    threads take a core make the timings collapse on a small shared machine."""
    import torch

    before = torch.get_num_threads()
    if bench_device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("RCGRPO_BENCH_TORCH_THREADS", "").strip() or 1))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def _medians(per_step: list[dict]) -> dict:
    out = {f"{k}_median": statistics.median(s[k] for s in per_step) for k in STEP_KEYS} if per_step else {}
    if per_step:
        out["rollouts_alone_s_median"] = statistics.median(s["rollout_time_s"] - s["perf/reward_wait_s"]
                                                           for s in per_step)
    return out


def _common(latency: float) -> dict:
    return {"latency_s_per_image": latency, "group_size": 8, "groups_per_step": GROUPS,
            "reward_s_per_group": latency * 8, "timed_steps": ROUNDS}


# ---------------------------------------------------------------- one process: sync vs overlap
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("latency", LATENCIES)
@pytest.mark.parametrize("provider", ["sync", "overlap"])
def test_reward_overlap(benchmark, bench_session, bench_device, servers, tmp_path, latency, provider, _torch_threads):
    from rcgrpo.rewards.registry import reward_funcs_from_config
    from rcgrpo.testing import tiny_editor
    from rcgrpo.train.config import preset
    from rcgrpo.train.data import build_datasets
    from rcgrpo.train.trainer import RCGRPOTrainer

    urls = servers(latency).urls[:1]
    config = preset("minibench", **settings(tmp_path / provider, urls, overlap=provider == "overlap",
                                            device=bench_device.type))
    train, held_out = build_datasets(config)
    trainer = RCGRPOTrainer(tiny_editor(device=bench_device), config, reward_funcs_from_config(config), train,
                            held_out)
    benchmark.group = f"reward_overlap latency={latency:g}s/image (1 process, 1 server)"
    sync = providers.synchronizer(bench_device)
    per_step: list[dict] = []
    timing = [False]

    def step():
        metrics = trainer.train_step()
        trainer.step += 1
        sync()
        if timing[0]:
            per_step.append({k: metrics[k] for k in STEP_KEYS})

    step()  # untimed: lazy initialisation, first connections
    timing[0] = True
    median = providers.run_benchmark(benchmark, step, bench_device, rounds=ROUNDS, warmup_rounds=0, prewarm=False)
    extra = {"op": "reward_overlap", "processes": 1, "servers": 1, "overlap": provider == "overlap",
             "torch_threads": _torch_threads,
             **_common(latency), "per_step": per_step, **_medians(per_step)}
    bench_session.finish(benchmark, provider, median, extra)


# ---------------------------------------------------------------- two processes: 1 vs 3 servers
WORKER = r'''
import json, sys, time
from pathlib import Path
import torch
from rcgrpo.rewards.registry import reward_funcs_from_config
from rcgrpo.testing import tiny_editor
from rcgrpo.train.config import preset
from rcgrpo.train.data import build_datasets
from rcgrpo.train.trainer import RCGRPOTrainer

spec = json.loads(sys.argv[1])
config = preset("minibench", **spec["settings"])
train, held_out = build_datasets(config)
trainer = RCGRPOTrainer(tiny_editor(device=spec["device"]), config, reward_funcs_from_config(config), train, held_out)
rows = []
for i in range(spec["steps"] + 1):
    metrics = trainer.train_step()
    trainer.step += 1
    if i:
        rows.append({k: metrics[k] for k in spec["keys"]})
rank = trainer.accelerator.process_index
Path(spec["out"]).mkdir(parents=True, exist_ok=True)
(Path(spec["out"]) / f"steps-rank{rank}.json").write_text(json.dumps(rows))
'''

TWO_PROCESS = {"sync_1_server": (False, 1), "overlap_1_server": (True, 1), "overlap_3_servers": (True, SERVERS)}


@pytest.mark.parametrize("provider", list(TWO_PROCESS))
def test_reward_servers_two_processes(benchmark, bench_session, servers, tmp_path, provider):
    latency = max(LATENCIES)
    overlap, count = TWO_PROCESS[provider]
    urls = servers(latency).urls[:count]
    device = "cuda" if providers.bench_device().type == "cuda" and _cuda_devices() >= 2 else "cpu"
    out = tmp_path / provider
    spec = {"settings": settings(out / "run", urls, overlap=overlap, device=device), "device": device,
            "steps": ROUNDS, "keys": list(STEP_KEYS), "out": str(out)}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), json.dumps(spec)]

    def job():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-4000:]

    benchmark.group = f"reward_servers latency={latency:g}s/image (2 processes, torchrun)"
    benchmark.pedantic(job, rounds=1, iterations=1, warmup_rounds=0)
    ranks = [json.loads((out / f"steps-rank{r}.json").read_text()) for r in range(2)]
    per_step = [{k: max(rank[i][k] for rank in ranks) for k in STEP_KEYS} for i in range(len(ranks[0]))]
    extra = {"op": "reward_servers", "processes": 2, "servers": count, "overlap": overlap, "device": device,
             **_common(latency), "per_step": per_step, "per_step_basis": "max over the 2 ranks", **_medians(per_step),
             "job_includes_startup": True}
    bench_session.finish(benchmark, provider, extra.get("time_s_median"), extra)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()
