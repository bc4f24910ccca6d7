"""Checkpoints as plain data, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_write_bytes",
    "copy_file_atomic",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "pcdeq-bench-checkpoint/1"
_REQUIRED = ("format", "config", "model", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the file itself is left untouched."""


def _atomic_replace(path: Path, write: Any) -> None:
    """Write through ``write(fileobj)`` to a temporary file in ``path``'s directory, then rename.

    A crash (or Ctrl-C) at any moment leaves either the old file or the new one, never half.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(_write_failure(path, exc)) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # torch.save reports a full disk as "enforce fail at inline_container.cc"; say it plainly
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, CheckpointError):
            raise CheckpointError(_write_failure(path, exc)) from exc
        raise


def _write_failure(path: Path, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot write {path}: {first} -- is the disk full or the directory read-only? "
        f"The previous {path.name} (if any) was kept; free some space and continue with "
        "--resume"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    _atomic_replace(Path(path), lambda handle: handle.write(data))


def copy_file_atomic(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Replace ``target`` with a copy of ``source`` atomically."""
    with Path(source).open("rb") as handle:
        _atomic_replace(Path(target), lambda out: shutil.copyfileobj(handle, out, 1 << 20))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` a plain-data dict atomically (adds the format tag)."""
    payload = {"format": CHECKPOINT_FORMAT, **state}
    _atomic_replace(Path(path), lambda handle: torch.save(payload, handle))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing, unreadable, not plain data, or not a pcdeq-bench checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch's zip, or a bare pickle
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch checkpoint at all (it starts with "
            f"{head!r}; a pcdeq-bench checkpoint is the last.pt or best.pt of a run "
            "directory); it was left untouched -- restore it or start a new run in another "
            "directory"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than plain data (not written by "
            "pcdeq-bench), or is damaged; it was left untouched and was not loaded unsafely"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it was left untouched -- restore it or start a new run in another directory"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a pcdeq-bench checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    config = state["config"]
    named = isinstance(config, dict) and all(
        isinstance(config.get(key), str) and config.get(key) for key in ("model", "dataset")
    )
    if not named:
        found = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(
            f"checkpoint {path} has no usable config (it needs at least 'model' and 'dataset', "
            f"found {found or 'an empty one'}), so the model cannot be rebuilt; use a last.pt or "
            "best.pt written by pcdeq-bench train"
        )
    if isinstance(state["epoch"], bool) or not isinstance(state["epoch"], int):
        raise CheckpointError(
            f"checkpoint {path}: epoch must be an integer, got {state['epoch']!r}"
        )
    return state
