"""The reward server against hostile or unlucky clients (in-process servers on 127.0.0.1)."""
import base64
import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from rcgrpo.rewards import EditScoreClient, RewardServerError
from rcgrpo.rewards.codec import encode_png_base64
from rcgrpo.rewards.protocol import RequestLimits
from rcgrpo.rewards.server import RewardServer, ScorerUnavailable, ServerSettings
from rcgrpo.rewards.server_cli import parse_options
from test_reward_server_protocol import png_header_only

TOKEN = "t0ken-with-enough-entropy"


def red_scorer(*, edited, sources, instructions):
    out = []
    for img, text in zip(edited, instructions):
        if text.startswith("sleep:"):
            time.sleep(float(text.split(":")[1]))
        if text == "busy":
            raise ScorerUnavailable("upstream says slow down")
        out.append(img.getpixel((0, 0))[0] / 255.0)
    return out


@contextlib.contextmanager
def running(scorer=red_scorer, limits=None, **settings):
    server = RewardServer(("127.0.0.1", 0), scorer, scorer_name="test", settings=ServerSettings(**settings),
                          limits=limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def request(server, method, path, body=b"", headers=None, timeout=10):
    """(status, headers, JSON body) of one raw request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"null")
    finally:
        conn.close()


def score_body(n=1, instruction="x", seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = [encode_png_base64(torch.rand(3, 8, 8, generator=g)) for _ in range(n)]
    return json.dumps({"edited": imgs, "sources": imgs, "instructions": [instruction] * n}).encode()


def images(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.rand(n, 3, 8, 8, generator=g)


def test_token_is_required_and_checked():
    with running(token=TOKEN) as server:
        status, headers, data = request(server, "POST", "/score", score_body())
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and data["request_id"]
        status, _, _ = request(server, "POST", "/score", score_body(), {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, data = request(server, "POST", "/score", score_body(), {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and len(data["scores"]) == 1
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        assert request(server, "POST", "/score", score_body(), {"Authorization": f"Basic {basic}"})[0] == 200
        assert request(server, "GET", "/health")[0] == 200  # liveness needs no token
        assert request(server, "GET", "/metrics")[0] == 401
        assert request(server, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200

        edited, sources = images(2)
        expected = torch.round(edited[:, 0, 0, 0] * 255) / 255
        for client in (EditScoreClient(server.url, token=TOKEN, retries=0),
                       EditScoreClient(server.url.replace("http://", f"http://trainer:{TOKEN}@"), retries=0)):
            assert torch.allclose(client(edited, sources, None, ["a", "b"]), expected, atol=1e-6)
            assert client.metrics()["requests"]["by_status"]["401"] == 3
        with pytest.raises(RewardServerError, match=r"HTTP 401.*token") as err:
            EditScoreClient(server.url.replace("http://", "http://trainer:nope@"), retries=2)(edited, sources, None,
                                                                                               ["a", "b"])
        assert err.value.status == 401 and "nope" not in str(err.value)


def test_client_takes_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("RCGRPO_REWARD_TOKEN", TOKEN)
    with running(token=TOKEN) as server:
        assert EditScoreClient(server.url, retries=0)(*images(1), None, ["a"]).shape == (1,)


def test_json_only_and_bounded_nesting():
    with running() as server:
        status, _, data = request(server, "POST", "/score", score_body(), {"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in data["error"] and "text/plain" in data["error"]
        status, _, data = request(server, "POST", "/score", b"[" * 200_000 + b"]" * 200_000)
        assert status == 400 and "nested deeper than 8" in data["error"]
        status, _, data = request(server, "POST", "/score", score_body(),
                                  {"Content-Type": "application/json; charset=utf-8"})
        assert status == 200
        assert request(server, "PUT", "/score", score_body())[0] == 405
        assert request(server, "POST", "/other", score_body())[0] == 404


def test_pixel_limits_are_checked_from_headers():
    limits = RequestLimits(max_image_pixels=64 * 64, max_request_pixels=3 * 64 * 64)
    with running(limits=limits) as server:
        huge = png_header_only(60000, 60000)  # 3.6 gigapixels claimed in 33 bytes
        body = json.dumps({"edited": [huge], "sources": [huge], "instructions": ["x"]}).encode()
        status, _, data = request(server, "POST", "/score", body)
        assert status == 413 and "60000x60000" in data["error"] and "at most 4096 pixels per image" in data["error"]
        edited = torch.rand(2, 3, 64, 64)
        with pytest.raises(RewardServerError, match=r"HTTP 413.*16384 pixels in 4 images.*at most 12288") as err:
            EditScoreClient(server.url, retries=2, backoff=0.01)(edited, edited, None, ["a", "b"])
        assert err.value.status == 413
        assert EditScoreClient(server.url, retries=0, batch_size=1)(edited, edited, None, ["a", "b"]).shape == (2,)


def _slow_sender(port, head: bytes, interval: float, max_bytes: int):
    """Send `head`, then one byte every `interval` s (at most `max_bytes`, stopping once the server answers);
    returns (what the server answered, bytes trickled)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent = 0
    try:
        sock.sendall(head)
        while sent < max_bytes:
            try:
                sock.sendall(b"x")
            except OSError:
                break
            sent += 1
            time.sleep(interval)
            sock.setblocking(False)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server answered
            except BlockingIOError:
                pass
            except OSError:
                break
            finally:
                sock.setblocking(True)
                sock.settimeout(10)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                data += chunk
        return data, sent
    finally:
        sock.close()


@pytest.mark.parametrize("where", ["headers", "body"])
def test_slow_senders_get_408_at_the_receive_deadline_while_others_are_served(where):
    with running(receive_deadline_s=1.0, deadline_s=20.0) as server:
        port = server.server_address[1]
        head = (b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: " if where == "headers" else
                b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        result = {}
        slow = threading.Thread(target=lambda: result.setdefault("answer", _slow_sender(port, head, 0.05, 400)))
        slow.start()
        client = EditScoreClient(server.url, retries=0, timeout=5)
        served = 0
        while slow.is_alive() and served < 200:  # others are answered while the slow sender trickles
            assert client(*images(1, seed=served), None, ["ok"]).shape == (1,)
            served += 1
        slow.join(timeout=30)
        assert served >= 1
        answer, trickled = result["answer"]
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert trickled < 400  # cut off by the deadline, not after running out of bytes (20 s)
        assert b"1 s receive deadline" in answer
        assert server.metrics.count(408) == 1


def test_full_queue_answers_503_with_retry_after_and_drops_nothing():
    with running(max_queue=1, max_connections=16) as server:
        results = []
        lock = threading.Lock()

        def one(i):
            try:
                status, headers, _ = request(server, "POST", "/score", score_body(instruction="sleep:0.5", seed=i))
            except OSError as exc:  # a dropped or reset connection
                status, headers = f"dropped: {exc}", {}
            with lock:
                results.append((status, headers))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        statuses = sorted(str(s) for s, _ in results)
        assert len(results) == 8 and set(statuses) <= {"200", "503"}, statuses
        assert statuses.count("200") >= 2 and statuses.count("503") >= 1  # one running + one waiting fit
        assert all(int(h["Retry-After"]) >= 1 for s, h in results if s == 503)

        # the client backs off for Retry-After and gets through
        edited, sources = images(1)
        clients_done = []

        def client_call():
            client = EditScoreClient(server.url, retries=6, backoff=0.05, max_backoff=1.0, timeout=10)
            clients_done.append(client(edited, sources, None, ["sleep:0.2"]).shape)

        threads = [threading.Thread(target=client_call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert clients_done == [(1,)] * 4


def test_deadline_answers_503_in_the_queue_and_504_while_scoring():
    with running(max_queue=4, deadline_s=0.5) as server:
        results = {}

        def one(name, instruction):
            results[name] = request(server, "POST", "/score", score_body(instruction=instruction))

        first = threading.Thread(target=one, args=("running", "sleep:1.2"))
        first.start()
        wait_until = time.monotonic() + 20
        while server.queue.depth == 0 and time.monotonic() < wait_until:  # the first is being scored
            time.sleep(0.01)
        second = threading.Thread(target=one, args=("queued", "x"))
        second.start()
        first.join(timeout=30)
        second.join(timeout=30)
        status, _, data = results["running"]
        assert status == 504 and "did not finish within the server's 0.5 s deadline" in data["error"]
        status, headers, data = results["queued"]
        assert status == 503 and "waited in the scoring queue" in data["error"] and int(headers["Retry-After"]) >= 1


def test_scorer_overload_is_a_retryable_503():
    with running() as server:
        status, headers, data = request(server, "POST", "/score", score_body(instruction="busy"))
        assert status == 503 and "temporarily unavailable" in data["error"] and "Retry-After" in headers
        with pytest.raises(RewardServerError, match=r"busy for 2 attempt\(s\).*HTTP 503"):
            EditScoreClient(server.url, retries=1, backoff=0.01, max_backoff=0.01)(*images(1), None, ["busy"])
        assert server.metrics.count(503) == 3


def test_connections_beyond_the_limit_wait_and_are_all_answered():
    with running(max_connections=2, max_queue=32) as server:
        statuses = []

        def one(i):
            statuses.append(request(server, "POST", "/score", score_body(instruction="sleep:0.05", seed=i))[0])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert statuses == [200] * 12


def _read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_length_and_body_errors():
    with running() as server:
        port = server.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 411")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50\r\n\r\n{\"edited\"")
            sock.shutdown(socket.SHUT_WR)
            answer = _read_all(sock)
            assert answer.startswith(b"HTTP/1.1 400") and b"ended after 9 of 50 bytes" in answer


def test_metrics_count_statuses_and_latencies():
    with running() as server:
        for _ in range(3):
            request(server, "POST", "/score", score_body())
        request(server, "POST", "/score", b"{", {})
        status, _, metrics = request(server, "GET", "/metrics")
        assert status == 200
        assert metrics["requests"]["by_status"] == {"200": 3, "400": 1}
        lat = metrics["latency_s"]["/score"]
        assert lat["count"] == 4 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert metrics["queue"] == {"depth": 0, "max": 16}


def test_options_parse_and_read_the_token_from_the_environment(monkeypatch):
    options = parse_options(["--scorer", "m:f", "--max-queue", "3", "--receive-deadline", "2.5",
                             "--max-image-pixels", "100", "--editscore-backbone", "openai"])
    monkeypatch.setenv("RCGRPO_REWARD_TOKEN", "from-env")
    settings, limits = options.settings(), options.limits()
    assert settings.token == "from-env" and settings.max_queue == 3 and settings.receive_deadline_s == 2.5
    assert limits.max_image_pixels == 100 and options.host == "127.0.0.1"
    assert parse_options(["--token", "flag"]).settings().token == "flag"
