"""``compare``: several models x several seeds through the one harness, then one report.

By default every model trains (all its seeds, one after the other) in its own Python
process, so a model that crashes or exhausts memory cannot take the others down, and the
CPU peak-memory column (the process's RSS high-water mark) belongs to that model alone.
Within a process, an exception in one run is recorded and the next seed still runs.
``jobs > 1`` runs that many model processes side by side (one torch thread each): the
comparison ends sooner, but each model's seconds then include competing for the cores.
A worker's stderr (warnings, tracebacks) is kept in ``runs/<model>/worker.log``.

Signals: workers run in their own session, so Ctrl-C in a terminal reaches only this
process; SIGINT or SIGTERM to this process (to its PID alone, as ``kill`` or a scheduler
sends it) is forwarded once to every running worker, which stops at a batch boundary and
writes a resumable checkpoint. Each run ends as ok, failed, diverged, interrupted or not
started; ``--resume`` continues the interrupted and not-started ones.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from pcdeq_plugin.checks import check_count
from pcdeq_plugin.registry import MODELS

from .config import COMPARE_EPOCHS, ConfigError, TrainConfig
from .datasets import SPLITS, dataset_info, load_dataset
from .plan import PLAN_NAME, check_reference, check_same_experiment, plan_run, read_plan, write_plan
from .report import write_report
from .resolve import load_plugins_from_config
from .runtime import RunInterrupted
from .workers import Worker, run_one, run_workers

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_MODELS", "DEFAULT_SEEDS", "compare"]

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
DEFAULT_EPOCHS = COMPARE_EPOCHS


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


def _run_outcome(run_dir: Path, since: float) -> tuple[str, str | None] | None:
    """``(status, error)`` from the files a run wrote at or after ``since`` (a time stamp),
    or ``None`` when it wrote none (a summary from an earlier session does not count)."""
    for name in ("summary.json", "error.txt"):
        path = run_dir / name
        if not path.is_file() or path.stat().st_mtime < since - 1.0:
            continue
        if name == "error.txt":
            return "failed", path.read_text()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return "failed", f"unreadable {path}: {exc}"
        return str(data.get("status")), (None if data.get("status") == "ok" else data.get("error"))
    return None


def _check_preset(preset: str | None, models: list[str], info: dict[str, Any]) -> None:
    """A preset that none of the registered models has is a typo, not a choice."""
    registered = [m for m in models if info[m]["status"] == "registered"]
    if preset is None or not registered or any(info[m]["preset"] == preset for m in registered):
        return
    known = sorted({name for m in registered for name in MODELS.get(m).presets})
    raise ConfigError(
        f"none of the compared models has a preset {preset!r}; their presets: "
        f"{', '.join(known) or '(none)'} (or 'none' for the factory defaults)"
    )


def compare(
    models: list[str] | None = None,
    seeds: list[int] | None = None,
    *,
    out_dir: str | Path = "results/compare",
    dataset: str = "mnist5k",
    preset: str | None = "small",
    epochs: int = DEFAULT_EPOCHS,
    isolate: bool = True,
    jobs: int = 1,
    reference: str | None = None,
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
        epochs: Epochs per run (default :data:`DEFAULT_EPOCHS`).
        isolate: One child process per model (crash isolation, per-model peak memory).
        jobs: Model processes running at once (needs ``isolate``). More than one ends
            sooner, but then the seconds per epoch include competing for the cores.
        reference: Model the ratio columns divide by (default: the first pcDEQ model).
        resume: Continue the comparison in ``out_dir`` (its models and seeds unless given):
            finished runs reused, interrupted ones resumed, failed ones retried; ``epochs``
            may grow. The dataset, preset and run options must be the same.
        plots: Write the PNG plots.
        log: Progress messages go here (``None`` for silence).
        **train_options: Further :class:`TrainConfig` keys for every run (``train_limit``,
            ``batch_size``, ``device``, ...).

    Returns:
        The report: ``rows`` (one per model), ``runs``, ``markdown``, ``plots``.

    Raises:
        ConfigError: bad options, unwritable ``out_dir``, or ``out_dir`` already holds a
            comparison and ``resume`` is false (nothing is overwritten).
        UnknownNameError: unknown dataset.
        DatasetNotFoundError: the dataset is not on disk and ``download`` is not set.
    """
    out = Path(out_dir)
    earlier = read_plan(out) if resume else {}
    # resuming without naming models or seeds continues the comparison that is there
    models = list(models if models is not None else earlier.get("models", DEFAULT_MODELS))
    seeds = list(seeds if seeds is not None else earlier.get("seeds", DEFAULT_SEEDS))
    if reference is None and earlier.get("reference") in models:
        reference = earlier["reference"]
    if not models:
        raise ConfigError("compare needs at least one model")
    if not seeds:
        raise ConfigError("compare needs at least one seed")
    for what, values in (("model", models), ("seed", seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"{what}(s) {', '.join(repeated)} listed twice")
    check_count("epochs", epochs, error=ConfigError)
    check_count("jobs", jobs, error=ConfigError)
    if jobs > 1 and not isolate:
        raise ConfigError("jobs > 1 runs models in parallel worker processes; drop --in-process")
    check_reference(reference, models)
    forbidden = {
        "model", "seed", "out_dir", "resume", "overwrite", "preset", "epochs", "dataset"
    } & set(train_options)  # fmt: skip
    if forbidden:
        raise ConfigError(
            f"compare sets {', '.join(sorted(forbidden))} itself; pass them as compare arguments"
        )
    TrainConfig.check_keys(train_options)
    TrainConfig.from_dict(dict(train_options))  # bad values fail here, not once per run
    load_plugins_from_config(list(train_options.get("plugins", [])))
    dataset_info(dataset)  # unknown dataset -> UnknownNameError listing them, before any work
    # Open both splits once here: missing files fail now with one clear error instead of
    # once per run, and a --download happens once, not in several workers at the same time.
    data = {k: train_options[k] for k in ("data_dir", "download", "augment") if k in train_options}
    for split in SPLITS:
        load_dataset(dataset, split, **data)
    info = {model: _model_info(model, preset) for model in models}
    _check_preset(preset, models, info)
    say = log or (lambda *_: None)
    if earlier:
        check_same_experiment(out, earlier, dataset, preset, epochs, train_options)

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-probe").write_bytes(b"")
        (out / ".write-probe").unlink()
    except OSError as exc:
        raise ConfigError(
            f"output directory {out} is not writable ({exc}); choose another --out"
        ) from exc
    if not resume and ((out / PLAN_NAME).exists() or (out / "runs").exists()):
        raise ConfigError(
            f"{out} already holds a comparison; pass --resume to reuse/continue it or choose "
            "another --out directory (nothing was overwritten)"
        )

    plan: dict[str, Any] = {
        "models": models,
        "seeds": seeds,
        "dataset": dataset,
        "preset": preset,
        "epochs": epochs,
        "jobs": jobs,
        "reference": reference,
        "train_options": train_options,
        "model_info": info,
        "failures": {},
        "not_started": {},
    }
    write_plan(out, plan)
    started = time.perf_counter()
    tasks: list[tuple[str, Path, list[dict[str, Any]]]] = []
    for model in models:
        if info[model]["status"] != "registered":
            say(f"[compare] {model}: not registered -- reported in the table")
            continue
        pending = [
            config
            for seed in seeds
            if (config := plan_run(out, model, seed, info[model], epochs, resume, say)) is not None
        ]
        if pending:
            tasks.append((model, out / "runs" / model, pending))

    def finished(
        model: str,
        pending: list[dict[str, Any]],
        since: float,
        worker_error: str | None = None,
        stopped: bool = False,
    ) -> None:
        """Record each run's outcome; runs that wrote nothing this session are "not started"
        when the worker was stopped by a signal (or stopped earlier, crashing on the run
        before), and the first of them carries a crash's error otherwise."""
        blamed = False
        for config in pending:
            run_dir, seed = Path(config["out_dir"]), str(config["seed"])
            outcome = _run_outcome(run_dir, since)
            if outcome is None and (stopped or blamed):
                why = (
                    "its worker was stopped by a signal before reaching it"
                    if stopped
                    else "its worker crashed on an earlier seed"
                )
                outcome = ("not started", why)
            elif outcome is None:
                outcome, blamed = ("failed", worker_error or "the run left no summary"), True
            status, error = outcome
            if status != "ok" and not (run_dir / "summary.json").is_file():
                table = "not_started" if status == "not started" else "failures"
                plan[table].setdefault(model, {})[seed] = str(error)
            shown = (
                "ok" if status == "ok" else f"{status.upper()} ({str(error).splitlines()[0][:200]})"
            )
            say(f"[compare] {model} seed {seed}: {shown}")
        write_plan(out, plan)

    for _model, _, pending in tasks:
        for config in pending:
            config.update(train_options, dataset=dataset, epochs=epochs, progress=False)
    try:
        if isolate:

            def done(worker: Worker) -> None:
                stopped = worker.interrupted or "signal" in interrupted
                finished(worker.model, worker.configs, worker.wall_started, worker.error(), stopped)
                seconds = time.perf_counter() - worker.started
                say(f"[compare] {worker.model}: {len(worker.configs)} run(s) in {seconds:.1f}s")

            if jobs > 1:
                say(f"[compare] {len(tasks)} model(s), {jobs} at a time")
            interrupted: dict[str, Any] = {}
            name, never = run_workers(tasks, jobs, done, interrupted)
            for model, _, pending in never:
                finished(model, pending, time.time(), stopped=True)
            if name is not None:
                raise RunInterrupted(name)
        else:
            for index, (model, _, pending) in enumerate(tasks):
                tick, since = time.perf_counter(), time.time()
                try:
                    for config in pending:
                        run_one(config)
                except KeyboardInterrupt:
                    finished(model, pending, since, stopped=True)
                    for later, _, rest in tasks[index + 1 :]:
                        finished(later, rest, time.time(), stopped=True)
                    raise
                finished(model, pending, since)
                seconds = time.perf_counter() - tick
                say(f"[compare] {model}: {len(pending)} run(s) in {seconds:.1f}s")
    except KeyboardInterrupt:
        # the table of what finished so far; --resume completes (and re-renders) it
        plan["interrupted"] = True
        write_plan(out, plan)
        with contextlib.suppress(Exception):
            write_report(out, plots=False)
        raise
    plan["wall_seconds"] = time.perf_counter() - started
    write_plan(out, plan)
    report = write_report(out, plots=plots)
    say(
        f"[compare] wrote {out / 'compare.md'} and {out / 'compare.json'} in "
        f"{plan['wall_seconds']:.0f}s"
    )
    return report
