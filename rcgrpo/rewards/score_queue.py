"""The reward server's scoring worker: one thread calls the scorer, behind a bounded queue.

Scorer calls are serialized (a GPU model is rarely thread-safe). Images are decoded here, by the
worker, so only the running request's pixels are ever decoded at once. `submit` raises `QueueFull`
(answered 503 with Retry-After) when `max_waiting` requests already wait besides the running one.
"""
from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from typing import Callable

from .protocol import ScoreRequest, check_scores

_MAX_RETRY_AFTER_S = 60

Scorer = Callable[..., list]


class ScorerUnavailable(RuntimeError):
    """Raised by a scorer for a transient overload (e.g. an upstream rate limit): answered 503, retried."""


class QueueFull(RuntimeError):
    def __init__(self, retry_after: int):
        super().__init__(f"the scoring queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class ScoreQueue:
    """One scoring worker thread behind a bounded queue (`max_waiting` requests besides the running one)."""

    def __init__(self, scorer: Scorer, max_waiting: int):
        self.scorer = scorer
        self.max_waiting = int(max_waiting)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcgrpo-scorer")
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self._seconds_per_job = 1.0  # moving average, for Retry-After

    @property
    def depth(self) -> int:
        with self._lock:
            return self._pending

    def retry_after(self) -> int:
        with self._lock:
            estimate = self._seconds_per_job * max(self._pending, 1)
        return int(min(_MAX_RETRY_AFTER_S, max(1, math.ceil(estimate))))

    def submit(self, request: ScoreRequest) -> concurrent.futures.Future:
        with self._lock:
            full = self._pending > self.max_waiting
            if not full:
                self._pending += 1
        if full:
            raise QueueFull(self.retry_after())
        future = self._executor.submit(self._run, request)
        future.add_done_callback(self._finished)
        return future

    def _run(self, request: ScoreRequest) -> list:
        start = time.monotonic()
        try:
            edited, sources = request.decode_images()
            raw = self.scorer(edited=edited, sources=sources, instructions=request.instructions)
            return check_scores(raw, len(request))
        finally:
            elapsed = time.monotonic() - start
            with self._lock:
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed

    def _finished(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["QueueFull", "ScoreQueue", "Scorer", "ScorerUnavailable"]
