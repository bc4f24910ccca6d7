"""The plan of a comparison (``compare_plan.json``) and the rules for resuming one.

The plan names the compared models, seeds, dataset, preset, epochs and run options, and
records what failed or never started; ``report`` reads it to list models whose runs left
no summary. ``--resume`` continues the same experiment: it may add models or seeds, extend
the epochs and change where or how runs execute, but not what a run is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import RESUMABLE_OVERRIDES, ConfigError
from .metrics import write_json
from .rundir import LOCK_NAME

__all__ = [
    "PLAN_NAME",
    "check_reference",
    "check_same_experiment",
    "plan_run",
    "read_plan",
    "write_plan",
]

#: The plan's file name in a comparison directory (its presence makes one).
PLAN_NAME = "compare_plan.json"


def read_plan(results_dir: Path) -> dict[str, Any]:
    """The plan in ``results_dir`` (``{}`` when it holds none).

    Raises:
        ConfigError: the plan is unreadable or not a plan (one message for ``compare
            --resume``, ``report`` and the CLI).
    """
    path = Path(results_dir) / PLAN_NAME
    if not path.is_file():
        return {}
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is unreadable ({exc}); it names the compared models -- restore it, "
            "delete it to report the run summaries alone, or choose another --out"
        ) from exc
    if not isinstance(plan, dict):
        raise ConfigError(f"{path} is not a pcdeq-bench compare plan")
    return plan


def write_plan(results_dir: Path, plan: dict[str, Any]) -> None:
    """Write ``plan`` atomically into ``results_dir``."""
    write_json(Path(results_dir) / PLAN_NAME, plan)


def check_reference(reference: str | None, models: list[str]) -> None:
    """Refuse a ratio reference that is not one of the compared ``models``.

    Raises:
        ConfigError: ``reference model 'x' is not in this comparison; available: ...``.
    """
    if reference is not None and reference not in models:
        raise ConfigError(
            f"reference model {reference!r} is not in this comparison; available: "
            f"{', '.join(models) or '(none)'}"
        )


def check_same_experiment(
    out: Path,
    earlier: dict[str, Any],
    dataset: str,
    preset: str | None,
    epochs: int,
    train_options: dict[str, Any],
) -> None:
    """Refuse to resume ``earlier`` (the plan in ``out``) as another experiment.

    Raises:
        ConfigError: listing every difference (nothing is changed).
    """

    def experiment(options: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in options.items() if k not in RESUMABLE_OVERRIDES}
        return json.loads(json.dumps(kept, default=str))  # tuples and lists compare equal

    changes = [
        f"{key}: {before!r} there, {now!r} given"
        for key, before, now in (
            ("dataset", earlier.get("dataset"), dataset),
            ("preset", earlier.get("preset"), preset),
        )
        if before != now
    ]
    before, now = experiment(earlier.get("train_options") or {}), experiment(train_options)

    def shown(options: dict[str, Any], key: str) -> str:
        return repr(options[key]) if key in options else "default"

    changes += [
        f"{key}: {shown(before, key)} there, {shown(now, key)} given"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]
    if int(earlier.get("epochs") or 0) > epochs:
        changes.append(f"epochs: {earlier['epochs']} there, {epochs} given (runs can only grow)")
    if changes:
        raise ConfigError(
            f"cannot resume {out}: it holds another experiment ({'; '.join(changes)}). "
            "--resume may add models or seeds, extend --epochs, or change "
            f"{', '.join(sorted(RESUMABLE_OVERRIDES - {'out_dir', 'resume'}))}; "
            "choose another --out for a new experiment (nothing was changed)"
        )


def plan_run(
    out: Path, model: str, seed: int, info: dict[str, Any], epochs: int, resume: bool, say: Any
) -> dict[str, Any] | None:
    """The config of one (model, seed) run, or ``None`` when ``resume`` reuses a finished one.

    On ``resume``: a run that finished all ``epochs`` is reused; one with a ``last.pt``
    continues from it; a failed attempt without one is kept as ``seed<k>.failed-<time>``
    for inspection and the seed starts afresh.
    """
    run_dir = out / "runs" / model / f"seed{seed}"
    summary_path = run_dir / "summary.json"
    if resume and summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            finished = summary.get("status") == "ok" and summary.get("epochs_completed") == epochs
        except (OSError, json.JSONDecodeError, AttributeError):
            finished = False  # an extended run (more --epochs) continues from its last.pt
        if finished:
            say(f"[compare] {model} seed {seed}: finished earlier, reused")
            return None
    attempted = run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())
    if resume and attempted and not (run_dir / "last.pt").is_file():
        stamp = int(time.time())
        while run_dir.with_name(f"seed{seed}.failed-{stamp}").exists():
            stamp += 1  # two retries within one second
        run_dir.rename(run_dir.with_name(f"seed{seed}.failed-{stamp}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return {
        "model": model,
        "preset": info["preset"],
        "seed": seed,
        "out_dir": str(run_dir),
        "resume": bool(resume and (run_dir / "last.pt").is_file()),
    }
