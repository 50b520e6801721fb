"""Loading pretrained weights from a local path or the Hugging Face hub, failing fast and clearly offline."""
from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path
from typing import Any, Callable


class WeightsUnavailableError(FileNotFoundError):
    """Model weights could not be found locally and could not be downloaded."""


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub endpoint accepts a TCP connection (a quick check, to fail fast offline
    instead of waiting for the hub client's retries)."""
    try:
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            return False, "HF_HUB_OFFLINE is set"
        endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    except Exception:  # noqa: BLE001 - no hub client: let from_pretrained decide
        endpoint = "https://huggingface.co"
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return False, f"cannot reach {endpoint} ({exc})"
    return True, ""


def load_pretrained(load: Callable[..., Any], name_or_path: str, *, what: str, option: str | None = None,
                    local_files_only: bool = False, **kwargs):
    """`load(name_or_path, **kwargs)` (a `from_pretrained`) with a clear error when weights are missing.

    A local directory loads directly. A hub id loads from the local cache first; only when it is not
    cached and the hub is reachable is it downloaded. Offline and uncached, this fails at once with a
    `WeightsUnavailableError` naming the model and suggesting a local path (instead of the hub client's
    minute of retries).
    """
    hint = f" (pass {option} /local/path/to/model)" if option else " (pass a local directory instead)"
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        try:
            return load(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsUnavailableError(f"could not load {what} from local path {str(path)!r}: {exc}") from None
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1:  # a path, not an org/name hub id
        raise WeightsUnavailableError(f"{what}: local path {text!r} does not exist")
    try:
        return load(str(name_or_path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_exc:
        if local_files_only:
            raise WeightsUnavailableError(
                f"{what} {str(name_or_path)!r} is not a local path and not in the local Hugging Face cache{hint}"
            ) from None
        reachable, why = hub_reachable()
        if not reachable:
            raise WeightsUnavailableError(
                f"{what} {str(name_or_path)!r} is not a local path, not in the local Hugging Face cache, and it "
                f"cannot be downloaded: {why}{hint}"
            ) from None
        del cached_exc
    try:
        return load(str(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(f"could not load {what} {str(name_or_path)!r}: {exc}{hint}") from None


__all__ = ["WeightsUnavailableError", "hub_reachable", "load_pretrained"]
