"""A small HTTP reward server: JSON in, JSON out, standard library only (never pickle).

Run it on the machine that holds the reward model (e.g. a GPU box with the `editscore` package):

    python -m rcgrpo.reward_server --port 8765 --scorer editscore --editscore-model /models/qwen25vl \\
        --editscore-lora /models/EditScore-7B
    python -m rcgrpo.reward_server --port 8765 --scorer my_package.my_module:score

and point the trainer at it with `EditScoreClient("http://127.0.0.1:8765")` (reward name `editscore`).

Protocol:
- `GET /health` → `{"status": "ok", "scorer": ..., "max_request_bytes": ..., "requests": n, "errors": n}`.
- `POST /score` with `{"edited": [base64 PNG, ...], "sources": [base64 PNG, ...] (optional),
  "instructions": [str, ...]}` → `{"scores": [float, ...]}`, one per edited image, in order. Scores that
  are not finite are sent as `null` (JSON has no NaN); clients reject them.
- Errors answer `{"error": "..."}` with 400 (bad JSON or fields), 404, 411 (no Content-Length),
  413 (body over `--max-request-mb`, default 64 MiB) or 500 (the scorer failed or returned the wrong
  number of scores).

A scorer `module:function` is called as `function(edited=[PIL.Image], sources=[PIL.Image] or None,
instructions=[str])` and returns a list of floats, one per edited image. Calls are serialized (one at a
time), since a GPU model is rarely thread-safe. The server binds to 127.0.0.1 by default; it has no
authentication, so only bind other addresses on a trusted network.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_MB = 64.0
_DRAIN_FACTOR = 4  # read (and discard) up to this many times the limit so a 413 reaches the client

Scorer = Callable[..., list]


def _decode_image(data, field: str, index: int):
    from .codec import decode_png_base64

    if not isinstance(data, str):
        raise ValueError(f"{field}[{index}] must be a base64 string, got {type(data).__name__}")
    try:
        return decode_png_base64(data)
    except ValueError as exc:
        raise ValueError(f"{field}[{index}] is {exc}") from None


def parse_request(body: bytes, *, require_sources: bool = False):
    """(edited, sources or None, instructions) from a request body; ValueError describes what is wrong."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("request body must be a JSON object with 'edited' and 'instructions' lists")
    edited = data.get("edited")
    instructions = data.get("instructions")
    sources = data.get("sources")
    if not isinstance(edited, list) or not edited:
        raise ValueError("'edited' must be a non-empty list of base64 PNG images")
    if not isinstance(instructions, list) or len(instructions) != len(edited):
        raise ValueError(f"'instructions' must be a list of {len(edited)} strings (one per edited image)")
    if not all(isinstance(t, str) for t in instructions):
        raise ValueError("'instructions' must contain only strings")
    if sources is not None and (not isinstance(sources, list) or len(sources) != len(edited)):
        raise ValueError(f"'sources' must be a list of {len(edited)} base64 images (one per edited image)")
    if sources is None and require_sources:
        raise ValueError("this scorer needs 'sources' (the images before editing)")
    edited_imgs = [_decode_image(x, "edited", i) for i, x in enumerate(edited)]
    source_imgs = None if sources is None else [_decode_image(x, "sources", i) for i, x in enumerate(sources)]
    return edited_imgs, source_imgs, instructions


def check_scores(scores, count: int) -> list:
    """Scores as JSON values: floats, non-finite ones as None. ValueError for a wrong count or type."""
    if hasattr(scores, "tolist"):
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"scorer returned {type(scores).__name__}, expected a list of {count} floats")
    if len(scores) != count:
        raise ValueError(f"scorer returned {len(scores)} scores for {count} images")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool):
            raise ValueError(f"scorer returned a bool at index {i}, expected a float")
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"scorer returned {s!r} at index {i}, expected a float") from None
        out.append(value if math.isfinite(value) else None)
    return out


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, scorer: Scorer, *, scorer_name: str, max_request_bytes: int,
                 request_timeout: float = 120.0, verbose: bool = False):
        self.scorer = scorer
        self.scorer_name = scorer_name
        self.max_request_bytes = int(max_request_bytes)
        self.request_timeout = request_timeout
        self.verbose = verbose
        self.score_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "rcgrpo-reward-server/1"
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.request_timeout  # socket timeout: a stalled client cannot hold a thread
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        if status >= 400:
            with self.server.stats_lock:
                self.server.errors += 1

    def do_GET(self):  # noqa: N802 - http.server naming
        if self.path.split("?")[0].rstrip("/") == "/health":
            with self.server.stats_lock:
                stats = {"requests": self.server.requests, "errors": self.server.errors}
            self._send_json(200, {"status": "ok", "scorer": self.server.scorer_name,
                                  "max_request_bytes": self.server.max_request_bytes, **stats})
        else:
            self._send_json(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})

    def do_POST(self):  # noqa: N802
        if self.path.split("?")[0].rstrip("/") != "/score":
            self._send_json(404, {"error": f"no such path {self.path!r}; use POST /score"})
            return
        with self.server.stats_lock:
            self.server.requests += 1
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self._send_json(411, {"error": "a Content-Length header is required"})
            return
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self._send_json(400, {"error": f"invalid Content-Length {length_header!r}"})
            return
        limit = self.server.max_request_bytes
        if length > limit:
            self._drain(length)
            self._send_json(413, {"error": f"request body of {length} bytes exceeds the server's limit of {limit} bytes"})
            return
        try:
            body = self.rfile.read(length)
        except OSError as exc:
            self._send_json(400, {"error": f"could not read the request body ({exc})"})
            return
        if len(body) != length:
            self._send_json(400, {"error": f"request body ended after {len(body)} of {length} bytes"})
            return
        try:
            edited, sources, instructions = parse_request(
                body, require_sources=getattr(self.server.scorer, "requires_sources", False))
        except ValueError as exc:
            self._send_json(400, {"error": str(exc)})
            return
        try:
            with self.server.score_lock:
                raw = self.server.scorer(edited=edited, sources=sources, instructions=instructions)
        except Exception as exc:  # noqa: BLE001 - any scorer failure is a 500 for the client
            self._send_json(500, {"error": f"scorer {self.server.scorer_name} failed: {type(exc).__name__}: {exc}"})
            return
        try:
            scores = check_scores(raw, len(edited))
        except ValueError as exc:
            self._send_json(500, {"error": str(exc)})
            return
        self._send_json(200, {"scores": scores})

    def _drain(self, length: int) -> None:
        """Read and drop a too-large body (up to a bound) so the client can finish sending and read the 413."""
        remaining = min(length, _DRAIN_FACTOR * self.server.max_request_bytes)
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------
# Scorers


def load_function_scorer(spec: str) -> Scorer:
    """The callable named by `"package.module:function"` (ValueError naming what failed)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--scorer {spec!r}: expected 'editscore' or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--scorer {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"--scorer {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


class EditScoreScorer:
    """Wraps the `editscore` package's `EditScore(...).evaluate([source, edited], instruction)`; the
    score is the result's `key` entry (default "overall")."""

    requires_sources = True

    def __init__(self, *, backbone: str, model_name_or_path: str, lora_path: str | None = None,
                 score_range: int = 25, num_pass: int = 1, key: str = "overall", **kwargs):
        try:
            from editscore import EditScore
        except ImportError as exc:
            raise RuntimeError(
                f"--scorer editscore needs the 'editscore' package ({exc}); install it on the GPU machine "
                "(see https://github.com/VectorSpaceLab/EditScore) or use --scorer module:function"
            ) from None
        options = dict(backbone=backbone, model_name_or_path=model_name_or_path, score_range=score_range,
                       num_pass=num_pass, **kwargs)
        if lora_path:
            options.update(enable_lora=True, lora_path=lora_path)
        self.model = EditScore(**options)
        self.key = key

    def __call__(self, *, edited, sources, instructions):
        scores = []
        for src, out, text in zip(sources, edited, instructions):
            result = self.model.evaluate([src, out], text)
            if not isinstance(result, dict) or self.key not in result:
                raise RuntimeError(f"EditScore result has no {self.key!r} entry: {str(result)[:200]}")
            scores.append(float(result[self.key]))
        return scores


def build_scorer(args) -> tuple[Scorer, str]:
    if args.scorer == "editscore":
        if not args.editscore_model:
            raise ValueError("--scorer editscore needs --editscore-model (a local path or hub id of the backbone)")
        scorer = EditScoreScorer(backbone=args.editscore_backbone, model_name_or_path=args.editscore_model,
                                 lora_path=args.editscore_lora, score_range=args.editscore_score_range,
                                 num_pass=args.editscore_num_pass, key=args.editscore_key)
        return scorer, "editscore"
    return load_function_scorer(args.scorer), args.scorer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rcgrpo.reward_server", description="HTTP reward server (JSON, no pickle)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--scorer", default="editscore", help="'editscore' or 'module:function' (default editscore)")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                   help=f"largest request body in MiB; larger ones get HTTP 413 (default {DEFAULT_MAX_REQUEST_MB:g})")
    p.add_argument("--request-timeout", type=float, default=120.0, help="socket timeout per connection, seconds")
    p.add_argument("--editscore-backbone", default="qwen25vl", help="EditScore backbone (default qwen25vl)")
    p.add_argument("--editscore-model", default=None, help="EditScore backbone model: local path or hub id")
    p.add_argument("--editscore-lora", default=None, help="EditScore LoRA weights (local path or hub id)")
    p.add_argument("--editscore-score-range", type=int, default=25)
    p.add_argument("--editscore-num-pass", type=int, default=1)
    p.add_argument("--editscore-key", default="overall", help="which EditScore result to return (default overall)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"reward_server: error: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if not args.max_request_mb > 0:
        print("reward_server: error: --max-request-mb must be positive", file=sys.stderr)
        return 2
    try:
        scorer, name = build_scorer(args)
    except ValueError as exc:
        print(f"reward_server: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"reward_server: error: {exc}", file=sys.stderr)
        return 1
    try:
        server = RewardServer((args.host, args.port), scorer, scorer_name=name,
                              max_request_bytes=int(args.max_request_mb * 2**20),
                              request_timeout=args.request_timeout, verbose=args.verbose)
    except OSError as exc:
        print(f"reward_server: error: cannot listen on {args.host}:{args.port} ({exc})", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"reward_server: warning: listening on {args.host}, reachable from other machines; the server has "
              "no authentication", file=sys.stderr)
    print(f"rcgrpo reward server ({name}) listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
