"""Checkpoint and LoRA files of a training run: complete or absent, never partial.

    <run>/checkpoint-<step>/pytorch_lora_weights.safetensors   the adapter's own LoRA tensors (diffusers keys)
                           /optimizer.pt, scheduler.pt, rng.pt   torch.save'd state dicts (loaded weights_only)
                           /trainer_state.json                   step, counters, the config
                           /ema.safetensors                      the LoRA's EMA (with ema_decay > 0)
    <run>/lora/pytorch_lora_weights.safetensors                 the final LoRA, written by the editor family
    <run>/lora_ema/pytorch_lora_weights.safetensors             its EMA (with ema_decay > 0)

`lora/` and `lora_ema/` are what a stock pipeline's `load_lora_weights` loads (the editor folds the LoRA
scale alpha/rank into the weights); a checkpoint keeps the adapter's own tensors, so a resume restores
them bit for bit (with lora_alpha = lora_rank, the default, both files hold the same numbers).

Every directory is written through `rcgrpo.io.files.atomic_directory`: a crash, kill or full disk leaves
the previous checkpoints intact. A full disk surfaces as `CheckpointWriteError` (an OSError) naming the
directory; `torch.save` reports it as a RuntimeError, which is translated here.
"""
from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..editors.lora import LORA_WEIGHT_NAME
from ..io.files import atomic_directory, recover_interrupted_replace

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


class CheckpointWriteError(OSError):
    """A checkpoint or LoRA directory could not be written (earlier ones are intact)."""


@dataclass
class Checkpoint:
    """What `read_checkpoint` returns."""

    path: Path
    lora: dict  # peft state-dict keys (no "transformer." prefix) → tensors
    optimizer: dict
    scheduler: dict
    rng: dict
    state: dict  # trainer_state.json
    ema: dict | None = None  # {"tensors": parameter name → fp32 tensor, "updates": int} (rcgrpo.train.ema)


def list_checkpoints(directory) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first (temporary directories are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and (path / TRAINER_STATE).is_file():
            try:
                found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def find_checkpoint(path) -> Path:
    """The checkpoint to resume from: `path` itself if it is a complete checkpoint directory, else the
    newest complete checkpoint of the run directory `path`. ValueError naming `path` otherwise."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file() and path.name.startswith(CHECKPOINT_PREFIX):
        return path
    if not path.is_dir():
        raise ValueError(f"--resume {str(path)!r}: no such run or checkpoint directory")
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise ValueError(f"--resume {str(path)!r}: no complete checkpoint found there")
    return ckpts[-1]


def read_trainer_state(checkpoint) -> dict:
    """`trainer_state.json` of a checkpoint directory."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def _write_lora_file(directory: Path, lora_state: dict) -> None:
    """The adapter's tensors under diffusers' keys (`transformer.<module>.lora_A.weight`), as written by
    diffusers' `save_lora_weights`, for any editor family."""
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v.detach().contiguous() for k, v in lora_state.items()}
    save_file(tensors, str(directory / LORA_WEIGHT_NAME), metadata={"format": "pt"})


# What the writers say when a write fails (full disk, quota) without raising OSError: torch.save's C++
# zip writer raises RuntimeError, safetensors raises SafetensorError.
_WRITE_FAILURES = ("PytorchStreamWriter failed", "basic_ios::clear", "iostream error", "file write failed",
                   "inline_container.cc", "No space left on device", "I/O error", "Disk quota exceeded")


def _is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or any(m in str(exc) for m in _WRITE_FAILURES)


def _write_failed(what: Path, exc: BaseException) -> CheckpointWriteError:
    code = getattr(exc, "errno", None)
    detail = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    hint = "disk full; " if code == errno.ENOSPC or not isinstance(exc, OSError) else ""
    return CheckpointWriteError(code or errno.EIO, f"could not write {str(what)!r} ({hint}{detail}); "
                                                   "earlier checkpoints are intact")


def write_lora(directory, lora_state: dict, save=None) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` (diffusers format) atomically: with
    `save(lora_state, tmp_dir)` (an editor's `save_lora`), else the adapter's tensors as they are."""
    directory = Path(directory)
    try:
        with atomic_directory(directory) as tmp:
            (save or (lambda state, where: _write_lora_file(Path(where), state)))(lora_state, tmp)
    except Exception as exc:  # noqa: BLE001 - writers signal a full disk with several exception types
        if not _is_write_failure(exc):
            raise
        raise _write_failed(directory, exc) from exc
    return directory


def write_checkpoint(run_dir, step: int, *, lora_state: dict, optimizer_state: dict, scheduler_state: dict,
                     trainer_state: dict, ema_state: dict | None = None) -> Path:
    """Write `run_dir/checkpoint-<step>/` completely or not at all; returns its path. `ema_state` is
    `LoraEMA.state_dict()` (stored as safetensors) or None."""
    final = Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"
    try:
        with atomic_directory(final) as tmp:
            _write_lora_file(tmp, lora_state)
            if ema_state is not None:
                from safetensors.torch import save_file

                save_file(ema_state["tensors"], str(tmp / EMA_FILE), metadata={"updates": str(int(ema_state["updates"]))})
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler_state, tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    except Exception as exc:  # noqa: BLE001 - writers signal a full disk with several exception types
        if not _is_write_failure(exc):
            raise
        raise _write_failed(final, exc) from exc
    return final


def read_lora(path) -> dict:
    """LoRA tensors of a directory (or file) in the diffusers format, keys without the "transformer." prefix."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    prefix = "transformer."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in load_file(str(file)).items()}


def read_checkpoint(path) -> Checkpoint:
    """Everything of a complete checkpoint directory (state dicts loaded with weights_only=True)."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{str(path)!r} is not a complete rcgrpo checkpoint (no {TRAINER_STATE})")
    return Checkpoint(
        path=path,
        lora=read_lora(path),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        scheduler=torch.load(path / "scheduler.pt", weights_only=True),
        rng=torch.load(path / "rng.pt", weights_only=True),
        state=read_trainer_state(path),
        ema=_read_ema(path / EMA_FILE),
    )


def _read_ema(file: Path) -> dict | None:
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        updates = int((fh.metadata() or {}).get("updates", 0))
    return {"tensors": tensors, "updates": updates}


def prune_checkpoints(run_dir, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints of `run_dir`."""
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def prepare_run_directory(directory) -> None:
    """Create the run directory and check that files can be written in it."""
    import os

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"output directory {str(directory)!r} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {str(directory)!r} is not writable ({exc.strerror or exc})") from None


def clean_run_directory(run_dir) -> None:
    """Repair what an interrupted save left in `run_dir`: temporary directories are removed, a
    directory caught between the two renames of a replace is restored, and a checkpoint directory
    without its state file (a kill during pruning) is removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    recover_interrupted_replace(run_dir)
    for path in run_dir.iterdir():
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and not (path / TRAINER_STATE).is_file():
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    """The CPU and CUDA random generator states."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = [
    "prepare_run_directory",
    "CHECKPOINT_PREFIX",
    "Checkpoint",
    "CheckpointWriteError",
    "clean_run_directory",
    "find_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "read_checkpoint",
    "read_lora",
    "read_trainer_state",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
    "write_lora",
]
