"""Several reward servers behind one reward callable, with fail-over.

    pool = EditScorePool("http://gpu-a:8765,http://gpu-b:8765", batch_size=8, timeout=300)
    scores = pool(edited, sources, masks, instructions, metadata)         # Tensor[B] float32

A call is cut into batches of `batch_size` images (one POST /score each, `EditScoreClient`'s format);
the batches go out concurrently (at most `max_requests` requests at once per pool), each to the usable
server with the fewest requests outstanding from this process (ties: round robin, starting at the
process's `RANK` so that the ranks of a run do not all start on the first server).

Fail-over. A server that fails a request for a reason of its own (no connection, a reset, a timeout,
HTTP 502/503/504: `RewardServerError.transient`) is set aside, and the batch is resent to another
usable server (or to the same one once it is back): each batch's scores are taken from the one answer
that succeeded, so no image is lost or counted twice. A set-aside server is probed through
`GET /health` in a background thread, first `probe_interval` seconds later, then at doubling intervals
up to `max_probe_interval` while it keeps failing; it is used again as soon as a probe answers. The
interval starts over once the server scores a batch. Answers that would fail on any server (4xx, a
500 from the scorer, a malformed or non-finite score) are not resent: they raise `RewardServerError`
at once. When no server has been usable for `unavailable_timeout` seconds (default `timeout`), the
batches waiting for one fail with `RewardsUnavailableError`, one line naming every server and its
last error, and further batches fail as soon as one more probe of every server fails; a batch that keeps
failing for that long (a server whose /health answers but whose scoring does not) fails the same
way. `retry_count` counts the resent batches. Results equal one server's when the servers score alike (same scorer, deterministic).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import torch

from .editscore import EditScoreClient, RewardServerError, parse_server_url, redact_url

log = logging.getLogger("rcgrpo.rewards.pool")


class RewardsUnavailableError(RewardServerError):
    """No server of a pool was usable for longer than its `unavailable_timeout`."""


def split_urls(value, what: str = "editscore_url") -> list[str]:
    """The URLs in `value`: one string with URLs separated by commas and/or whitespace, or a list of such
    strings. ValueError naming `what` for no URL, a URL that is not http(s)://host:port, or one given twice
    (a comma in a password must be percent-encoded, %2C)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{what}: expected URLs as a string or a list of strings, got {type(value).__name__}")
    urls = [u for item in items for u in re.split(r"[,\s]+", item) if u]
    if not urls:
        raise ValueError(f"{what}: expected at least one http(s)://host:port URL, got {value!r}")
    seen: dict[tuple, str] = {}
    for i, url in enumerate(urls):
        parsed = parse_server_url(url, f"{what}: URL {i + 1} of {len(urls)}")
        where = (parsed.scheme, parsed.hostname, parsed.port, parsed.path.rstrip("/").removesuffix("/score"))
        if where in seen:
            raise ValueError(f"{what}: {redact_url(url)!r} names the same server as {redact_url(seen[where])!r}; "
                             "list each server once")
        seen[where] = url
    return urls


@dataclass
class _Server:
    client: EditScoreClient
    outstanding: int = 0  # requests of this pool in flight to it
    usable: bool = True
    probe_at: float = 0.0  # while set aside: monotonic time of the next /health probe
    strikes: int = 0  # failures (requests or probes) since its last scored batch
    probing: bool = False
    last_error: str = ""
    scored: int = 0  # batches it answered

    @property
    def url(self) -> str:
        return self.client.display_url


class EditScorePool:
    """The EditScore reward over several reward servers (see the module docstring).

    Args:
        urls: URLs as `split_urls` reads them (one URL is a pool of one: it fails over to itself).
        token, batch_size, send_sources: as `EditScoreClient` (one token for every server; a URL may
            carry its own credentials).
        timeout: seconds for connecting and for each wait for data of one request.
        unavailable_timeout: seconds without any usable server before batches fail (default `timeout`).
        probe_interval, max_probe_interval: seconds between /health probes of a set-aside server.
        max_requests: requests in flight at once from this pool (default 2 per server, at least 2).
    """

    name = "editscore"
    asynchronous = True

    def __init__(self, urls, *, token: str | None = None, batch_size: int = 8, timeout: float = 300.0,
                 unavailable_timeout: float | None = None, probe_interval: float = 2.0,
                 max_probe_interval: float = 60.0, max_requests: int | None = None, send_sources: bool = True):
        urls = split_urls(urls, "EditScorePool: urls")
        unavailable_timeout = timeout if unavailable_timeout is None else unavailable_timeout
        if not (unavailable_timeout >= 0 and probe_interval > 0 and max_probe_interval >= probe_interval):
            raise ValueError("EditScorePool: unavailable_timeout ≥ 0 and 0 < probe_interval ≤ max_probe_interval "
                             f"are required, got {unavailable_timeout}, {probe_interval}, {max_probe_interval}")
        self.servers = [_Server(EditScoreClient(u, token=token, batch_size=batch_size, timeout=timeout, retries=0,
                                                send_sources=send_sources)) for u in urls]
        self.batch_size = int(batch_size)
        self.timeout = float(timeout)
        self.unavailable_timeout = float(unavailable_timeout)
        self.probe_interval = float(probe_interval)
        self.max_probe_interval = float(max_probe_interval)
        self.max_requests = int(max_requests or max(2, 2 * len(urls)))
        if self.max_requests < 1:
            raise ValueError(f"EditScorePool: max_requests must be ≥ 1, got {max_requests}")
        self.retry_count = 0
        self._cond = threading.Condition()
        self._cursor = int(os.environ.get("RANK", "0") or 0) % len(self.servers)
        self._none_usable_since: float | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(self.max_requests)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def status(self) -> list[dict]:
        """Per server: url (redacted), usable, outstanding requests, batches scored, last error."""
        with self._cond:
            return [{"url": s.url, "usable": s.usable, "outstanding": s.outstanding, "scored": s.scored,
                     "last_error": s.last_error} for s in self.servers]

    def __call__(self, edited, sources, masks, instructions, metadata=None) -> torch.Tensor:
        first = self.servers[0].client
        batch = first.check_inputs(edited, sources, masks, instructions, metadata)
        payloads = [(start, first.encode(edited, sources, instructions, start, min(start + self.batch_size, batch)))
                    for start in range(0, batch, self.batch_size)]
        if len(payloads) == 1:
            return torch.tensor(self._score(*payloads[0]), dtype=torch.float32)
        executor = self._pool_executor()
        futures = [executor.submit(self._score, start, payload) for start, payload in payloads]
        concurrent.futures.wait(futures)
        scores: list[float] = []
        for future in futures:  # the first failure in batch order, once every batch is done
            scores.extend(future.result())
        return torch.tensor(scores, dtype=torch.float32)

    # ------------------------------------------------------------------ one batch
    def _score(self, offset: int, payload: dict) -> list[float]:
        failing_since = None  # the first transient failure of this batch
        while True:
            with self._slots:
                server = self._acquire()
                try:
                    scores = server.client.score_encoded(payload, offset)
                except RewardServerError as exc:
                    self._release(server, exc)
                    if not exc.transient:
                        raise
                    error = exc
                except BaseException as exc:
                    self._release(server, exc)
                    raise
                else:
                    self._release(server, None)
                    return scores
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= self.unavailable_timeout:  # e.g. a server that answers /health, not /score
                with self._cond:
                    raise self._unavailable_error(now - failing_since)
            with self._cond:
                self.retry_count += 1
            log.warning("reward server %s set aside (%s); resending its batch of %d images", server.url,
                        _one_line(error), len(payload["edited"]))

    def _acquire(self) -> _Server:
        """The usable server with the fewest outstanding requests (counted from now on); waits while none
        is usable, RewardsUnavailableError past `unavailable_timeout`."""
        probed_all = False
        with self._cond:
            while True:
                now = time.monotonic()
                self._start_due_probes(now)
                usable = [i for i, s in enumerate(self.servers) if s.usable]
                if usable:
                    n = len(self.servers)
                    i = min(usable, key=lambda j: (self.servers[j].outstanding, (j - self._cursor) % n))
                    self._cursor = (i + 1) % n
                    server = self.servers[i]
                    server.outstanding += 1
                    return server
                if self._none_usable_since is None:
                    self._none_usable_since = now
                left = self._none_usable_since + self.unavailable_timeout - now
                if left <= 0:  # past the timeout: one last probe of every server before giving up
                    if not probed_all:
                        probed_all = True
                        for server in self.servers:
                            server.probe_at = min(server.probe_at, now)
                        continue
                    if not any(s.probing for s in self.servers):
                        raise self._unavailable_error(now - self._none_usable_since)
                    self._cond.wait(timeout=0.5)
                    continue
                next_probe = min((s.probe_at for s in self.servers if not s.probing), default=now + left)
                self._cond.wait(timeout=max(0.01, min(left, next_probe - now, 1.0)))

    def _release(self, server: _Server, error: BaseException | None) -> None:
        with self._cond:
            server.outstanding -= 1
            if error is None:
                server.scored += 1
                server.strikes = 0
            elif isinstance(error, RewardServerError) and error.transient:
                server.last_error = _one_line(error)
                if server.usable:
                    server.usable = False
                    server.strikes += 1
                    server.probe_at = time.monotonic() + self._interval(server)
                if not any(s.usable for s in self.servers) and self._none_usable_since is None:
                    self._none_usable_since = time.monotonic()
            self._cond.notify_all()

    # ------------------------------------------------------------------ probes
    def _start_due_probes(self, now: float) -> None:
        for server in self.servers:
            if not server.usable and not server.probing and server.probe_at <= now:
                server.probing = True
                threading.Thread(target=self._probe, args=(server,), name="rcgrpo-reward-probe", daemon=True).start()

    def _probe(self, server: _Server) -> None:
        try:
            server.client.health(timeout=min(self.timeout, 10.0))
            error = None
        except RewardServerError as exc:
            error = exc
        with self._cond:
            server.probing = False
            if error is None:
                server.usable = True
                self._none_usable_since = None
                log.warning("reward server %s answers /health again; using it", server.url)
            else:
                server.last_error = _one_line(error)
                server.strikes += 1
                server.probe_at = time.monotonic() + self._interval(server)
            self._cond.notify_all()

    def _interval(self, server: _Server) -> float:
        return min(self.max_probe_interval, self.probe_interval * 2 ** max(0, min(server.strikes - 1, 30)))

    # ------------------------------------------------------------------ helpers
    def _unavailable_error(self, waited: float) -> RewardsUnavailableError:
        names = "; ".join(f"{s.url} ({s.last_error or 'set aside'})" for s in self.servers)
        return RewardsUnavailableError(
            f"no reward server scored for {waited:.0f} s (unavailable_timeout {self.unavailable_timeout:g} s): {names}",
            url=", ".join(self.urls))

    def _pool_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._cond:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_requests,
                                                                       thread_name_prefix="rcgrpo-editscore")
            return self._executor


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


__all__ = ["EditScorePool", "RewardsUnavailableError", "split_urls"]
