"""Loading pretrained weights from a local path or the Hugging Face hub, failing fast and clearly offline."""
from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path
from typing import Any, Callable


class WeightsUnavailableError(FileNotFoundError):
    """Model weights could not be found locally and could not be downloaded."""


_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the `rcgrpo` package folder

# Models shipped inside the package, by the short name every `--*-model` option accepts; `load_pretrained`
# resolves these names before anything else (a local path or hub id of the same name is never consulted).
# (The tiny editor loads through `rcgrpo.editors.loading.load_editor`; list it here when it should also be
# reachable by `load_pretrained`, e.g. `"tiny-editor": _PACKAGE_ROOT / "minibench" / "weights" / "tiny-editor"`.)
SHIPPED_MODELS: dict[str, Path] = {
    "tiny-clip": _PACKAGE_ROOT / "minibench" / "weights" / "tiny-clip",  # rcgrpo.minibench.clip (MiniBench CLIP)
}


def shipped_model_path(name: str) -> Path | None:
    """The folder of a shipped model's short name (`SHIPPED_MODELS`), or None for any other name."""
    return SHIPPED_MODELS.get(str(name))


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

    A shipped model's short name (`SHIPPED_MODELS`, e.g. "tiny-clip") loads its folder in the package.
    A local directory loads directly. A hub id loads from the local cache first; only when it is not
    cached and the hub is reachable is it downloaded. Offline and uncached, this fails at once with a
    `WeightsUnavailableError` naming the model and suggesting a local path (instead of the hub client's
    minute of retries).
    """
    hint = f" (pass {option} /local/path/to/model)" if option else " (pass a local directory instead)"
    text = str(name_or_path)
    shipped = shipped_model_path(text)
    if shipped is not None:
        if not shipped.is_dir():
            raise WeightsUnavailableError(f"{what} {text!r} is a model shipped with rcgrpo, but its folder "
                                          f"{str(shipped)!r} is missing from this installation")
        try:
            return load(str(shipped), **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsUnavailableError(f"could not load shipped {what} {text!r} from {str(shipped)!r}: {exc}") from None
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


__all__ = ["SHIPPED_MODELS", "WeightsUnavailableError", "hub_reachable", "load_pretrained", "shipped_model_path"]
