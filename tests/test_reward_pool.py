"""EditScorePool: several reward servers on 127.0.0.1 (in this process), least outstanding requests
first, fail-over on refused connections, timeouts and 503, no image lost or scored twice, a clear error
when every server is down, and the URL lists of `--editscore-url`."""
import contextlib
import threading
import time

import pytest
import torch

from rcgrpo.rewards import (EditScoreClient, EditScorePool, RewardServerError, RewardsUnavailableError,
                            resolve_reward, split_urls)
from rcgrpo.rewards.latency_scorer import score as latency_score
from rcgrpo.rewards.score_queue import ScorerUnavailable
from rcgrpo.rewards.server import RewardServer, ServerSettings
from test_reward_server import free_port

q = lambda x: torch.round(x * 255) / 255  # noqa: E731 - PNG quantization


class Recorder:
    """A scorer (`latency_score`'s values) that records the instructions it scored; `mode` makes it fail."""

    def __init__(self, mode: str = "ok", gate: threading.Event | None = None):
        self.seen: list[str] = []
        self.mode = mode
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, *, edited, sources, instructions):
        if self.gate is not None:
            self.gate.wait(20)
        if self.mode == "busy":
            raise ScorerUnavailable("upstream rate limit")
        if self.mode == "fail":
            raise RuntimeError("scorer failed")
        if self.mode == "slow":  # answers after the client gave up: not recorded
            time.sleep(1.0)
            return latency_score(edited=edited, sources=sources, instructions=instructions)
        with self.lock:
            self.seen.extend(instructions)
        return latency_score(edited=edited, sources=sources, instructions=instructions)


@contextlib.contextmanager
def serving(scorer, port: int = 0):
    server = RewardServer(("127.0.0.1", port), scorer, scorer_name="recorder", settings=ServerSettings())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.rand(n, 3, 8, 8, generator=g)


def expected(edited):
    e = q(edited.double())
    return (e[:, 0].mean(dim=(1, 2)) - e[:, 1].mean(dim=(1, 2))).float()


def same(scores, edited):
    return scores.dtype == torch.float32 and torch.allclose(scores, expected(edited), rtol=0, atol=1e-6)


def labels(n):
    return [f"image {i}" for i in range(n)]


def fast_pool(urls, **kwargs):
    values = dict(batch_size=2, timeout=5, probe_interval=0.05, max_probe_interval=0.2)
    values.update(kwargs)
    return EditScorePool(urls, **values)


# ---------------------------------------------------------------- URL lists
def test_url_lists_accept_commas_spaces_and_lists_and_name_a_bad_url():
    assert split_urls("http://a:1") == ["http://a:1"]
    assert split_urls("http://a:1, http://b:2\nhttps://c") == ["http://a:1", "http://b:2", "https://c"]
    assert split_urls(["http://a:1", "http://b:2,http://c:3"]) == ["http://a:1", "http://b:2", "http://c:3"]
    with pytest.raises(ValueError, match=r"URL 2 of 3 must be http\(s\)://host:port, got 'b:2'"):
        split_urls("http://a:1,b:2,http://c:3")
    with pytest.raises(ValueError, match="at least one"):
        split_urls(" , ")
    with pytest.raises(ValueError, match="same server") as err:
        split_urls("http://u:secret@a:1 http://a:1/score")
    assert "secret" not in str(err.value)
    with pytest.raises(ValueError, match="string or a list of strings"):
        split_urls(["http://a:1", 3])


def test_config_keeps_one_url_and_joins_a_yaml_list(tmp_path):
    from rcgrpo.train.config import RCGRPOConfig

    assert RCGRPOConfig(editscore_url="http://127.0.0.1:8765").editscore_url == "http://127.0.0.1:8765"
    path = tmp_path / "c.yaml"
    path.write_text("editscore_url: [http://a:1, http://b:2]\n")
    assert RCGRPOConfig.from_yaml(path).editscore_url == "http://a:1,http://b:2"
    with pytest.raises(ValueError, match="config editscore_url: URL 2 of 2"):
        RCGRPOConfig(editscore_url="http://a:1 a.example:2")
    with pytest.raises(ValueError, match="max_reward_requests_in_flight"):
        RCGRPOConfig(max_reward_requests_in_flight=0)


def test_the_cli_names_a_bad_url_in_one_line(tmp_path, capsys):
    from rcgrpo.cli import main

    code = main(["train", "--preset", "tiny", "--reward-funcs", "editscore", "--reward-weights", "1", "--editscore-url",
                 "http://127.0.0.1:1,127.0.0.1:2", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "URL 2 of 2" in err[0] and "'127.0.0.1:2'" in err[0]


def test_config_rewards_use_a_pool_and_resolve_reward_a_client_for_one_url():
    from rcgrpo.rewards.registry import reward_funcs_from_config
    from rcgrpo.train.config import RCGRPOConfig

    cfg = RCGRPOConfig(reward_funcs=["editscore"], editscore_url="http://127.0.0.1:1 http://127.0.0.1:2",
                       editscore_timeout=7.0, editscore_batch_size=3)
    [(name, pool)] = reward_funcs_from_config(cfg)
    assert name == "editscore" and isinstance(pool, EditScorePool) and pool.asynchronous
    assert pool.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"] and pool.batch_size == 3 and pool.timeout == 7.0
    assert isinstance(resolve_reward("editscore", url="http://127.0.0.1:1"), EditScoreClient)
    assert isinstance(resolve_reward("editscore", url="http://127.0.0.1:1,http://127.0.0.1:2"), EditScorePool)
    assert EditScoreClient.asynchronous is True
    from rcgrpo.rewards import WeightedReward, background_psnr

    assert WeightedReward([(pool, 1.0), (EditScoreClient("http://127.0.0.1:3"), 2.0)]).asynchronous
    assert not WeightedReward([(pool, 1.0), (background_psnr, 2.0)]).asynchronous  # a local part runs inline


# ---------------------------------------------------------------- spreading
def test_batches_spread_over_the_servers_and_come_back_in_order():
    gate = threading.Event()
    recorders = [Recorder(gate=gate) for _ in range(3)]
    with serving(recorders[0]) as a, serving(recorders[1]) as b, serving(recorders[2]) as c:
        pool = fast_pool([a, b, c], batch_size=2)
        edited, sources = images(12)
        result = {}
        thread = threading.Thread(target=lambda: result.update(scores=pool(edited, sources, None, labels(12))))
        thread.start()
        deadline = time.monotonic() + 20  # 6 batches, 6 requests allowed: all in flight, 2 per server
        while sum(s["outstanding"] for s in pool.status()) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [s["outstanding"] for s in pool.status()] == [2, 2, 2]
        gate.set()
        thread.join(30)
    assert same(result["scores"], edited)
    assert sorted(x for r in recorders for x in r.seen) == sorted(labels(12))  # each image scored once
    assert all(len(r.seen) == 4 for r in recorders) and pool.retry_count == 0


# ---------------------------------------------------------------- fail-over
@pytest.mark.parametrize("failure", ["refused", "busy", "timeout"])
def test_a_failing_server_is_set_aside_and_its_batch_resent(failure):
    good = Recorder()
    bad = Recorder(mode={"refused": "ok", "busy": "busy", "timeout": "slow"}[failure])
    with serving(good) as up, serving(bad) as flaky:
        if failure == "refused":
            flaky = f"http://127.0.0.1:{free_port()}"
        pool = fast_pool([flaky, up], batch_size=1, timeout=0.5, max_requests=1)
        edited, sources = images(4, seed=1)
        scores = pool(edited, sources, None, labels(4))
        status = pool.status()
    assert same(scores, edited)
    assert sorted(good.seen) == labels(4) and bad.seen == []  # nothing lost, nothing counted twice
    assert pool.retry_count >= 1 and status[1]["scored"] == 4 and status[0]["scored"] == 0
    assert status[0]["last_error"]


def test_request_errors_are_not_resent():
    failing = Recorder(mode="fail")
    with serving(failing) as url, serving(Recorder()) as other:
        pool = fast_pool([url, other], batch_size=4, max_requests=1)
        with pytest.raises(RewardServerError, match="HTTP 500") as err:
            pool(*images(2), None, labels(2))
    assert not isinstance(err.value, RewardsUnavailableError) and pool.retry_count == 0
    assert all(s["usable"] for s in pool.status())


def test_all_servers_down_is_one_error_naming_them_then_a_restarted_server_is_used_again():
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    pool = fast_pool(urls, unavailable_timeout=0.5)
    edited, sources = images(3, seed=2)
    with pytest.raises(RewardsUnavailableError) as err:
        pool(edited, sources, None, labels(3))
    message = str(err.value)
    assert "\n" not in message and all(u in message for u in urls) and "cannot connect" in message
    start = time.monotonic()
    with pytest.raises(RewardsUnavailableError):  # still all down: fails without a second full wait
        pool(edited, sources, None, labels(3))
    assert time.monotonic() - start < 5
    restarted = Recorder()
    with serving(restarted, port=ports[1]):  # the second server comes back on its port
        scores = pool(edited, sources, None, labels(3))
    assert same(scores, edited) and sorted(restarted.seen) == labels(3)
    assert [s["usable"] for s in pool.status()] == [False, True]
