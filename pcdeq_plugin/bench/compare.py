"""``compare``: several models x several seeds through the one harness, then one report.

By default every model trains (all its seeds, one after the other) in its own Python
process, so a model that crashes or exhausts memory cannot take the others down, and the
CPU peak-memory column (the process's RSS high-water mark) belongs to that model alone.
Within a process, an exception in one run is recorded and the next seed still runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pcdeq_plugin.registry import MODELS

from .config import ConfigError, TrainConfig
from .datasets import ensure_registered
from .metrics import write_json
from .report import PLAN, write_report
from .train import load_plugins_from_config, run

__all__ = ["DEFAULT_MODELS", "DEFAULT_SEEDS", "compare"]

# The README's head-to-head: pcDEQ-1, pcDEQ-2, monDEQ, NODE, ANODE, unconstrained DEQ.
DEFAULT_MODELS: tuple[str, ...] = (
    "pcdeq-linear-1",
    "pcdeq-linear-2",
    "mondeq-fc",
    "node",
    "anode",
    "deq-linear",
)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
_STDERR_TAIL = 1500
_INTERRUPT_GRACE = 120.0  # seconds a worker gets to save its checkpoint after Ctrl-C


def _model_info(model: str, preset: str | None) -> dict[str, Any]:
    """Is ``model`` registered, and which preset will it run with?"""
    try:
        spec = MODELS.get(model)
    except KeyError as exc:
        return {"status": "not registered", "error": str(exc)}
    used = preset if preset in spec.presets else None
    note = None if used == preset else f"no preset {preset!r}; factory defaults used"
    options = spec.presets.get(used, {}) if used else {}
    return {
        "status": "registered",
        "family": spec.family,
        "preset": used,
        "preset_options": json.loads(json.dumps(options, default=str)),
        "note": note,
    }


def _run_one(config: dict[str, Any]) -> str | None:
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


def _run_isolated(model_dir: Path, configs: list[dict[str, Any]]) -> str | None:
    """All seeds of one model in one child process (one torch start-up per model, and a
    crash or out-of-memory kill cannot reach the other models). Returns the child's
    stderr tail when it died, ``None`` when it exited normally."""
    batch = model_dir / "batch.json"
    batch.write_text(json.dumps(configs, indent=2))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "pcdeq_plugin.bench.compare", str(batch)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = process.communicate()
    except KeyboardInterrupt:
        # Ctrl-C reached the worker too (same process group); it stops at a batch boundary
        # and writes its resumable checkpoint. Wait for that instead of killing it.
        try:
            process.wait(timeout=_INTERRUPT_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if process.returncode == 0:
        return None
    return f"worker exit code {process.returncode}: {stderr.strip()[-_STDERR_TAIL:]}"


def _run_error(run_dir: Path, worker_error: str | None) -> str | None:
    """What went wrong in one run, from the files it left (``None``: it finished)."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        return None if data.get("status") == "ok" else str(data.get("error"))
    error_file = run_dir / "error.txt"
    if error_file.is_file():
        return error_file.read_text()
    return worker_error or "the run left no summary"


def compare(
    models: list[str] | None = None,
    seeds: list[int] | None = None,
    *,
    out_dir: str | Path = "results/compare",
    dataset: str = "mnist5k",
    preset: str | None = "small",
    epochs: int = 1,
    isolate: bool = True,
    resume: bool = False,
    plots: bool = True,
    log: Any = print,
    **train_options: Any,
) -> dict[str, Any]:
    """Train every model with every seed, then write ``compare.md``/``compare.json``/plots.

    Args:
        models: Registered model names (default :data:`DEFAULT_MODELS`). Names that are not
            registered are reported as such in the table.
        seeds: Seeds per model (default :data:`DEFAULT_SEEDS`).
        out_dir: Results directory (``runs/<model>/seed<k>/`` below it).
        dataset: Registered dataset name.
        preset: Model preset applied when the model has it (the table shows the one used).
        epochs: Epochs per run.
        isolate: One child process per run (crash isolation, per-run peak memory).
        resume: Reuse finished runs in ``out_dir`` and resume interrupted ones.
        plots: Write the PNG plots.
        log: Progress messages go here (``None`` for silence).
        **train_options: Further :class:`TrainConfig` keys for every run (``train_limit``,
            ``batch_size``, ``device``, ...).

    Returns:
        The report: ``rows`` (one per model), ``runs``, ``markdown``, ``plots``.
    """
    ensure_registered()
    models = list(models or DEFAULT_MODELS)
    seeds = list(DEFAULT_SEEDS if seeds is None else seeds)
    if not seeds:
        raise ConfigError("compare needs at least one seed")
    forbidden = {"model", "seed", "out_dir", "resume", "preset", "epochs", "dataset"} & set(
        train_options
    )
    if forbidden:
        raise ConfigError(
            f"compare sets {', '.join(sorted(forbidden))} itself; pass them as compare arguments"
        )
    TrainConfig.check_keys(train_options)
    load_plugins_from_config(list(train_options.get("plugins", [])))
    say = log or (lambda *_: None)

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-probe").write_bytes(b"")
        (out / ".write-probe").unlink()
    except OSError as exc:
        raise ConfigError(
            f"output directory {out} is not writable ({exc}); choose another --out"
        ) from exc
    if not resume and ((out / PLAN).exists() or (out / "runs").exists()):
        raise ConfigError(
            f"{out} already holds a comparison; pass --resume to reuse/continue it or choose "
            "another --out directory (nothing was overwritten)"
        )

    info = {model: _model_info(model, preset) for model in models}
    plan: dict[str, Any] = {
        "models": models,
        "seeds": seeds,
        "dataset": dataset,
        "preset": preset,
        "epochs": epochs,
        "train_options": train_options,
        "model_info": info,
        "failures": {},
    }
    write_json(out / PLAN, plan)
    started = time.perf_counter()
    for model in models:
        if info[model]["status"] != "registered":
            say(f"[compare] {model}: not registered -- reported in the table")
            continue
        pending: list[dict[str, Any]] = []
        for seed in seeds:
            run_dir = out / "runs" / model / f"seed{seed}"
            summary_path = run_dir / "summary.json"
            if (
                resume
                and summary_path.is_file()
                and json.loads(summary_path.read_text()).get("status") == "ok"
            ):
                say(f"[compare] {model} seed {seed}: finished earlier, reused")
                continue
            attempted = run_dir.is_dir() and any(run_dir.iterdir())
            if resume and attempted and not (run_dir / "last.pt").is_file():
                # a failed earlier attempt: keep it for inspection, start this seed afresh
                run_dir.rename(run_dir.with_name(f"seed{seed}.failed-{int(time.time())}"))
            run_dir.mkdir(parents=True, exist_ok=True)
            pending.append(
                {
                    **train_options,
                    "model": model,
                    "preset": info[model]["preset"],
                    "dataset": dataset,
                    "epochs": epochs,
                    "seed": seed,
                    "out_dir": str(run_dir),
                    "resume": bool(resume and (run_dir / "last.pt").is_file()),
                    "progress": False,
                }
            )
        if not pending:
            continue
        tick = time.perf_counter()
        worker_error = None
        if isolate:
            worker_error = _run_isolated(out / "runs" / model, pending)
        else:
            for config in pending:
                _run_one(config)
        for config in pending:
            error = _run_error(Path(config["out_dir"]), worker_error)
            if error is not None and not (Path(config["out_dir"]) / "summary.json").is_file():
                plan["failures"].setdefault(model, {})[str(config["seed"])] = error
            status = "ok" if error is None else f"FAILED ({error.splitlines()[0][:200]})"
            say(f"[compare] {model} seed {config['seed']}: {status}")
        say(f"[compare] {model}: {len(pending)} run(s) in {time.perf_counter() - tick:.1f}s")
        write_json(out / PLAN, plan)
    plan["wall_seconds"] = time.perf_counter() - started
    write_json(out / PLAN, plan)
    report = write_report(out, plots=plots)
    say(
        f"[compare] wrote {out / 'compare.md'} and {out / 'compare.json'} in {plan['wall_seconds']:.0f}s"
    )
    return report


def _worker_main(argv: list[str]) -> int:
    """``python -m pcdeq_plugin.bench.compare BATCH.json``: run the listed configs in order."""
    configs = json.loads(Path(argv[0]).read_text())
    for config in configs:
        error = _run_one(config)
        if error is not None:
            print(
                f"[compare worker] {config['model']} seed {config['seed']}: {error}",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
