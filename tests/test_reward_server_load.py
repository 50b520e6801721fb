"""Load test on 127.0.0.1: 1,000 requests over 50 threads through EditScoreClient against a server process,
while a slowloris client and oversized requests hit the same server.

The client's timeout equals the server's deadline and it does not retry, so a request that is dropped,
reset, or delayed beyond the deadline by the hostile clients fails the test. The figures (requests,
failures, p50/p99 latency) are printed (`pytest -s`) and checked for consistency with /metrics.
"""
import json
import socket
import textwrap
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from rcgrpo.rewards import EditScoreClient, RewardServerError
from rcgrpo.rewards.server_metrics import quantile
from test_reward_server import start_server_process
from test_reward_server_protocol import png_header_only

REQUESTS = 1000
THREADS = 50
DEADLINE_S = 10.0
RECEIVE_DEADLINE_S = 2.0

SCORER = textwrap.dedent(
    """
    def score(*, edited, sources, instructions):
        return [img.getpixel((0, 0))[0] / 255.0 + src.getpixel((0, 0))[2] / 1000.0
                for img, src in zip(edited, sources)]
    """
)


def _slowloris(port: int, out: dict) -> None:
    """Headers one byte every 0.1 s, for at most 30 s (300 bytes); records what the server answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=40)
    started = time.monotonic()
    try:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sent = 0
        while sent < 300:
            try:
                sock.sendall(b"a")
            except OSError:
                break
            sent += 1
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
                sock.settimeout(40)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except OSError:
            pass
        out.update(answer=data, bytes_sent=sent, seconds=time.monotonic() - started)
    finally:
        sock.close()


def _post_raw(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url + "/score", data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE_S) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]


def test_load_1000_requests_50_threads_with_slowloris_and_oversized(tmp_path):
    (tmp_path / "rcgrpo_load_scorer.py").write_text(SCORER)
    args = ["--scorer", "rcgrpo_load_scorer:score", "--deadline", DEADLINE_S, "--receive-deadline",
            RECEIVE_DEADLINE_S, "--max-connections", 32, "--max-queue", 64, "--max-request-mb", 1]
    g = torch.Generator().manual_seed(0)
    edited, sources = torch.rand(REQUESTS, 3, 8, 8, generator=g), torch.rand(REQUESTS, 3, 8, 8, generator=g)
    q = lambda x: torch.round(x * 255) / 255  # noqa: E731 - PNG quantization
    expected = q(edited[:, 0, 0, 0]) + q(sources[:, 2, 0, 0]) * 255 / 1000
    with start_server_process(args, pythonpath=tmp_path) as (url, _proc):
        port = int(url.rsplit(":", 1)[1])
        client = EditScoreClient(url, timeout=DEADLINE_S, retries=0)
        latencies = [0.0] * REQUESTS
        errors: list[str] = []
        scores = torch.full((REQUESTS,), float("nan"))

        def one(i: int) -> None:
            start = time.monotonic()
            try:
                scores[i] = client(edited[i:i + 1], sources[i:i + 1], None, [f"edit {i}"])[0]
            except RewardServerError as exc:
                errors.append(str(exc))
            latencies[i] = time.monotonic() - start

        slow: dict = {}
        slow_thread = threading.Thread(target=_slowloris, args=(port, slow))
        slow_thread.start()
        hostile: dict = {}

        def oversized() -> None:
            time.sleep(0.2)
            hostile["body"] = _post_raw(url, b'{"edited": ["' + b"A" * (2 * 2**20) + b'"]}')
            huge = png_header_only(50000, 50000)
            hostile["pixels"] = _post_raw(url, json.dumps({"edited": [huge], "sources": [huge],
                                                           "instructions": ["x"]}).encode())

        hostile_thread = threading.Thread(target=oversized)
        hostile_thread.start()
        started = time.monotonic()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, range(REQUESTS)))
        wall = time.monotonic() - started
        hostile_thread.join(timeout=60)
        slow_thread.join(timeout=60)
        metrics = client.metrics()

    ordered = sorted(latencies)
    p50, p99 = quantile(ordered, 0.5), quantile(ordered, 0.99)
    print(f"\nload: {REQUESTS} requests over {THREADS} threads in {wall:.2f} s ({REQUESTS / wall:.0f} req/s); "
          f"failures {len(errors)}; client latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {ordered[-1] * 1000:.1f} ms; server /score latency {metrics['latency_s']['/score']}; "
          f"statuses {metrics['requests']['by_status']}; slowloris cut off after {slow['bytes_sent']} bytes, "
          f"{slow['seconds']:.2f} s")
    assert errors == [], errors[:5]
    assert torch.allclose(scores, expected, atol=1e-6)  # every request answered with its own scores
    assert slow["answer"].startswith(b"HTTP/1.1 408"), slow["answer"][:200]
    assert slow["bytes_sent"] < 300  # cut off by the receive deadline, not by running out of bytes
    status, message = hostile["body"]
    assert status == 413 and "limit of 1048576 bytes" in message
    status, message = hostile["pixels"]
    assert status == 413 and "50000x50000" in message and "pixels per image" in message
    by_status = metrics["requests"]["by_path"]["/score"]
    assert by_status == {"200": REQUESTS, "408": 1, "413": 2}, by_status  # nothing busy (503), failed or dropped
