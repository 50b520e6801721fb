"""Fault test: three reward server processes on 127.0.0.1 (`python -m rcgrpo.reward_server --scorer
rcgrpo.rewards.latency_scorer:score`); one is killed while a request of the run is in flight to it and
restarted on its port at the start of the next step. The run finishes with the rewards, losses and LoRA of an
undisturbed run, and metrics.jsonl counts the resent requests and the time spent waiting for rewards.
Every wait is bounded."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.rewards import EditScorePool
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.config import preset
from rcgrpo.train.trainer import RCGRPOTrainer
from test_reward_server import clean_env, free_port

pytestmark = pytest.mark.slow
LATENCY_S = "0.1"  # per image: a batch of 2 is in flight for about 0.2 s


def start(port: int) -> subprocess.Popen:
    env = clean_env(RCGRPO_SCORER_LATENCY_S=LATENCY_S)
    return subprocess.Popen([sys.executable, "-m", "rcgrpo.reward_server", "--port", str(port), "--scorer",
                             "rcgrpo.rewards.latency_scorer:score"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=2) as resp:
        return json.loads(resp.read())


def wait_healthy(procs: dict, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    for url, proc in procs.items():
        while True:
            assert proc.poll() is None, f"reward server {url} exited with {proc.returncode}"
            try:
                get(url, "/health")
                break
            except OSError:
                assert time.monotonic() < deadline, f"reward server {url} did not start"
                time.sleep(0.1)


def scored(url: str) -> int:
    return sum(get(url, "/metrics")["requests"]["by_path"].get("/score", {}).values())


class Saboteur:
    """A listener of the trainer's phases (3 groups a step): when the 2nd group of step 2 starts its rollout,
    kills a server with a request of the 1st group in flight; when step 3 starts, restarts it on its port."""

    def __init__(self, pool, procs: dict):
        self.pool, self.procs = pool, procs
        self.rollouts = 0
        self.killed = None

    def phase_start(self, name):
        if name != "rollout":
            return
        self.rollouts += 1
        if self.rollouts == 5:
            deadline = time.monotonic() + 10
            while not any(s["outstanding"] for s in self.pool.status()):
                assert time.monotonic() < deadline, "no request in flight to kill"
                time.sleep(0.005)
            self.killed = next(s["url"] for s in self.pool.status() if s["outstanding"])
            self.procs[self.killed].kill()
            self.procs[self.killed].wait(10)
        elif self.rollouts == 7:
            port = int(self.killed.rsplit(":", 1)[1])
            self.procs[self.killed] = start(port)
            wait_healthy({self.killed: self.procs[self.killed]})

    def phase_end(self, name, error):
        pass


def run(tmp_path, name, urls, procs=None):
    cfg = preset("tiny", group_size=4, num_anchors=2, groups_per_step=3, num_inference_steps=2, max_steps=4,
                 train_size=4, eval_size=0, reward_funcs=["redness", "editscore"], reward_weights=[1.0, 1.0],
                 w_acd=0.5, acd_backend="torch", distance_backend="torch", checkpoint_every=0, sample_every=0,
                 report_to="none", output_dir=str(tmp_path / name), editscore_batch_size=2)
    pool = EditScorePool(urls, batch_size=2, timeout=20, probe_interval=0.1, max_probe_interval=0.5)
    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", redness_reward), ("editscore", pool)],
                       SquareDataset(4, size=32))
    saboteur = None
    if procs is not None:
        saboteur = Saboteur(pool, procs)
        tr.phases.add_listener(saboteur)
    tr.train()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, tr.lora_state_dict(), saboteur


def test_a_server_killed_mid_run_and_restarted_changes_nothing_but_the_retries(tmp_path):
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = {url: start(port) for url, port in zip(urls, ports)}
    try:
        wait_healthy(procs)
        calm_rows, calm_lora, _ = run(tmp_path, "calm", urls)
        rows, lora, saboteur = run(tmp_path, "fault", urls, procs)
        restarted_scored = scored(saboteur.killed)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)
    assert saboteur.killed and saboteur.rollouts == 12
    keys = ("reward_mean", "reward/redness", "reward/editscore", "reward_std_within_group_values", "loss", "groups")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in calm_rows]
    assert all(torch.equal(lora[k], calm_lora[k]) for k in calm_lora)
    assert all(r["reward/retries"] == 0 for r in calm_rows)
    assert rows[1]["reward/retries"] >= 1 and sum(r["reward/retries"] for r in rows) >= 1  # the kill, in step 2
    assert rows[0]["reward/retries"] == 0
    assert all(isinstance(r["perf/reward_wait_s"], float) and r["perf/reward_wait_s"] >= 0 for r in rows)
    assert restarted_scored >= 1  # the restarted server was probed back and scored batches of steps 3-4
    assert os.path.exists(tmp_path / "fault" / "lora" / "pytorch_lora_weights.safetensors")
