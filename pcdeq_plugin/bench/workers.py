"""``compare``'s worker processes: one per model, trained seed after seed, and signals.

Workers run in their own session, so Ctrl-C in a terminal reaches only the ``compare``
process; SIGINT or SIGTERM to it (to its PID alone, as ``kill`` or a scheduler sends it)
is forwarded once to every running worker, which stops at a batch boundary, writes a
resumable checkpoint and exits ``128 + signal``. A worker whose parent disappears (``kill
-9``) stops the same way instead of training on unobserved.

``python -m pcdeq_plugin.bench.workers BATCH.json`` is the worker's command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runtime import STOP_SIGNALS, RunInterrupted, sigterm_as_interrupt
from .session import run

__all__ = ["Worker", "run_one", "run_workers"]

_STDERR_TAIL = 1500
_INTERRUPT_GRACE = 120.0  # seconds a worker gets to save its checkpoint after a signal

Task = tuple[str, Path, list[dict[str, Any]]]


def run_one(config: dict[str, Any]) -> str | None:
    """Train one run in this process; ``None`` on success, else the error text."""
    try:
        run(config)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one model's crash must not stop the others
        error = f"{type(exc).__name__}: {exc}"
        run_dir = Path(config["out_dir"])
        if not (run_dir / "summary.json").is_file():
            (run_dir / "error.txt").write_text(error)
        return error
    return None


@dataclass
class Worker:
    """One model's child process, training all its pending seeds in turn."""

    model: str
    configs: list[dict[str, Any]]
    process: subprocess.Popen
    log: Path
    started: float
    wall_started: float

    @property
    def interrupted(self) -> bool:
        """The worker stopped on SIGINT/SIGTERM (its exit code says so)."""
        return self.process.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM)

    def error(self) -> str | None:
        """``None`` when the child exited normally, else its exit code and stderr tail."""
        if self.process.returncode == 0:
            return None
        try:
            tail = self.log.read_text(errors="replace").strip()[-_STDERR_TAIL:]
        except OSError:
            tail = ""
        return f"worker exit code {self.process.returncode}: {tail}"


def _start_worker(model_dir: Path, model: str, configs: list[dict[str, Any]]) -> Worker:
    """All seeds of one model in one child process (one torch start-up per model, and a
    crash or out-of-memory kill cannot reach the other models)."""
    batch = model_dir / "batch.json"
    batch.write_text(json.dumps(configs, indent=2))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    log = model_dir / "worker.log"
    command = [sys.executable, "-m", "pcdeq_plugin.bench.workers", str(batch)]
    # stderr goes to a file, not a pipe: several workers at once cannot block on a full pipe.
    # Own session: a terminal's Ctrl-C reaches this process only, which forwards it once
    # (a worker that got it twice would abort without its checkpoint).
    with log.open("a") as handle:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=handle,
            start_new_session=True,
        )
    return Worker(model, configs, process, log, time.perf_counter(), time.time())


def run_workers(
    tasks: list[Task],
    jobs: int,
    done: Any,
    stop: dict[str, Any],
) -> tuple[str | None, list[Task]]:
    """Run the per-model workers, at most ``jobs`` at a time; ``done(worker)`` as each ends.

    SIGINT/SIGTERM to this process is forwarded to the running workers, no new worker
    starts, and the running ones get :data:`_INTERRUPT_GRACE` seconds to write their
    resumable checkpoints (then they are killed). ``stop`` gets the signal's ``"signal"``
    name when one comes. Returns that name (``None``: none came) and the tasks that were
    never started.
    """
    queue, running = list(tasks), []

    def forward(signum: int, frame: Any) -> None:
        stop.setdefault("signal", signal.Signals(signum).name)
        stop.setdefault("deadline", time.monotonic() + _INTERRUPT_GRACE)
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS} if main_thread else {}
    try:
        while (queue and not stop) or running:
            while queue and not stop and len(running) < jobs:
                model, model_dir, configs = queue.pop(0)
                running.append(_start_worker(model_dir, model, configs))
            time.sleep(0.1)
            if stop and time.monotonic() > stop["deadline"]:
                for worker in running:
                    worker.process.kill()  # past the grace: its last checkpoint stays
            for worker in [w for w in running if w.process.poll() is not None]:
                running.remove(worker)
                done(worker)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return stop.get("signal"), queue


def _watch_parent(parent: int) -> None:
    """Stop this worker (as SIGTERM would: checkpoint, then exit) once its parent is gone
    -- killed with -9, say -- instead of training on unobserved in its own session."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="compare-parent-watch", daemon=True).start()


def _worker_main(argv: list[str]) -> int:
    """``python -m pcdeq_plugin.bench.workers BATCH.json``: run the listed configs in order.

    Exits 0 when every run ended (ok or not); on SIGINT/SIGTERM the run in progress writes
    its resumable checkpoint and the worker exits ``128 + signal`` without starting the
    next one.
    """
    configs = json.loads(Path(argv[0]).read_text())
    _watch_parent(os.getppid())
    with sigterm_as_interrupt():
        for config in configs:
            try:
                error = run_one(config)
            except KeyboardInterrupt as exc:
                name = exc.signal_name if isinstance(exc, RunInterrupted) else "SIGINT"
                print(
                    f"[compare worker] {config['model']} seed {config['seed']}: stopped by "
                    f"{name}; later seeds not started",
                    file=sys.stderr,
                )
                return 128 + int(getattr(signal, name))
            if error is not None:
                print(
                    f"[compare worker] {config['model']} seed {config['seed']}: {error}",
                    file=sys.stderr,
                )
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
