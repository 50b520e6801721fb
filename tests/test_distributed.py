"""Several processes agree (torchrun, gloo on the CPU): collectives on every path, global metrics,
stop requests, only rank 0 writes, several nodes. Every run has a timeout, so a hang fails the test."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
pytestmark = pytest.mark.slow

WORKER = r'''
import json, os, signal, sys
from pathlib import Path
import torch
import rcgrpo.train.state as state_module
import rcgrpo.train.trainer as trainer_module
from rcgrpo.train.config import preset
from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.testing import tiny_kontext_pipeline, tiny_qwen_editor

spec = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
out = Path(spec["out"])
if rank != 0:  # a write by any other rank leaves a marker
    def forbidden(name, real):
        def wrapper(*args, **kwargs):
            (out.parent / f"rank{rank}-wrote-{name}").write_text("x")
            return real(*args, **kwargs)
        return wrapper
    state_module.write_checkpoint = forbidden("checkpoint", state_module.write_checkpoint)
    state_module.write_lora = forbidden("lora", state_module.write_lora)
calls = [0]
def reward(edited, sources, masks, instructions, metadata):
    calls[0] += 1
    if spec.get("signal_rank") == rank and calls[0] == spec.get("signal_at_call"):
        os.kill(os.getpid(), signal.SIGTERM)
    values = redness_reward(edited, sources, masks, instructions, metadata)
    if metadata[0].get("constant"):  # a group with one reward: the low-variance filter's case
        values = torch.full_like(values, 0.5)
    return values
rewards, weights = [("redness", reward)], [1.0]
if spec.get("urls"):  # remote rewards: reward servers on 127.0.0.1 (rank dead_rank gets URLs nobody serves)
    from rcgrpo.rewards import EditScorePool
    urls = spec["dead_urls"] if rank == spec.get("dead_rank") else spec["urls"]
    rewards.append(("editscore", EditScorePool(urls, batch_size=3, timeout=30, unavailable_timeout=0.5,
                                               probe_interval=0.1)))
    weights.append(0.5)
qwen = spec.get("model") == "tiny-qwen"  # the second editor family: 64 px (16-pixel tokens), 2 blocks
size = 64 if qwen else 32
cfg = preset("tiny", group_size=4, num_anchors=2, groups_per_step=spec["groups"], num_inference_steps=2,
             max_steps=spec.get("max_steps", 2), reward_funcs=[n for n, _ in rewards], reward_weights=weights,
             w_acd=0.5, acd_backend="torch", distance_backend="torch", checkpoint_every=0, sample_every=0,
             report_to="none", output_dir=str(out), train_size=4, max_grad_norm=0.0, skip_bad_examples=True,
             log_policy_kl=True, resolution=size, acd_layers=2 if qwen else 4,
             **({"guidance_scale": 4.0} if qwen else {}), **spec.get("config", {}))
data = SquareDataset(4, size=size)
for i in spec.get("bad_examples", []):
    data.examples[i].mask = torch.zeros(32, 32)
for i in spec.get("constant_examples", []):
    data.examples[i].metadata["constant"] = True
held = SquareDataset(3, size=size, seed=99) if spec.get("config", {}).get("eval_every") else None
model = tiny_qwen_editor() if qwen else tiny_kontext_pipeline(0)
tr = trainer_module.RCGRPOTrainer(model, cfg, rewards, data, held)
tr.train()
if tr.accelerator.is_main_process:
    torch.save(torch.cat([p.detach().reshape(-1) for p in tr.lora_parameters]), out / "lora_vector.pt")
# one file per rank: the ranks share torchrun's stdout, where their lines can interleave
result = json.dumps({"rank": rank, "step": tr.step, "stopped": tr.stopped_by_signal})
out.parent.mkdir(parents=True, exist_ok=True)
(out.parent / f"result-rank{rank}.json.tmp").write_text(result)
os.replace(out.parent / f"result-rank{rank}.json.tmp", out.parent / f"result-rank{rank}.json")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="1")


def _torchrun(tmp_path, spec, *, nproc, extra=()):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra, str(script),
           json.dumps(spec)]
    if not extra:
        cmd[3:3] = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return cmd


def run(tmp_path, spec, *, nproc):
    proc = subprocess.run(_torchrun(tmp_path, spec, nproc=nproc), env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = _results(Path(spec["out"]).parent)
    assert [r["rank"] for r in results] == list(range(nproc)), proc.stderr[-4000:]
    return results


def _results(run_parent: Path) -> list[dict]:
    """What each rank's worker reported at its end, in rank order."""
    return sorted((json.loads(p.read_text()) for p in run_parent.glob("result-rank*.json")), key=lambda r: r["rank"])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# every step metric that is a number (SPEC §10 and issue 24's diagnostics), compared between layouts
COMPARED = ("reward_mean", "reward_std_within_group", "acd_mean", "background_drift", "loss", "policy_kl", "approx_kl",
            "clip_frac_high", "clip_frac_low", "leap_rms_edit", "leap_rms_background", "explore_rms_edit",
            "explore_rms_background", "reward_std_between_groups", "low_variance_fraction", "filtered_groups",
            "reference_reward_gap", "advantage_abs_mean", "policy_entropy", "pi_old_anchor")


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen"])
def test_two_processes_log_and_learn_what_one_process_with_two_groups_does(tmp_path, model):
    run(tmp_path, {"out": str(tmp_path / "one" / "run"), "groups": 2, "model": model}, nproc=1)
    results = run(tmp_path, {"out": str(tmp_path / "two" / "run"), "groups": 1, "model": model}, nproc=2)
    assert [r["step"] for r in results] == [2, 2]
    one, two = _metrics(tmp_path / "one" / "run"), _metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in two] == [1, 2] and [r["groups"] for r in two] == [2, 2]
    for a, b in zip(one, two):
        for key in COMPARED:
            assert a[key] is not None and b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        assert b["reward_std_within_group_values"] == pytest.approx(a["reward_std_within_group_values"], rel=1e-5)
        assert b["background_drift_values"] == pytest.approx(a["background_drift_values"], rel=1e-5, abs=1e-9)
    lora_one = torch.load(tmp_path / "one" / "run" / "lora_vector.pt", weights_only=True)
    lora_two = torch.load(tmp_path / "two" / "run" / "lora_vector.pt", weights_only=True)
    torch.testing.assert_close(lora_two, lora_one, rtol=1e-5, atol=1e-7)
    assert not list((tmp_path / "two").glob("rank1-wrote-*")), "only rank 0 may write checkpoints and the LoRA"
    assert (tmp_path / "two" / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_rank_whose_groups_are_all_skipped_still_joins_every_collective(tmp_path):
    # 2 examples, one bad: every step one rank has only the bad example and skips its group.
    spec = {"out": str(tmp_path / "run"), "groups": 1, "bad_examples": [1, 3]}
    results = run(tmp_path, spec, nproc=2)
    assert [r["step"] for r in results] == [2, 2]
    rows = _metrics(tmp_path / "run")
    assert any(r["groups"] == 1 for r in rows), "the seed should give a step where exactly one rank skips"
    assert rows[-1]["skipped_examples"] == sum(2 - r["groups"] for r in rows)  # counted over both ranks


def test_filter_global_advantages_ema_and_evaluation_agree_across_layouts(tmp_path):
    # examples 1 and 3 have a constant reward: with the filter on, a rank holding only such a group gives
    # it no update but still joins the global std, the gradient reduce and the evaluation's sum
    options = {"filter_low_variance": True, "low_variance_threshold": 1e-4, "advantage_std": "global",
               "ema_decay": 0.5, "eval_every": 1}
    spec = {"config": options, "constant_examples": [1, 3], "max_steps": 3}
    run(tmp_path, {**spec, "out": str(tmp_path / "one" / "run"), "groups": 2}, nproc=1)
    results = run(tmp_path, {**spec, "out": str(tmp_path / "two" / "run"), "groups": 1}, nproc=2)
    assert [r["step"] for r in results] == [3, 3]
    one, two = _metrics(tmp_path / "one" / "run"), _metrics(tmp_path / "two" / "run")
    assert len(one) == len(two) == 3
    assert any(r["filtered_groups"] == 1 for r in two), "the data order should filter one of two groups"
    for a, b in zip(one, two):
        for key in COMPARED + ("eval/task_reward", "eval/task_reward_ema"):
            assert (a[key] is None) == (b[key] is None), key
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    lora_one = torch.load(tmp_path / "one" / "run" / "lora_vector.pt", weights_only=True)
    lora_two = torch.load(tmp_path / "two" / "run" / "lora_vector.pt", weights_only=True)
    torch.testing.assert_close(lora_two, lora_one, rtol=1e-5, atol=1e-7)
    assert (tmp_path / "two" / "run" / "lora_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert not list((tmp_path / "two").glob("rank1-wrote-*"))


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    spec = {"out": str(tmp_path / "run"), "groups": 1, "max_steps": 50, "signal_rank": 1, "signal_at_call": 2}
    results = run(tmp_path, spec, nproc=2)
    assert [r["stopped"] for r in results] == [15, 15]  # SIGTERM, seen by rank 0 through the agreement
    assert results[0]["step"] == results[1]["step"] == 2
    from rcgrpo.train.checkpoints import list_checkpoints

    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]


def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path):
    port = _free_port()
    procs = []
    for node in (0, 1):
        rdzv = ["--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        node_dir = tmp_path / f"node{node}"
        node_dir.mkdir()
        cmd = _torchrun(node_dir, {"out": str(tmp_path / "nodes" / "run"), "groups": 1}, nproc=1, extra=rdzv)
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, stderr[-4000:]
            outputs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert len(outputs) == 2 and [r["step"] for r in _results(tmp_path / "nodes")] == [2, 2]
    run(tmp_path, {"out": str(tmp_path / "single" / "run"), "groups": 1}, nproc=2)
    nodes = torch.load(tmp_path / "nodes" / "run" / "lora_vector.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "run" / "lora_vector.pt", weights_only=True)
    torch.testing.assert_close(nodes, single, rtol=1e-5, atol=1e-7)


def test_two_processes_with_remote_rewards_give_the_same_run_with_and_without_overlap(tmp_path):
    from test_reward_pool import Recorder, serving
    from test_reward_server import free_port

    recorders = [Recorder() for _ in range(3)]
    with serving(recorders[0]) as a, serving(recorders[1]) as b, serving(recorders[2]) as c:
        for name, overlap in (("sync", False), ("overlap", True)):
            spec = {"out": str(tmp_path / name / "run"), "groups": 2, "urls": [a, b, c],
                    "config": {"overlap_rewards": overlap, "max_reward_requests_in_flight": 2}}
            assert [r["step"] for r in run(tmp_path, spec, nproc=2)] == [2, 2]
        # rank 1's servers are all down: its groups are skipped at the step that owns them, rank 0 goes on
        dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        spec = {"out": str(tmp_path / "dead" / "run"), "groups": 2, "urls": [a, b, c], "dead_urls": dead,
                "dead_rank": 1, "config": {"bad_reward_policy": "skip"}}
        assert [r["step"] for r in run(tmp_path, spec, nproc=2)] == [2, 2]
    sync, over = _metrics(tmp_path / "sync" / "run"), _metrics(tmp_path / "overlap" / "run")
    keys = ("reward_mean", "reward/editscore", "reward/redness", "acd_mean", "loss", "policy_kl", "groups",
            "reward_std_within_group_values", "reward/retries")
    assert [{k: r[k] for k in keys} for r in sync] == [{k: r[k] for k in keys} for r in over]
    assert all(r["groups"] == 4 for r in over) and all("perf/reward_wait_s" in r for r in over)
    lora_sync = torch.load(tmp_path / "sync" / "run" / "lora_vector.pt", weights_only=True)
    lora_over = torch.load(tmp_path / "overlap" / "run" / "lora_vector.pt", weights_only=True)
    assert torch.equal(lora_sync, lora_over)
    assert sum(len(r.seen) for r in recorders) >= 2 * 2 * (2 * 2 * 4)  # both runs' images, over the servers
    dead_rows = _metrics(tmp_path / "dead" / "run")
    assert [r["groups"] for r in dead_rows] == [2, 2] and dead_rows[-1]["skipped_groups"] == 4
