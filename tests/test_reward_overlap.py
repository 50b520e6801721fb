"""Rewards off the critical path (`rcgrpo.train.scoring`): background calls of asynchronous rewards,
bounded, collected before the advantages, errors at the step that owns them, and runs that equal the
synchronous path bit for bit (reward servers on 127.0.0.1, in this process)."""
import json
import threading
from pathlib import Path

import pytest
import torch

from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.rewards import EditScorePool, RewardServerError
from rcgrpo.testing import tiny_kontext_pipeline
from rcgrpo.train.config import preset
from rcgrpo.train.scoring import BadRewardError, RewardScheduler
from rcgrpo.train.trainer import RCGRPOTrainer
from test_reward_pool import Recorder, serving
from test_reward_server import free_port


class Remote:
    """An asynchronous reward: redness, after `gate` opens; NaN for examples whose metadata says so."""

    asynchronous = True

    def __init__(self, gate=None, error=None):
        self.gate = gate
        self.error = error
        self.lock = threading.Lock()
        self.running = self.most_running = self.calls = 0
        self.threads = set()
        self.devices = set()

    def __call__(self, edited, sources, masks, instructions, metadata):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most_running = max(self.most_running, self.running)
            self.threads.add(threading.current_thread().name)
            self.devices.add(edited.device.type)
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
            if self.error is not None:
                raise self.error
            values = redness_reward(edited, sources, masks, instructions, metadata)
            if metadata[0].get("bad"):
                values[1] = float("nan")
            return values
        finally:
            with self.lock:
                self.running -= 1


def batch(seed, g=4):
    gen = torch.Generator().manual_seed(seed)
    edited, sources = torch.rand(g, 3, 8, 8, generator=gen), torch.rand(g, 3, 8, 8, generator=gen)
    return edited, sources, torch.ones(g, 1, 8, 8), ["x"] * g, [{}] * g


# ---------------------------------------------------------------- the scheduler alone
def test_asynchronous_rewards_run_in_the_background_and_are_all_in_at_collect():
    gate = threading.Event()
    remote = Remote(gate)
    local_calls = []

    def local(edited, *args):
        local_calls.append(threading.current_thread().name)
        return edited.mean(dim=(1, 2, 3))

    scoring = RewardScheduler([("local", local, 1.0), ("remote", remote, 2.0)], overlap=True, max_in_flight=4)
    scoring.begin_step()
    for key in (7, 3):
        scoring.submit(key, *batch(key))  # returns while the remote reward waits for the gate
    assert local_calls == [threading.main_thread().name] * 2 and remote.calls <= 2 and remote.most_running <= 2
    gate.set()
    results = scoring.collect()
    assert list(results) == [7, 3]
    for key in (7, 3):
        edited, sources, masks, instructions, metadata = batch(key)
        assert list(results[key]) == ["local", "remote"]  # the reward order, whatever finished first
        assert torch.equal(results[key]["local"], edited.mean(dim=(1, 2, 3)))
        assert torch.equal(results[key]["remote"], redness_reward(edited, sources, masks, instructions, metadata))
    assert remote.threads and threading.main_thread().name not in remote.threads
    assert scoring.collect() == {}  # a step's groups are collected once


def test_background_calls_are_bounded():
    remote = Remote()
    release = threading.Semaphore(0)

    class Slow(Remote):
        def __call__(self, *args):
            assert release.acquire(timeout=30)
            return super().__call__(*args)

    slow = Slow()
    scoring = RewardScheduler([("slow", slow, 1.0)], overlap=True, max_in_flight=2)
    done = threading.Event()

    def submit_all():
        for key in range(5):
            scoring.submit(key, *batch(key))
        done.set()

    thread = threading.Thread(target=submit_all)
    thread.start()
    assert not done.wait(0.3)  # the third submit waits for a free slot
    for _ in range(5):
        release.release()
    thread.join(30)
    results = scoring.collect()
    assert sorted(results) == list(range(5)) and slow.most_running <= 2 and remote.calls == 0
    assert scoring.wait_s > 0


def test_without_overlap_every_reward_runs_inline_in_order_with_cpu_tensors_for_remote_ones():
    remote = Remote()
    order = []

    def local(edited, *args):
        order.append("local")
        return edited.mean(dim=(1, 2, 3))

    scoring = RewardScheduler([("remote", remote, 1.0), ("local", local, 1.0)], overlap=False)
    scoring.submit(0, *batch(0))
    assert remote.threads == {threading.main_thread().name} and remote.devices == {"cpu"}
    assert not scoring.overlap and order == ["local"]
    assert list(scoring.collect()[0]) == ["remote", "local"]
    with pytest.raises(ValueError, match="reserved"):
        RewardScheduler([("retries", local, 1.0)])
    with pytest.raises(ValueError, match="max_reward_requests_in_flight"):
        RewardScheduler([("local", local, 1.0)], max_in_flight=0)


# ---------------------------------------------------------------- the trainer
def small_config(tmp_path, name, **overrides):
    values = dict(group_size=4, num_anchors=2, groups_per_step=3, num_inference_steps=2, max_steps=2, train_size=4,
                  eval_size=0, reward_funcs=["redness", "editscore"], reward_weights=[1.0, 0.5], w_acd=0.5,
                  acd_backend="torch", distance_backend="torch", checkpoint_every=0, sample_every=0,
                  report_to="none", output_dir=str(tmp_path / name), learning_rate=1e-2, seed=3)
    values.update(overrides)
    return preset("tiny", **values)


def train(cfg, reward, data=None):
    tr = RCGRPOTrainer(tiny_kontext_pipeline(0), cfg, [("redness", redness_reward), ("editscore", reward)],
                       data if data is not None else SquareDataset(4, size=32))
    tr.train()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, tr.lora_state_dict()


def test_overlapped_runs_equal_the_synchronous_run_bit_for_bit(tmp_path):
    recorders = [Recorder() for _ in range(3)]
    with serving(recorders[0]) as a, serving(recorders[1]) as b, serving(recorders[2]) as c:
        def pool(urls):
            return EditScorePool(urls, batch_size=3, timeout=30)

        sync_rows, sync_lora = train(small_config(tmp_path, "sync", overlap_rewards=False), pool([a]))
        over_rows, over_lora = train(small_config(tmp_path, "overlap", max_reward_requests_in_flight=2),
                                     pool([a, b, c]))
    assert len(sync_rows) == len(over_rows) == 2
    keys = ("reward_mean", "reward_std_within_group", "reward/redness", "reward/editscore", "acd_mean", "loss",
            "policy_loss", "grad_norm", "policy_kl", "reward_std_within_group_values")
    for s, o in zip(sync_rows, over_rows):
        assert {k: s[k] for k in keys} == {k: o[k] for k in keys}
        assert s["reward/retries"] == o["reward/retries"] == 0
        assert isinstance(o["perf/reward_wait_s"], float) and 0 <= o["perf/reward_wait_s"] <= o["rollout_time_s"]
    assert sync_lora.keys() == over_lora.keys() and all(torch.equal(sync_lora[k], over_lora[k]) for k in sync_lora)
    assert all(recorders[i].seen for i in (1, 2))  # the overlapped run used all three servers
    assert len(recorders[0].seen) + len(recorders[1].seen) + len(recorders[2].seen) == 2 * (2 * 3 * 4)


def square_items(bad=()):
    return [{"image": e.image, "mask": e.mask, "instruction": e.instruction, "id": e.example_id,
             "metadata": {"bad": i in bad}} for i, e in enumerate(SquareDataset(4, size=32).examples)]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_background_reward_failure_surfaces_at_its_step_with_the_policy(tmp_path, policy):
    cfg = small_config(tmp_path, policy, bad_reward_policy=policy, groups_per_step=4, max_steps=1)
    data = square_items(bad={2})
    if policy == "stop":
        with pytest.raises(BadRewardError, match="reward 'editscore' returned non-finite values at indices \\[1\\]"):
            train(cfg, Remote(), data)
        return
    with pytest.warns(UserWarning, match="skipping group of example 'square-2'"):
        rows, _ = train(cfg, Remote(), data)
    assert rows[0]["groups"] == 3 and rows[0]["skipped_groups"] == 1


def test_a_failure_the_policy_does_not_cover_stops_the_run_even_with_skip(tmp_path):
    error = RewardServerError("reward server at http://x answered POST /score with HTTP 401", url="http://x",
                              status=401)
    cfg = small_config(tmp_path, "run", bad_reward_policy="skip", max_steps=1)
    with pytest.raises(RewardServerError, match="HTTP 401"):
        train(cfg, Remote(error=error))


def test_no_usable_reward_server_skips_the_group_under_skip_and_stops_otherwise(tmp_path):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    cfg = small_config(tmp_path, "skip", bad_reward_policy="skip", max_steps=1, groups_per_step=2)
    pool = EditScorePool(dead, timeout=2, unavailable_timeout=0.2, probe_interval=0.05)
    with pytest.warns(UserWarning, match="no reward server scored"):
        rows, _ = train(cfg, pool)
    assert rows[0]["groups"] == 0 and rows[0]["skipped_groups"] == 2 and rows[0]["skipped_update"]
    cfg = small_config(tmp_path, "stop", max_steps=1)
    pool = EditScorePool(dead, timeout=2, unavailable_timeout=0.2, probe_interval=0.05)
    with pytest.raises(RewardServerError, match=f"no reward server scored.*{dead[0]}.*{dead[1]}"):
        train(cfg, pool)


def test_a_new_step_drops_what_an_aborted_step_left():
    remote = Remote()
    scoring = RewardScheduler([("remote", remote, 1.0)], overlap=True)
    scoring.begin_step()
    scoring.submit(0, *batch(0))
    with pytest.raises(ValueError, match="already submitted"):
        scoring.submit(0, *batch(1))
    scoring.begin_step()  # e.g. the step raised before its collect
    scoring.submit(0, *batch(1))
    results = scoring.collect()
    edited, sources, masks, instructions, metadata = batch(1)
    assert list(results) == [0]
    assert torch.equal(results[0]["remote"], redness_reward(edited, sources, masks, instructions, metadata))
