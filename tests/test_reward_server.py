"""EditScoreClient against a real reward server process (rcgrpo.reward_server) serving a local function."""
import json
import os
import socket
import subprocess
import sys
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
                raise RuntimeError("scorer exploded")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server process with a 0.25 MiB request limit, scoring with the function above."""
    folder = tmp_path_factory.mktemp("scorer")
    (folder / "rcgrpo_test_scorer.py").write_text(SCORER)
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "rcgrpo.reward_server", "--port", str(port), "--scorer", "rcgrpo_test_scorer:score",
         "--max-request-mb", "0.25"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"reward server exited early: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _health(url):
    with urllib.request.urlopen(url + "/health", timeout=5) as resp:
        return json.loads(resp.read())


def _images(b, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)


def test_health_names_the_scorer(server):
    health = _health(server)
    assert health["status"] == "ok"
    assert health["scorer"] == "rcgrpo_test_scorer:score"
    assert health["max_request_bytes"] == int(0.25 * 2**20)


def test_scores_in_batches_and_order(server):
    edited, sources = _images(5)
    client = EditScoreClient(server, batch_size=2, timeout=10, retries=0)
    before = _health(server)["requests"]
    scores = client(edited, sources, torch.ones(5, 1, 8, 8), [f"edit {i}" for i in range(5)], [{}] * 5)
    q = lambda x: torch.round(x * 255) / 255  # noqa: E731 - PNG quantization
    expected = q(edited[:, 0, 0, 0]) + q(sources[:, 1, 0, 0]) / 10
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert _health(server)["requests"] - before == 3  # batches of 2, 2, 1
    check_reward_output(scores, 5, "editscore")
    via_name = resolve_reward("editscore", url=server + "/", batch_size=8, retries=0)
    assert torch.allclose(via_name(edited, sources, None, [f"e{i}" for i in range(5)], None), expected, atol=1e-6)


def test_server_error_is_retried_then_reported(server):
    edited, sources = _images(2)
    client = EditScoreClient(server, timeout=10, retries=2, backoff=0.01)
    before = _health(server)["requests"]
    with pytest.raises(RewardServerError) as err:
        client(edited, sources, None, ["fail", "ok"], None)
    msg = str(err.value)
    assert server in msg and "3 attempt(s)" in msg and "HTTP 500" in msg and "scorer exploded" in msg
    assert _health(server)["requests"] - before == 3


def test_timeout_is_reported(server):
    edited, sources = _images(1)
    client = EditScoreClient(server, timeout=0.3, retries=0)
    start = time.time()
    with pytest.raises(RewardServerError, match=r"timeout") as err:
        client(edited, sources, None, ["sleep"], None)
    assert server in str(err.value)
    assert time.time() - start < 1.4


def test_non_finite_scores_are_rejected(server):
    edited, sources = _images(2)
    client = EditScoreClient(server, timeout=10, retries=0)
    with pytest.raises(RewardServerError, match=r"non-finite.*example 1"):
        client(edited, sources, None, ["ok", "nan"], None)


def test_wrong_score_count_is_an_error(server):
    edited, sources = _images(2)
    client = EditScoreClient(server, timeout=10, retries=0)
    with pytest.raises(RewardServerError, match=r"1 scores for 2 images"):
        client(edited, sources, None, ["short", "x"], None)


def test_oversized_request_gets_413(server):
    edited, sources = _images(2, 160, 160, seed=3)  # random noise PNGs: ~2 x 2 x 77 KB > 0.25 MiB
    client = EditScoreClient(server, timeout=10, retries=2, backoff=0.01)
    with pytest.raises(RewardServerError, match=r"413.*limit") as err:
        client(edited, sources, None, ["a", "b"], None)
    assert "too large" in str(err.value) and server in str(err.value)
    assert _health(server)["status"] == "ok"  # the server keeps serving


def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    edited, sources = _images(1)
    client = EditScoreClient(url, timeout=2, retries=1, backoff=0.01)
    with pytest.raises(RewardServerError, match=r"cannot connect.*server running") as err:
        client(edited, sources, None, ["x"], None)
    assert url in str(err.value) and "2 attempt(s)" in str(err.value)
    with pytest.raises(RewardServerError, match="health"):
        client.health()


def _post(url, body: bytes):
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_requests_get_400_with_a_reason(server):
    status, data = _post(server, b"{not json")
    assert status == 400 and "not valid JSON" in data["error"]
    status, data = _post(server, json.dumps({"edited": ["aGVsbG8="], "instructions": ["x"]}).encode())
    assert status == 400 and "edited[0]" in data["error"]
    status, data = _post(server, json.dumps({"edited": ["aGVsbG8="], "instructions": []}).encode())
    assert status == 400 and "instructions" in data["error"]
    status, data = _post(server, json.dumps([1, 2]).encode())
    assert status == 400 and "JSON object" in data["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + "/nope", timeout=5)
    assert err.value.code == 404


def test_server_program_rejects_bad_scorers(capsys):
    assert reward_server.main(["--port", "0", "--scorer", "no_such_module_xyz:score"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert reward_server.main(["--port", "0", "--scorer", "not-a-spec"]) == 2
    assert reward_server.main(["--port", "0", "--scorer", "editscore"]) == 2
    assert "--editscore-model" in capsys.readouterr().err
    try:
        import editscore  # noqa: F401
    except ImportError:
        assert reward_server.main(["--port", "0", "--scorer", "editscore", "--editscore-model", "/m"]) == 1
        assert "needs the 'editscore' package" in capsys.readouterr().err


def test_client_rejects_bad_settings():
    with pytest.raises(ValueError, match="url"):
        EditScoreClient("localhost:8765")
    with pytest.raises(ValueError, match="batch_size"):
        EditScoreClient("http://127.0.0.1:1", batch_size=0)
