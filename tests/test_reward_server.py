"""EditScoreClient against a real reward server process (`python -m rcgrpo.reward_server`) serving a local function.

`start_server_process` is shared with the other reward-server test files.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request

import pytest
import torch

from rcgrpo import reward_server
from rcgrpo.rewards import EditScoreClient, RewardServerError, check_reward_output, resolve_reward

SCORER = textwrap.dedent(
    """
    import time

    def score(*, edited, sources, instructions):
        out = []
        for i, (img, text) in enumerate(zip(edited, instructions)):
            if text == "fail":
                raise RuntimeError("scorer exploded: secret detail")
            if text == "sleep":
                time.sleep(1.5)
            if text == "nan":
                out.append(float("nan"))
                continue
            red = img.getpixel((0, 0))[0] / 255.0
            green = sources[i].getpixel((0, 0))[1] / 255.0 if sources is not None else 0.0
            out.append(red + green / 10.0)
        if instructions[0] == "short":
            return out[:-1]
        return out
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RCGRPO_REWARD_TOKEN", "OPENAI_API_KEY")}
    env.update(extra)
    return env


@contextlib.contextmanager
def start_server_process(args, *, env=None, pythonpath=None, startup_s=90):
    """A `python -m rcgrpo.reward_server ARGS --port P` process; yields (url, proc). Its stderr goes to a
    file whose text is `proc.stderr_text()` (read after the process ends or at any time)."""
    port = free_port()
    env = clean_env() if env is None else env
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    log_file = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "rcgrpo.reward_server", "--port", str(port), *map(str, args)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    proc.stderr_text = lambda: open(log_file.name, encoding="utf-8", errors="replace").read()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"reward server exited early ({proc.returncode}): {proc.stderr_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reward server did not start in {startup_s} s: {proc.stderr_text()}")
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log_file.close()
        os.unlink(log_file.name)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A live server process with a 0.25 MiB request limit, scoring with the function above."""
    folder = tmp_path_factory.mktemp("scorer")
    (folder / "rcgrpo_test_scorer.py").write_text(SCORER)
    with start_server_process(["--scorer", "rcgrpo_test_scorer:score", "--max-request-mb", "0.25"],
                              pythonpath=folder) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def _health(url):
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        return json.loads(resp.read())


def _metrics(url):
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        return json.loads(resp.read())


def _score_count(url, status: str | None = None):
    """/score requests the server has answered (with `status` only: those answered with that status)."""
    counts = _metrics(url)["requests"]["by_path"].get("/score", {})
    return counts.get(status, 0) if status is not None else sum(counts.values())


def _score_delta(url, before: int, expected: int, status: str | None = None, timeout: float = 10.0) -> int:
    """/score requests counted since `before`, once `expected` are (or after `timeout`). The server counts
    a request just after answering it, so on a loaded machine the count can lag the client's answer."""
    deadline = time.monotonic() + timeout
    while _score_count(url, status) - before < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # one more would show up here
    return _score_count(url, status) - before


def _images(b, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)


def test_health_names_the_scorer_and_limits(server):
    health = _health(server)
    assert health["status"] == "ok" and health["auth"] == "none"
    assert health["scorer"] == "rcgrpo_test_scorer:score"
    assert health["limits"]["max_request_bytes"] == int(0.25 * 2**20)


def test_scores_in_batches_and_order(server):
    edited, sources = _images(5)
    client = EditScoreClient(server, batch_size=2, timeout=10, retries=0)
    before = _score_count(server)
    scores = client(edited, sources, torch.ones(5, 1, 8, 8), [f"edit {i}" for i in range(5)], [{}] * 5)
    q = lambda x: torch.round(x * 255) / 255  # noqa: E731 - PNG quantization
    expected = q(edited[:, 0, 0, 0]) + q(sources[:, 1, 0, 0]) / 10
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert _score_delta(server, before, 3) == 3  # batches of 2, 2, 1
    check_reward_output(scores, 5, "editscore")
    via_name = resolve_reward("editscore", url=server + "/", batch_size=8, retries=0)
    assert torch.allclose(via_name(edited, sources, None, [f"e{i}" for i in range(5)], None), expected, atol=1e-6)


def test_scorer_failure_is_a_generic_500_with_a_logged_request_id(served):
    server, proc = served
    edited, sources = _images(2)
    client = EditScoreClient(server, timeout=10, retries=2, backoff=0.01)
    before = _score_count(server, "500")
    with pytest.raises(RewardServerError) as err:
        client(edited, sources, None, ["fail", "ok"], None)
    msg = str(err.value)
    assert server in msg and "HTTP 500" in msg and err.value.status == 500
    assert "secret detail" not in msg and "RuntimeError" not in msg  # the exception stays on the server
    request_id = err.value.request_id
    assert request_id and request_id in msg
    # a 500 is not retried: no retry by the client, one 500 on the server (counting every /score request
    # instead once caught the previous test's last request, counted late on a loaded machine)
    assert client.retry_count == 0 and _score_delta(server, before, 1, "500") == 1
    deadline = time.monotonic() + 10
    while request_id not in proc.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = proc.stderr_text()
    line = next(line for line in log.splitlines() if request_id in line)
    assert "scorer" in line and "failed" in line
    assert "scorer exploded: secret detail" in log  # the traceback is in the server's log


def test_timeout_is_reported_and_not_retried(server):
    edited, sources = _images(1)
    client = EditScoreClient(server, timeout=0.3, retries=3, backoff=0.01)
    before = _score_count(server, "200")
    with pytest.raises(RewardServerError, match=r"timeout.*not retried") as err:
        client(edited, sources, None, ["sleep"], None)
    assert server in str(err.value) and err.value.status is None
    assert _score_delta(server, before, 1, "200", timeout=20) == 1  # the sleeping request finishes, once
    assert _health(server)["queue"]["depth"] == 0  # no retry is waiting or running


def test_non_finite_scores_are_rejected(server):
    edited, sources = _images(2)
    client = EditScoreClient(server, timeout=10, retries=0)
    with pytest.raises(RewardServerError, match=r"non-finite.*example 1"):
        client(edited, sources, None, ["ok", "nan"], None)


def test_wrong_score_count_is_a_500(server):
    edited, sources = _images(2)
    client = EditScoreClient(server, timeout=10, retries=0)
    with pytest.raises(RewardServerError, match=r"HTTP 500") as err:
        client(edited, sources, None, ["short", "x"], None)
    assert "1 scores for 2 images" not in str(err.value)  # logged on the server, not sent


def test_oversized_request_gets_413(server):
    edited, sources = _images(2, 160, 160, seed=3)  # random noise PNGs: ~2 x 2 x 77 KB > 0.25 MiB
    client = EditScoreClient(server, timeout=10, retries=2, backoff=0.01)
    before = _score_count(server, "413")
    with pytest.raises(RewardServerError, match=r"HTTP 413.*limit of 262144 bytes") as err:
        client(edited, sources, None, ["a", "b"], None)
    assert "smaller batches" in str(err.value) and server in str(err.value) and err.value.status == 413
    assert _score_delta(server, before, 1, "413") == 1  # not retried
    assert _health(server)["status"] == "ok"  # the server keeps serving


def test_connection_refused_names_the_url_and_is_retried():
    url = f"http://127.0.0.1:{free_port()}"
    edited, sources = _images(1)
    client = EditScoreClient(url, timeout=2, retries=1, backoff=0.01)
    with pytest.raises(RewardServerError, match=r"cannot connect.*server running") as err:
        client(edited, sources, None, ["x"], None)
    assert url in str(err.value) and "2 attempt(s)" in str(err.value)
    with pytest.raises(RewardServerError, match="health"):
        EditScoreClient(url, timeout=2, retries=0).health()


def test_credentials_in_the_url_are_sent_not_shown():
    url = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    client = EditScoreClient(url, timeout=2, retries=0)
    assert client.score_url.startswith("http://127.0.0.1:") and "s3cret" not in client.score_url
    with pytest.raises(RewardServerError) as err:
        client(*_images(1), None, ["x"], None)
    assert "cannot connect" in str(err.value)  # not a URL parsing error
    assert "s3cret" not in str(err.value) and "alice" not in str(err.value) and "***@127.0.0.1" in str(err.value)


def _post(url, body: bytes, content_type="application/json"):
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_requests_get_400_with_a_reason(server):
    status, data = _post(server, b"{not json")
    assert status == 400 and "not valid JSON" in data["error"] and data["request_id"]
    status, data = _post(server, json.dumps({"edited": ["aGVsbG8="], "instructions": ["x"]}).encode())
    assert status == 400 and "edited[0]" in data["error"] and "not a PNG" in data["error"]
    status, data = _post(server, json.dumps({"edited": ["aGVsbG8="], "instructions": []}).encode())
    assert status == 400 and "instructions" in data["error"]
    status, data = _post(server, json.dumps([1, 2]).encode())
    assert status == 400 and "JSON object" in data["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + "/nope", timeout=5)
    assert err.value.code == 404


def test_server_program_rejects_bad_options(capsys):
    assert reward_server.main(["--port", "0", "--scorer", "no_such_module_xyz:score"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert reward_server.main(["--port", "0", "--scorer", "not-a-spec"]) == 2
    assert reward_server.main(["--port", "0", "--scorer", "editscore"]) == 2
    assert "--editscore-model" in capsys.readouterr().err
    assert reward_server.main(["--port", "0", "--scorer", "editscore", "--editscore-backbone", "openai",
                               "--editscore-model", "m", "--editscore-lora", "/x"]) == 2
    assert "does not load LoRA" in capsys.readouterr().err
    assert reward_server.main(["--port", "0", "--max-queue", "0", "--scorer", "a:b"]) == 2
    assert "max_queue" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a backbone editscore does not offer
        reward_server.main(["--port", "0", "--editscore-backbone", "nope"])
    assert exit_info.value.code == 2


def test_client_rejects_bad_settings():
    with pytest.raises(ValueError, match="url"):
        EditScoreClient("localhost:8765")
    with pytest.raises(ValueError, match="url") as err:
        EditScoreClient("http://alice:s3cret@127.0.0.1:notaport")
    assert "s3cret" not in str(err.value)
    with pytest.raises(ValueError, match="batch_size"):
        EditScoreClient("http://127.0.0.1:1", batch_size=0)
    with pytest.raises(ValueError, match="not both"):
        EditScoreClient("http://a:b@127.0.0.1:1", token="t")
