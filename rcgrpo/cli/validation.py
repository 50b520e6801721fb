"""Checks of command-line inputs that can run before any model is loaded."""
from __future__ import annotations

import os
from pathlib import Path


def check_output_dir(path, option: str) -> Path:
    """An output directory that exists as a directory or can be created: not empty, not a file, writable."""
    text = str(path)
    if not text.strip():
        raise ValueError(f"{option}: expected a directory path, got an empty string")
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{option} {text!r} is not writable (it is a file, not a directory)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{option} {text!r} is not writable ({str(parent)!r} is a file, not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {text!r} is not writable (no write permission on {str(parent)!r})")
    return out


__all__ = ["check_output_dir"]
