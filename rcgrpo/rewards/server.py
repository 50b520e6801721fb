"""The reward server: scores edited images over HTTP (JSON in, JSON out, never pickle).

Run it on the machine that holds the reward model (see `rcgrpo.rewards.server_cli` for the flags and
for which EditScore field becomes the reward), and point the trainer at it:

    python -m rcgrpo.reward_server --scorer editscore --editscore-backbone qwen25vl \\
        --editscore-model Qwen/Qwen2.5-VL-7B-Instruct --editscore-lora EditScore/EditScore-7B
    rcgrpo train --reward-funcs editscore --editscore-url http://127.0.0.1:8765 ...

Endpoints (one request per connection: every answer carries `Connection: close` and `X-Request-Id`):
- `POST /score`: the format of `rcgrpo.rewards.protocol`; answers 200 `{"scores": [...], "request_id"}`.
- `GET /health`: `{"status": "ok", "scorer", "auth", "limits", "queue"}` (no token needed).
- `GET /metrics`: request counts by status and by path and status, latency quantiles (p50/p90/p99/max)
  of the last 4096 requests per path, queue depth (needs the token when one is set).
Errors answer `{"error": "...", "request_id": "..."}`: 400 (bad JSON, nesting deeper than the limit,
bad fields or PNGs), 401 (token missing or wrong; `WWW-Authenticate: Bearer`), 404, 405, 408 (the
request was not received within the receive deadline), 411 (no Content-Length), 413 (body, image
count, per-image pixels or per-request pixels over the limits, which the message states), 415 (not
`application/json`), 500 (the scorer failed: a generic message with the request id; the exception
and traceback go to the server's log under that id), 503 with `Retry-After` (the scoring queue is
full, the request waited past its deadline in the queue, or the scorer reported a transient
overload), 504 (scoring started but did not finish within the request deadline).

How it holds up (each bound is a flag of `python -m rcgrpo.reward_server`):
- authentication: an optional token (`--token` or the `RCGRPO_REWARD_TOKEN` environment variable),
  sent as `Authorization: Bearer <token>` or as the password of HTTP Basic auth (what a URL
  `http://user:<token>@host:port` sends), compared with `hmac.compare_digest`;
- a whole-request deadline (`--deadline`, from accept to answer) and a receive deadline
  (`--receive-deadline`) for the request line, headers and body together: the socket's timeout is
  set to the time left before every read, so a client trickling bytes (slowloris) is cut off with
  408 at the deadline, not reset by each byte;
- at most `--max-connections` connections are served at once; further ones wait in the listen
  backlog (`--backlog`), never refused by the server;
- one scorer call at a time (GPU models are rarely thread-safe) behind a queue of at most
  `--max-queue` waiting requests; beyond it, 503 with `Retry-After` (an estimate from recent scoring
  times), so a flood is answered, not dropped; images are decoded by the scoring worker, so only
  the running request's pixels are ever decoded;
- the body limit is checked from Content-Length before reading; pixel limits from the PNG headers
  before decoding; JSON depth by a byte scan before parsing.
Memory in the worst case is about `max_connections × max_request_mb × 3` for bodies being parsed,
plus one request's decoded pixels (`max_request_pixels × 3` bytes).

Why the standard library rather than uvicorn + starlette or LitServe: none of those gives a
deadline for receiving a request (uvicorn's `timeout_keep_alive` only covers idle time between
requests, and its request-start/complete timeouts were never merged), so bounding slow senders
would mean subclassing uvicorn's private protocol classes; the other properties (token, 415, depth,
pixel caps, request ids, metrics, a bounded queue with `Retry-After`) are application code in any
stack. `http.server` parses requests and headers (line and header-count limits included), the
deadline is one small raw reader under its buffered reader, and the server adds no dependency on the
reward model's machine, whose environment (torch, CUDA, vLLM) the EditScore package dictates.
"""
from __future__ import annotations

import base64
import concurrent.futures
import hmac
import io
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .protocol import TOKEN_ENV, RequestError, RequestLimits, ScoreRequest, parse_score_request
from .score_queue import QueueFull, Scorer, ScoreQueue, ScorerUnavailable
from .server_metrics import ServerMetrics

DEFAULT_PORT = 8765
_DRAIN_FACTOR = 4  # read (and drop) up to this many times the body limit so a 413 reaches the client

log = logging.getLogger("rcgrpo.reward_server")


@dataclass(frozen=True)
class ServerSettings:
    token: str = ""
    deadline_s: float = 300.0
    receive_deadline_s: float = 30.0
    max_connections: int = 32
    max_queue: int = 16
    backlog: int = 1024
    verbose: bool = False

    def validate(self) -> "ServerSettings":
        if not (self.deadline_s > 0 and self.receive_deadline_s > 0):
            raise ValueError(f"deadlines must be positive, got deadline {self.deadline_s} and receive deadline "
                             f"{self.receive_deadline_s}")
        for name in ("max_connections", "max_queue", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self


class RewardServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with bounded connections, deadlines, a token, limits and metrics."""

    daemon_threads = True

    def __init__(self, address, scorer: Scorer, *, scorer_name: str, settings: ServerSettings | None = None,
                 limits: RequestLimits | None = None):
        self.settings = (settings or ServerSettings()).validate()
        self.limits = (limits or RequestLimits()).validate()
        self.scorer_name = scorer_name
        self.require_sources = bool(getattr(scorer, "requires_sources", False))
        self.queue = ScoreQueue(scorer, self.settings.max_queue)
        self.metrics = ServerMetrics()
        self.request_queue_size = self.settings.backlog  # listen() backlog
        if ":" in str(address[0]):
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(self.settings.max_connections)
        self._closing = threading.Event()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request, client_address):
        # Wait for a free handler slot; meanwhile further connections wait in the kernel's listen backlog.
        while not self._slots.acquire(timeout=0.25):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def health(self) -> dict:
        return {"status": "ok", "scorer": self.scorer_name, "auth": "token" if self.settings.token else "none",
                "limits": asdict(self.limits), "queue": {"depth": self.queue.depth, "max": self.settings.max_queue},
                "deadline_s": self.settings.deadline_s, "receive_deadline_s": self.settings.receive_deadline_s}

    def server_close(self):
        self._closing.set()
        super().server_close()
        self.queue.close()


class _DeadlineReader(io.RawIOBase):
    """Reads a socket with the timeout set, before every read, to the time left until `deadline()`."""

    def __init__(self, sock: socket.socket, deadline: Callable[[], float]):
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline() - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "rcgrpo-reward-server/2"
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        settings = self.server.settings
        self.started = time.monotonic()
        self.deadline = self.started + settings.deadline_s
        self.receive_deadline = self.started + min(settings.receive_deadline_s, settings.deadline_s)
        self.request_id = secrets.token_hex(8)
        self.status = 0
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, lambda: self.receive_deadline), 1 << 16)

    # --- request line and dispatch (one request per connection) ---------------------------------------

    def handle_one_request(self):
        self.close_connection = True
        self.command, self.path = "", ""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                return
            if len(self.raw_requestline) > 65536:
                self._error(414, "request line longer than 65536 bytes")
                return
            if not self.parse_request():  # answers 400/431/505 itself (through send_error)
                return
            handler = {"GET": self._get, "POST": self._post}.get(self.command)
            if handler is None:
                self._error(405, f"method {self.command} is not allowed; use GET /health, GET /metrics or "
                                 "POST /score", headers={"Allow": "GET, POST"})
                return
            handler()
        except TimeoutError:
            seconds = min(self.server.settings.receive_deadline_s, self.server.settings.deadline_s)
            self._error(408, f"the request was not received within the server's {seconds:g} s receive deadline")
        except OSError as exc:  # the client went away
            log.debug("request %s: connection error %s", self.request_id, exc)
        finally:
            self._record()

    def send_error(self, code, message=None, explain=None):  # used by parse_request
        self._error(code, message or explain or HTTPStatus(code).phrase)

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _get(self):
        route = self._route()
        if route == "/health":
            self._send_json(200, self.server.health())
        elif route == "/metrics":
            if not self._authorized():
                self._unauthorized()
                return
            snapshot = self.server.metrics.snapshot()
            snapshot["queue"] = {"depth": self.server.queue.depth, "max": self.server.settings.max_queue}
            snapshot["scorer"] = self.server.scorer_name
            self._send_json(200, snapshot)
        else:
            self._error(404, f"no such path {route!r}; use GET /health, GET /metrics or POST /score")

    def _post(self):
        route = self._route()
        if route != "/score":
            self._discard_body()
            self._error(404, f"no such path {route!r}; use POST /score")
            return
        if not self._authorized():
            self._discard_body()
            self._unauthorized()
            return
        content_type = self.headers.get_content_type()
        if content_type != "application/json":
            self._discard_body()
            self._error(415, f"Content-Type must be application/json, got {content_type}")
            return
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "send the body with a Content-Length (no Transfer-Encoding)")
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self._error(411, "a Content-Length header is required")
            return
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self._error(400, f"invalid Content-Length {length_header!r}")
            return
        limit = self.server.limits.max_request_bytes
        if length > limit:
            self._discard(length, _DRAIN_FACTOR * limit)
            self._error(413, f"request body of {length} bytes exceeds the server's limit of {limit} bytes "
                             f"({limit / 2**20:g} MiB)")
            return
        body = self.rfile.read(length)  # TimeoutError past the receive deadline → 408
        if len(body) != length:
            self._error(400, f"request body ended after {len(body)} of {length} bytes")
            return
        try:
            request = parse_score_request(body, self.server.limits, require_sources=self.server.require_sources)
        except RequestError as exc:
            self._error(exc.status, str(exc))
            return
        del body
        self._score(request)

    def _score(self, request: ScoreRequest):
        queue = self.server.queue
        try:
            future = queue.submit(request)
        except QueueFull as exc:
            self._error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
            return
        concurrent.futures.wait([future], timeout=max(0.0, self.deadline - time.monotonic()))
        if not future.done():
            deadline = self.server.settings.deadline_s
            if future.cancel():
                self._error(503, f"the request waited in the scoring queue past the server's {deadline:g} s deadline",
                            headers={"Retry-After": str(queue.retry_after())})
            else:
                log.warning("request %s: scoring did not finish within the %g s deadline", self.request_id, deadline)
                self._error(504, f"scoring did not finish within the server's {deadline:g} s deadline")
            return
        try:
            scores = future.result()
        except RequestError as exc:  # a PNG that does not decode
            self._error(exc.status, str(exc))
            return
        except ScorerUnavailable as exc:
            log.warning("request %s: scorer unavailable: %s", self.request_id, exc)
            self._error(503, f"the scorer is temporarily unavailable ({exc})",
                        headers={"Retry-After": str(queue.retry_after())})
            return
        except Exception:  # noqa: BLE001 - any scorer failure is a 500; details stay in the server log
            log.exception("request %s: scorer %s failed", self.request_id, self.server.scorer_name)
            self._error(500, f"the scorer failed; the server log has the details under request id {self.request_id}")
            return
        self._send_json(200, {"scores": scores, "request_id": self.request_id})

    # --- authentication -----------------------------------------------------------------------------

    def _authorized(self) -> bool:
        token = self.server.settings.token
        if not token:
            return True
        scheme, _, value = self.headers.get("Authorization", "").strip().partition(" ")
        supplied = ""
        if scheme.lower() == "bearer":
            supplied = value.strip()
        elif scheme.lower() == "basic":
            try:
                supplied = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                supplied = ""
        return hmac.compare_digest(supplied.encode("utf-8"), token.encode("utf-8"))

    def _unauthorized(self):
        self._error(401, "missing or wrong token: send 'Authorization: Bearer <token>' or the token as the URL's "
                         "password",
                    headers={"WWW-Authenticate": 'Bearer realm="rcgrpo-reward-server"'})

    # --- bodies and answers -------------------------------------------------------------------------

    def _discard_body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        self._discard(length, self.server.limits.max_request_bytes)

    def _discard(self, length: int, cap: int):
        """Read and drop up to `cap` bytes of a body we answer without reading, so the client can finish
        sending and read the answer; stops at the receive deadline."""
        remaining = min(max(length, 0), cap)
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:  # includes TimeoutError: answer anyway
            pass

    def _error(self, status: int, message: str, *, headers: dict | None = None):
        if status >= 500 and status != 503:
            log.warning("request %s: %s %s → %d %s", self.request_id, self.command, self.path, status, message)
        self._send_json(status, {"error": message, "request_id": self.request_id}, headers=headers)

    def _send_json(self, status: int, payload: dict, *, headers: dict | None = None):
        if self.status:  # already answered
            return
        self.status = status
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        try:
            self.connection.settimeout(max(1.0, self.deadline - time.monotonic()))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Request-Id", self.request_id)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError as exc:
            log.debug("request %s: could not send the answer (%s)", self.request_id, exc)

    def log_request(self, code="-", size="-"):  # replaced by _record
        pass

    def _record(self):
        if not self.status:
            return  # nothing was asked (the client connected and left)
        elapsed = time.monotonic() - self.started
        route = self._route() if self.path else "-"
        if route not in ("/score", "/health", "/metrics"):
            route = "other"
        self.server.metrics.record(route, self.status, elapsed)
        if self.server.settings.verbose:
            log.info("request %s: %s %s → %d in %.3f s", self.request_id, self.command or "-", route, self.status,
                     elapsed)


def serve(server: RewardServer) -> None:
    """Serve until interrupted, then close the socket and the scoring worker."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["DEFAULT_PORT", "TOKEN_ENV", "RewardServer", "Scorer", "ScoreQueue", "ScorerUnavailable", "ServerSettings",
           "serve"]
