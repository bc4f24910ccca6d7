"""A run directory: one writer at a time, and checkpoints that agree with each other.

* **One writer.** A run holds ``.pcdeq-bench.lock`` (a :mod:`filelock` lock, released by
  the operating system even after ``kill -9``) from before it looks at the directory until
  it ends, so a second run into the same ``--out`` is refused instead of mixing its files
  with the first one's.
* **One commit point.** ``last.pt`` is written first at the end of an epoch; when the epoch
  is the best so far, ``best.pt`` is then a copy of that same file. A kill between the two
  writes leaves ``best.pt`` one improvement behind while ``last.pt`` records the newer best
  epoch -- and ``last.pt`` *is* that epoch's checkpoint, so :meth:`RunDirectory.reconcile`
  repairs ``best.pt`` from it on resume.
* **A way out.** A run that ended before its first checkpoint (it failed in epoch 1) cannot
  be resumed; the messages say so and offer ``overwrite``, which removes this harness's
  own files (nothing else) before the new run starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .checkpoint import CheckpointError, copy_file_atomic, load_checkpoint, save_checkpoint
from .config import ConfigError

__all__ = ["BEST", "LAST", "LOCK_NAME", "RUN_FILES", "RunDirectory", "describe_leftover"]

LAST = "last.pt"
BEST = "best.pt"
LOCK_NAME = ".pcdeq-bench.lock"
# Everything a run writes into its directory (``overwrite`` removes these and only these).
RUN_FILES: tuple[str, ...] = (
    LAST,
    BEST,
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "config.json",
    "error.txt",
)


def _say(message: str) -> None:
    print(f"pcdeq-bench: {message}", file=sys.stderr, flush=True)


def describe_leftover(out: Path) -> str:
    """What the run that left ``summary.json`` in ``out`` ended with, in a few words."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        status, error = summary.get("status"), summary.get("error")
    except (OSError, ValueError, AttributeError):
        return "it left no readable summary.json"
    return f"status {status!r}" + (f": {str(error).splitlines()[0][:200]}" if error else "")


class RunDirectory:
    """The locked output directory of one run (main process only).

    Use :meth:`open` as a context manager: the lock is held until the block ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last, self.best = path / LAST, path / BEST
        self._lock = FileLock(str(path / LOCK_NAME), timeout=0)

    @classmethod
    @contextlib.contextmanager
    def open(cls, out_dir: str | None, *, resuming: bool, overwrite: bool, enabled: bool = True):
        """Create, check and lock ``out_dir``; yields ``None`` when there is none to write.

        Raises:
            ConfigError: unwritable, locked by another run, or (fresh run without
                ``overwrite``) already holding a run; nothing is changed then.
        """
        if out_dir is None or not enabled:
            yield None
            return
        path = Path(out_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"output directory {path} is not writable ({exc}); choose another --out"
            ) from exc
        run_dir = cls(path)
        try:
            run_dir._lock.acquire()
        except Timeout:
            raise ConfigError(
                f"another pcdeq-bench run is writing to {path} (it holds {path / LOCK_NAME}); "
                "wait for it to end, or choose another --out (nothing was changed)"
            ) from None
        try:
            if not resuming:
                run_dir._make_fresh(overwrite)
            yield run_dir
        finally:
            run_dir._lock.release()

    def _make_fresh(self, overwrite: bool) -> None:
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        if found and overwrite:
            for name in found:
                (self.path / name).unlink()
            _say(f"--overwrite: removed the earlier run's {', '.join(found)} from {self.path}")
            return
        if not found:
            return
        if self.last.exists():
            raise ConfigError(
                f"{self.path} already holds a run ({describe_leftover(self.path)}); continue it "
                "with --resume, replace it with --overwrite, or choose another --out "
                "(nothing was changed)"
            )
        raise ConfigError(
            f"{self.path} holds a run that ended before its first checkpoint "
            f"({describe_leftover(self.path)}), so there is nothing to resume; start it again "
            "with --overwrite, or choose another --out (nothing was changed)"
        )

    # -- writes ------------------------------------------------------------------------
    def commit_epoch(self, snapshot: dict[str, Any], improved: bool) -> None:
        """``last.pt`` (the resume point) first, then ``best.pt`` as a copy of it."""
        save_checkpoint(self.last, snapshot)
        if improved:
            copy_file_atomic(self.last, self.best)

    # -- resume ------------------------------------------------------------------------
    def reread(self) -> dict[str, Any]:
        """``last.pt`` as it is now, under the lock (another run may have replaced the copy
        read before the lock was taken)."""
        return load_checkpoint(self.last)

    def reconcile(self, checkpoint: dict[str, Any]) -> None:
        """Make ``best.pt`` agree with the best epoch ``last.pt`` records (see the module
        docstring); say what was repaired."""
        recorded = (checkpoint.get("best") or {}).get("epoch")
        if recorded is None:
            return
        try:
            best_epoch = int(load_checkpoint(self.best)["epoch"]) if self.best.exists() else None
        except CheckpointError:
            best_epoch = -1  # unreadable: treat as stale
        if best_epoch == recorded:
            return
        end_of_best_epoch = int(checkpoint["epoch"]) == recorded and not checkpoint.get("step")
        if end_of_best_epoch:
            # last.pt is the checkpoint of the best epoch itself: best.pt is its copy
            copy_file_atomic(self.last, self.best)
            _say(
                f"repaired {self.best}: it held epoch {best_epoch} but the best epoch is "
                f"{recorded} (the run was stopped between the two checkpoint writes)"
            )
        else:
            _say(
                f"warning: {self.best} holds epoch {best_epoch}, not the best epoch {recorded} "
                f"that {self.last} records, and cannot be rebuilt from it; it will be replaced "
                "at the next improvement"
            )
