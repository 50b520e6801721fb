"""The EditScore reward over HTTP: a client of the reward server (`python -m rcgrpo.reward_server`)."""
from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus

import torch

from .checks import check_reward_inputs
from .codec import encode_png_base64
from .protocol import TOKEN_ENV


class RewardServerError(RuntimeError):
    """The reward server could not be reached, refused or failed a request, or returned invalid scores.

    `url` is redacted (no credentials); `status` is the HTTP status when there was an answer, and
    `request_id` the server's id for it (its log has the details of a 500 under that id). `transient`
    is True when the server itself failed, not the request: no connection, a timeout, 502/503/504; the
    same request may succeed on another server (`rcgrpo.rewards.pool` resends it there).
    """

    def __init__(self, message: str, *, url: str, status: int | None = None, request_id: str | None = None,
                 transient: bool = False):
        super().__init__(message)
        self.url = url
        self.status = status
        self.request_id = request_id
        self.transient = transient


class EditScoreClient:
    """Reward from a reward server (`python -m rcgrpo.reward_server`): JSON over HTTP, never pickle.

    Each batch of `batch_size` examples is one `POST {url}/score` with body
    `{"edited": [base64 PNG], "sources": [base64 PNG], "instructions": [str]}`; the answer is
    `{"scores": [float, ...]}`, one finite float per example.

    Credentials: `token` is sent as `Authorization: Bearer <token>`; without it, a user and password in
    the URL (`http://user:secret@host:port`) are sent as HTTP Basic auth (the server accepts its token as
    the password), else the token in `$RCGRPO_REWARD_TOKEN`, if set. URLs in messages are redacted.

    Failures: `timeout` bounds connecting and each wait for data (seconds). A 503 answer (server busy)
    and connection errors (refused, reset) are retried `retries` times with exponential backoff
    (`backoff · 2^attempt` s, at least the server's Retry-After, at most `max_backoff`); nothing else is
    retried: a timeout may mean the scorer is still working, and a 4xx or 500 would fail again. Every
    error is a `RewardServerError` naming the URL, the HTTP status and the server's message.
    `retry_count` counts the retries made so far (all calls, all threads).

    The client is `asynchronous` (see `rcgrpo.rewards`): the trainer may call it from a background
    thread while it rolls out the next group, with CPU tensors.
    """

    name = "editscore"
    asynchronous = True

    def __init__(self, url: str, *, token: str | None = None, batch_size: int = 8, timeout: float = 300.0,
                 retries: int = 3, backoff: float = 0.5, max_backoff: float = 30.0, send_sources: bool = True):
        self.display_url = redact_url(str(url).rstrip("/"))  # what errors and logs show
        parsed = parse_server_url(url, "EditScoreClient: url")
        if batch_size < 1 or not timeout > 0 or retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("EditScoreClient: batch_size ≥ 1, timeout > 0, retries ≥ 0, backoff ≥ 0 and "
                             "max_backoff ≥ 0 are required")
        if token is not None and (parsed.username or parsed.password):
            raise ValueError(f"EditScoreClient: give the credentials in the URL or as token=, not both "
                             f"({self.display_url})")
        netloc = parsed.hostname if ":" not in parsed.hostname else f"[{parsed.hostname}]"
        if parsed.port is not None:
            netloc += f":{parsed.port}"
        path = parsed.path.rstrip("/")
        if path.endswith("/score"):
            path = path[: -len("/score")]
        self.base_url = urllib.parse.urlunparse((parsed.scheme, netloc, path, "", "", ""))
        self.score_url = self.base_url + "/score"
        self._auth = _authorization(token, parsed)
        self.batch_size = int(batch_size)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.send_sources = send_sources
        self.retry_count = 0
        self._count_lock = threading.Lock()

    def health(self, timeout: float | None = None) -> dict:
        """GET /health (RewardServerError when the server does not answer it within `timeout` s,
        default the client's)."""
        return self._get("/health", timeout)

    def metrics(self) -> dict:
        """GET /metrics: request counts by status, latency quantiles, queue depth."""
        return self._get("/metrics")

    def __call__(self, edited, sources, masks, instructions, metadata=None) -> torch.Tensor:
        batch = self.check_inputs(edited, sources, masks, instructions, metadata)
        scores: list[float] = []
        for start in range(0, batch, self.batch_size):
            stop = min(start + self.batch_size, batch)
            scores.extend(self.score_encoded(self.encode(edited, sources, instructions, start, stop), start))
        return torch.tensor(scores, dtype=torch.float32)

    def check_inputs(self, edited, sources, masks, instructions, metadata) -> int:
        """The batch size B, after the checks of the reward signature (ValueError otherwise)."""
        batch = check_reward_inputs(edited, sources if self.send_sources else None, masks, instructions, metadata,
                                    name=self.name, need_sources=self.send_sources)
        if instructions is None:
            raise ValueError(f"{self.name}: needs one instruction per image")
        return batch

    def encode(self, edited, sources, instructions, start: int, stop: int) -> dict:
        """The body of one POST /score for images `start:stop` (base64 PNGs)."""
        payload = {
            "edited": [encode_png_base64(edited[i]) for i in range(start, stop)],
            "instructions": [str(t) for t in instructions[start:stop]],
        }
        if self.send_sources:
            payload["sources"] = [encode_png_base64(sources[i]) for i in range(start, stop)]
        return payload

    def score_encoded(self, payload: dict, offset: int = 0) -> list[float]:
        """The scores of one request body from `encode` (`offset`: the index of its first image, for messages)."""
        data = self._send("POST", "/score", json.dumps(payload).encode("utf-8"))
        return self._scores(data, len(payload["edited"]), offset)

    # --- HTTP ---------------------------------------------------------------------------------------

    def _get(self, path: str, timeout: float | None = None) -> dict:
        data = self._send("GET", path, None, timeout)
        if not isinstance(data, dict):
            raise RewardServerError(f"reward server at {self.display_url} answered {path} with {str(data)[:200]}",
                                    url=self.display_url)
        return data

    def _send(self, method: str, path: str, body: bytes | None, timeout: float | None = None):
        """The JSON answer of one request, with the retry policy of the class docstring."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._auth:
            headers["Authorization"] = self._auth
        where = f"reward server at {self.display_url}"
        last = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                message, request_id = _error_detail(exc)
                status = f"HTTP {exc.code} ({_phrase(exc.code)}): {message}" + (
                    f" [request id {request_id}]" if request_id else "")
                if exc.code == 503 and attempt < self.retries:
                    last = status
                    self._sleep(attempt, exc.headers.get("Retry-After"))
                    continue
                if exc.code == 503:
                    raise RewardServerError(f"{where} was busy for {attempt + 1} attempt(s): {status}",
                                            url=self.display_url, status=exc.code, request_id=request_id,
                                            transient=True) from None
                raise RewardServerError(f"{where} answered {method} {path} with {status}{_hint(exc.code)}",
                                        url=self.display_url, status=exc.code, request_id=request_id,
                                        transient=exc.code in (502, 504)) from None
            except (TimeoutError, socket.timeout):
                raise RewardServerError(self._timeout_message(method, path, timeout), url=self.display_url,
                                        transient=True) from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    raise RewardServerError(self._timeout_message(method, path, timeout), url=self.display_url,
                                            transient=True) from None
                last = _connection_message(exc.reason)
            except (ConnectionError, http.client.HTTPException, OSError) as exc:  # reset mid-answer
                last = _connection_message(exc)
            else:
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise RewardServerError(f"{where} answered {path} with invalid JSON ({exc})",
                                            url=self.display_url) from None
            if attempt < self.retries:
                self._sleep(attempt, None)
        raise RewardServerError(f"{where} failed {method} {path} after {self.retries + 1} attempt(s): {last}",
                                url=self.display_url, transient=True)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        with self._count_lock:
            self.retry_count += 1
        delay = self.backoff * (2 ** attempt)
        try:
            if retry_after is not None:
                delay = max(delay, float(retry_after))
        except ValueError:
            pass
        time.sleep(min(delay, self.max_backoff))

    def _timeout_message(self, method: str, path: str, timeout: float | None) -> str:
        return (f"reward server at {self.display_url} did not answer {method} {path} within the {timeout or self.timeout:g} s "
                "timeout (not retried: the scorer may still be working; raise timeout= or send smaller batches)")

    def _scores(self, data, count: int, offset: int) -> list[float]:
        scores = data.get("scores") if isinstance(data, dict) else None
        where = f"reward server at {self.display_url}"
        if not isinstance(scores, list):
            raise RewardServerError(f"{where} answered without a 'scores' list: {str(data)[:200]}", url=self.display_url)
        if len(scores) != count:
            raise RewardServerError(f"{where} returned {len(scores)} scores for {count} images", url=self.display_url)
        out = []
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
                raise RewardServerError(f"{where} returned a non-finite or non-numeric score {s!r} for example "
                                        f"{offset + i}; scores must be finite floats", url=self.display_url)
            out.append(float(s))
        return out


def parse_server_url(url, what: str = "url") -> urllib.parse.ParseResult:
    """The parts of a reward server's `http(s)://[user:password@]host[:port][/path]` URL; ValueError
    naming `what` and the (redacted) URL otherwise."""
    parsed = urllib.parse.urlparse(str(url).strip())
    try:
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parsed = parsed._replace(scheme="")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{what} must be http(s)://host:port, got {redact_url(str(url).rstrip('/'))!r}")
    return parsed


def redact_url(url: str) -> str:
    """`url` without the user:password part, for messages and saved configs (each URL of a comma or
    space separated list)."""
    parts = re.split(r"([,\s]+)", url)
    if len(parts) > 1:
        return "".join(part if i % 2 else redact_url(part) for i, part in enumerate(parts))
    parsed = urllib.parse.urlparse(url)
    if "@" not in parsed.netloc:
        return url
    return urllib.parse.urlunparse(parsed._replace(netloc="***@" + parsed.netloc.rpartition("@")[2]))


def _authorization(token: str | None, parsed: urllib.parse.ParseResult) -> str:
    if token is not None:
        if not token:
            raise ValueError("EditScoreClient: token= must not be empty (pass None for no token)")
        return f"Bearer {token}"
    if parsed.username or parsed.password:
        user = urllib.parse.unquote(parsed.username or "")
        password = urllib.parse.unquote(parsed.password or "")
        return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
    env = os.environ.get(TOKEN_ENV)
    return f"Bearer {env}" if env else ""


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "unknown status"


def _hint(code: int) -> str:
    if code == 401:
        return (f"; give the server's token: EditScoreClient(token=...), ${TOKEN_ENV}, or the password in the URL")
    if code == 413:
        return "; send smaller batches (batch_size) or raise the server's limits"
    if code == 500:
        return "; the server's log has the details under that request id"
    return ""


def _connection_message(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot connect ({reason}); is the server running?"
    return f"connection failed ({type(reason).__name__}: {reason})"


def _error_detail(exc: urllib.error.HTTPError) -> tuple[str, str | None]:
    """(message, request id) of an error answer."""
    request_id = exc.headers.get("X-Request-Id") if exc.headers else None
    try:
        text = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the connection may be gone; the status is still known
        return (exc.reason if isinstance(exc.reason, str) else str(exc)), request_id
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])[:500], str(data.get("request_id") or request_id or "") or None
    except ValueError:
        pass
    return text.strip()[:500] or str(exc.reason), request_id


__all__ = ["TOKEN_ENV", "EditScoreClient", "RewardServerError", "parse_server_url", "redact_url"]
