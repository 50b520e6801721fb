"""The EditScore reward over HTTP: a client of the reward server (`rcgrpo.rewards.server`)."""
from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from .checks import check_reward_inputs
from .codec import encode_png_base64


class RewardServerError(RuntimeError):
    """The reward server could not be reached, failed, or returned invalid scores."""


class EditScoreClient:
    """Reward from an EditScore server (`python -m rcgrpo.reward_server`): JSON over HTTP, never pickle.

    Each batch of `batch_size` examples is one `POST {url}/score` with body
    `{"edited": [base64 PNG], "sources": [base64 PNG], "instructions": [str]}`; the answer is
    `{"scores": [float, ...]}`, one finite float per example. Connection errors, timeouts and 5xx answers
    are retried `retries` times with exponential backoff (`backoff · 2^attempt` seconds); 4xx answers
    (e.g. 413, request too large) fail at once. Every error is a `RewardServerError` naming the URL.
    """

    name = "editscore"

    def __init__(self, url: str, *, batch_size: int = 8, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, send_sources: bool = True):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"EditScoreClient: url must be http(s)://host:port, got {url!r}")
        if batch_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("EditScoreClient: batch_size ≥ 1, timeout > 0, retries ≥ 0 and backoff ≥ 0 are required")
        self.url = url.rstrip("/")
        self.display_url = redact_url(self.url)  # what errors and logs show: no user:password
        self.score_url = self.url if parsed.path.rstrip("/").endswith("/score") else self.url + "/score"
        self.batch_size = int(batch_size)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.send_sources = send_sources

    def health(self) -> dict:
        """GET /health of the server (RewardServerError when it does not answer)."""
        base = self.score_url[: -len("/score")]
        try:
            with urllib.request.urlopen(base + "/health", timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RewardServerError(f"reward server at {self.display_url} did not answer /health: {exc}") from None

    def __call__(self, edited, sources, masks, instructions, metadata=None) -> torch.Tensor:
        batch = check_reward_inputs(edited, sources if self.send_sources else None, masks, instructions, metadata,
                                    name=self.name, need_sources=self.send_sources)
        if instructions is None:
            raise ValueError(f"{self.name}: needs one instruction per image")
        scores: list[float] = []
        for start in range(0, batch, self.batch_size):
            stop = min(start + self.batch_size, batch)
            payload = {
                "edited": [encode_png_base64(edited[i]) for i in range(start, stop)],
                "instructions": [str(t) for t in instructions[start:stop]],
            }
            if self.send_sources:
                payload["sources"] = [encode_png_base64(sources[i]) for i in range(start, stop)]
            scores.extend(self._post(payload, stop - start, start))
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, payload: dict, count: int, offset: int) -> list[float]:
        body = json.dumps(payload).encode("utf-8")
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            req = urllib.request.Request(self.score_url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code >= 500:
                    last_error = f"HTTP {exc.code}: {detail}"
                    continue
                if exc.code == 413:
                    raise RewardServerError(
                        f"reward server at {self.display_url} rejected a request of {len(body)} bytes as too large "
                        f"(HTTP 413: {detail}); lower batch_size or raise the server's --max-request-mb"
                    ) from None
                raise RewardServerError(f"reward server at {self.display_url} rejected the request (HTTP {exc.code}: {detail})") from None
            except (TimeoutError, socket.timeout):
                last_error = f"no answer within the {self.timeout:g} s timeout"
                continue
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last_error = f"no answer within the {self.timeout:g} s timeout"
                else:
                    last_error = f"cannot connect ({reason}); is the server running?"
                continue
            except (ConnectionError, OSError) as exc:  # reset / broken pipe mid-request
                last_error = f"connection failed ({exc})"
                continue
            return self._parse(raw, count, offset)
        raise RewardServerError(
            f"reward server at {self.display_url} failed after {self.retries + 1} attempt(s): {last_error}"
        )

    def _parse(self, raw: bytes, count: int, offset: int) -> list[float]:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RewardServerError(f"reward server at {self.display_url} answered with invalid JSON ({exc})") from None
        scores = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(scores, list):
            raise RewardServerError(f"reward server at {self.display_url} answered without a 'scores' list: {str(data)[:200]}")
        if len(scores) != count:
            raise RewardServerError(f"reward server at {self.display_url} returned {len(scores)} scores for {count} images")
        out = []
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
                raise RewardServerError(
                    f"reward server at {self.display_url} returned a non-finite or non-numeric score {s!r} for example "
                    f"{offset + i}; scores must be finite floats"
                )
            out.append(float(s))
        return out


def redact_url(url: str) -> str:
    """`url` without the user:password part, for messages and saved configs."""
    parsed = urllib.parse.urlparse(url)
    if not (parsed.username or parsed.password):
        return url
    host = parsed.hostname or ""
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return urllib.parse.urlunparse(parsed._replace(netloc=f"***@{host}"))


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return exc.reason if isinstance(exc.reason, str) else str(exc)
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])[:500]
    except ValueError:
        pass
    return text.strip()[:500] or str(exc.reason)


__all__ = ["EditScoreClient", "RewardServerError", "redact_url"]
