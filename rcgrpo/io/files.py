"""Atomic file and directory writes: a reader sees the old content or the new, never a partial one.

    atomic_write_bytes(path, data)            atomic_write_text(path, text)
    with atomic_file(path) as tmp: ...        (writers that want a path: PIL, matplotlib, torch.save)
    with atomic_directory(path) as tmp: ...   (a directory of files, swapped in when complete)

The data goes to a temporary sibling (`.<name>.tmp-<pid>-<random>`), is fsync'd, and is renamed over
the destination; the parent directory is fsync'd after the rename. Before the rename, files get mode
0666 and directories 0777, both masked by the process umask, so results are as readable as a plain
`open(path, "w")` would make them (0644 under umask 022) whatever the writer did (mkstemp and
safetensors create 0600 files). On any error the temporary is removed and the destination is left as
it was.

A directory that already exists is replaced in two renames (old → `.<name>.old-<pid>`, new → name);
`recover_interrupted_replace(parent)` repairs the one window where a crash can leave only the old
copy under its hidden name.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def _sibling(path: Path, mark: str) -> Path:
    return path.parent / f".{path.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back
    os.umask(mask)
    return mask


def _normalize_modes(root: Path) -> None:
    """Give files 0666 and directories 0777, minus the umask: some writers (safetensors) create 0600 files."""
    mask = current_umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (best effort for directories on filesystems that refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is synced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp
        _normalize_modes(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success its files are synced and it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    tmp.mkdir(0o777)
    try:
        yield tmp
        _normalize_modes(tmp)
        for child in tmp.rglob("*"):
            if child.is_file():
                fsync_path(child)
        fsync_path(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, final: Path) -> None:
    """Move the complete directory `new` to `final`; an existing `final` is removed only afterwards."""
    if final.exists():
        old = _sibling(final, OLD_MARK)
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)
    fsync_path(final.parent)


def recover_interrupted_replace(parent) -> list[Path]:
    """Undo the effects of a crash in the middle of `replace_directory` under `parent`.

    A hidden `.<name>.old-*` whose `<name>` is missing is renamed back; a leftover one whose `<name>`
    exists, and every `.<name>.tmp-*`, is deleted. Returns the directories restored.
    """
    parent = Path(parent)
    restored: list[Path] = []
    if not parent.is_dir():
        return restored
    for entry in sorted(parent.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        if OLD_MARK in name:
            final = parent / name[1 : name.index(OLD_MARK)]
            if entry.is_dir() and not final.exists():
                os.rename(entry, final)
                restored.append(final)
            else:
                _remove(entry)
        elif TMP_MARK in name:
            _remove(entry)
    return restored


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


__all__ = [
    "current_umask",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_path",
    "recover_interrupted_replace",
    "replace_directory",
]
