"""What the reward server counts: requests by status and path, and latency quantiles of recent requests."""
from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque


def quantile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank `q`-quantile (0 < q ≤ 1) of an ascending list (NaN for an empty one)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class ServerMetrics:
    """Thread-safe counters (by status, and by path and status); latencies of the last `window` requests
    of each path."""

    QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

    def __init__(self, window: int = 4096):
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._by_status: Counter = Counter()
        self._by_path: Counter = Counter()
        self._latency: dict[str, deque] = {}
        self._window = int(window)

    def record(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self._by_status[str(status)] += 1
            self._by_path[(path, str(status))] += 1
            self._latency.setdefault(path, deque(maxlen=self._window)).append(float(seconds))

    def count(self, status: int) -> int:
        with self._lock:
            return self._by_status[str(status)]

    def snapshot(self) -> dict:
        with self._lock:
            by_status = dict(sorted(self._by_status.items()))
            by_path: dict[str, dict[str, int]] = {}
            for (path, status), n in sorted(self._by_path.items()):
                by_path.setdefault(path, {})[status] = n
            latencies = {path: sorted(values) for path, values in self._latency.items()}
        latency = {}
        for path, values in sorted(latencies.items()):
            stats = {"count": len(values)}
            stats.update({name: round(quantile(values, q), 6) for name, q in self.QUANTILES})
            stats["max"] = round(values[-1], 6)
            latency[path] = stats
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "requests": {"total": sum(by_status.values()), "by_status": by_status, "by_path": by_path},
            "latency_s": latency,
            "latency_window": self._window,
        }


__all__ = ["ServerMetrics", "quantile"]
