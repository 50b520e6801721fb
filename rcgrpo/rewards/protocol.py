"""The reward server's request and answer format, and the limits a request is checked against.

    POST /score  {"edited": [base64 PNG, ...], "sources": [base64 PNG, ...] (optional),
                  "instructions": [str, ...]}
    →            {"scores": [float or null, ...], "request_id": "..."}

One score per edited image, in order; a score that is not finite is sent as `null` (JSON has no NaN)
and clients reject it. A request is checked in this order, each step before any costlier one:
JSON nesting depth (a scan of the raw bytes, before `json.loads`), the fields, the PNG sizes read
from each image's IHDR header against the per-image cap and the per-request pixel budget, and only
then, in the scoring worker, the decoding of the PNGs.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .codec import decode_png_base64, png_size_base64

MiB = 2**20
TOKEN_ENV = "RCGRPO_REWARD_TOKEN"  # the server's token when --token is not given; the client sends it

# A JSON string (skipped whole: brackets inside strings do not nest) or one bracket. The unrolled
# form `[^"\\]*(?:\\.[^"\\]*)*` lets base64 payloads (no backslashes) be consumed in one C-level step.
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class RequestError(ValueError):
    """A request the server answers with `status` (4xx) and this message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestLimits:
    """What one POST /score may hold. Pixel limits are checked from the PNG headers before decoding."""

    max_request_bytes: int = 64 * MiB
    max_json_depth: int = 8
    max_images: int = 256  # edited + source images in one request
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 64 * 2**20  # e.g. 32 source/edited pairs of 1024x1024

    def validate(self) -> "RequestLimits":
        for name in ("max_request_bytes", "max_json_depth", "max_images", "max_image_pixels", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"request limit {name} must be at least 1, got {getattr(self, name)}")
        if self.max_json_depth < 2:
            raise ValueError(f"max_json_depth must be at least 2 (an object of lists), got {self.max_json_depth}")
        return self


@dataclass
class ScoreRequest:
    """A checked request whose images are still base64 PNG strings (decoded by `decode_images`)."""

    edited: list[str]
    sources: list[str] | None
    instructions: list[str]
    pixels: int

    def __len__(self) -> int:
        return len(self.edited)

    def decode_images(self):
        """(edited, sources or None) as PIL RGB images; RequestError(400) naming a PNG that cannot be read."""
        edited = [_decode(x, "edited", i) for i, x in enumerate(self.edited)]
        sources = None if self.sources is None else [_decode(x, "sources", i) for i, x in enumerate(self.sources)]
        return edited, sources


def json_depth(body: bytes, limit: int) -> int:
    """The nesting depth of the JSON text `body`, scanning bytes only; stops early past `limit`."""
    depth = deepest = 0
    for match in _JSON_TOKENS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_score_request(body: bytes, limits: RequestLimits, *, require_sources: bool = False) -> ScoreRequest:
    """The request in `body`, checked against `limits` (RequestError with status 400 or 413 otherwise)."""
    if json_depth(body, limits.max_json_depth) > limits.max_json_depth:
        raise RequestError(400, f"request JSON is nested deeper than {limits.max_json_depth} levels")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object with 'edited' and 'instructions' lists")
    unknown = sorted(set(data) - {"edited", "sources", "instructions"})
    if unknown:
        raise RequestError(400, f"unknown request fields {unknown}; expected edited, sources, instructions")
    edited, sources, instructions = data.get("edited"), data.get("sources"), data.get("instructions")
    if not isinstance(edited, list) or not edited:
        raise RequestError(400, "'edited' must be a non-empty list of base64 PNG images")
    if not isinstance(instructions, list) or len(instructions) != len(edited):
        raise RequestError(400, f"'instructions' must be a list of {len(edited)} strings (one per edited image)")
    if not all(isinstance(t, str) for t in instructions):
        raise RequestError(400, "'instructions' must contain only strings")
    if sources is not None and (not isinstance(sources, list) or len(sources) != len(edited)):
        raise RequestError(400, f"'sources' must be a list of {len(edited)} base64 PNG images (one per edited image)")
    if sources is None and require_sources:
        raise RequestError(400, "this scorer needs 'sources' (the images before editing)")
    images = [("edited", i, x) for i, x in enumerate(edited)]
    images += [("sources", i, x) for i, x in enumerate(sources or [])]
    if len(images) > limits.max_images:
        raise RequestError(413, f"request holds {len(images)} images; the server accepts at most {limits.max_images}")
    total = 0
    for field_name, index, data_b64 in images:
        if not isinstance(data_b64, str):
            raise RequestError(400, f"{field_name}[{index}] must be a base64 string, got {type(data_b64).__name__}")
        try:
            width, height = png_size_base64(data_b64)
        except ValueError as exc:
            raise RequestError(400, f"{field_name}[{index}] is {exc}") from None
        pixels = width * height
        if pixels > limits.max_image_pixels:
            raise RequestError(413, f"{field_name}[{index}] is {width}x{height} = {pixels} pixels; the server accepts "
                                    f"at most {limits.max_image_pixels} pixels per image")
        total += pixels
    if total > limits.max_request_pixels:
        raise RequestError(413, f"request holds {total} pixels in {len(images)} images; the server accepts at most "
                                f"{limits.max_request_pixels} pixels per request (send smaller batches)")
    return ScoreRequest(edited=edited, sources=sources, instructions=instructions, pixels=total)


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


def _decode(data: str, field_name: str, index: int):
    try:
        return decode_png_base64(data)
    except ValueError as exc:
        raise RequestError(400, f"{field_name}[{index}] is {exc}") from None


__all__ = ["TOKEN_ENV", "MiB", "RequestError", "RequestLimits", "ScoreRequest", "check_scores", "json_depth",
           "parse_score_request"]
