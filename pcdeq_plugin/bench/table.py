"""The comparison table: one row per model from the run summaries, and its Markdown.

The runs are read as :class:`~pcdeq_plugin.bench.records.RunSummary` records (old run
directories included); the rows are plain dicts, as ``compare.json`` stores them.

A row is the mean +- std over a model's successful seeds, what went wrong with the others
(from the summaries and from the comparison plan), and ratios to a reference model.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .plan import check_reference
from .records import RunSummary

__all__ = [
    "INCOMPLETE",
    "add_ratios",
    "aggregate",
    "mean_std",
    "pick_reference",
    "render_markdown",
]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _median(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def _epoch_seconds_median(runs: list[RunSummary]) -> float | None:
    """Median training seconds of one epoch over every epoch of every run.

    A median, not a mean: one epoch slowed by another process on a shared machine (or
    the first epoch's warm-up) does not move it.
    """
    per_epoch = [row.train_seconds for r in runs for row in r.epochs]
    if any(v is not None for v in per_epoch):
        return _median(per_epoch)
    return _median([r.seconds_per_epoch for r in runs])


def _training_of(run: RunSummary) -> str | None:
    """The optimisation recipe a run used, in one short phrase (its recorded milestone)."""
    config = run.config
    if not config:
        return None
    text = (
        f"{config.get('optimizer')} lr {config.get('lr'):g} wd {config.get('weight_decay'):g} "
        f"batch {config.get('batch_size')}"
    )
    gamma = config.get("gamma", 0.1)
    return text + (f", lr x{gamma:g} after epoch {run.milestone}" if run.milestone else "")


#: Run statuses that a ``compare --resume`` continues (the comparison is incomplete).
INCOMPLETE = ("interrupted", "not started")


def _status(ok: list[Any], errors: list[str], statuses: list[str]) -> str:
    """ok (every run finished), partial (some did), interrupted (stopped by a signal or never
    started, none finished yet: ``--resume`` continues), diverged, or failed."""
    if ok:
        return "partial" if errors else "ok"
    if statuses and all(s in INCOMPLETE for s in statuses):
        return "interrupted"
    if statuses and all(s == "diverged" for s in statuses):
        return "diverged"
    return "failed"


def aggregate(
    runs: list[dict[str, Any]], plan: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per model: mean +- std over its successful seeds and what went wrong."""
    plan = plan or {}
    order = list(plan.get("models", []))
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_model.setdefault(str(run.get("model")), []).append(run)
        if run.get("model") not in order:
            order.append(str(run.get("model")))
    planned_failures = plan.get("failures", {})
    rows = []
    for model in order:
        entries = by_model.get(model, [])
        info = plan.get("model_info", {}).get(model, {})
        if info.get("status") == "not registered":
            rows.append(
                {
                    "model": model,
                    "status": "not registered",
                    "error": info.get("error"),
                    "runs": 0,
                    "ok": 0,
                }
            )
            continue
        summaries = [RunSummary.from_dict(r) for r in entries]
        ok = [r for r in summaries if r.status == "ok"]
        errors = [f"seed {r.seed}: {r.error}" for r in summaries if r.status != "ok"]
        errors += [f"seed {seed}: {msg}" for seed, msg in planned_failures.get(model, {}).items()]
        waiting = plan.get("not_started", {}).get(model, {})
        errors += [f"seed {seed}: not started ({why})" for seed, why in waiting.items()]
        statuses = [str(r.status) for r in summaries if r.status != "ok"]
        statuses += ["failed"] * len(planned_failures.get(model, {}))
        statuses += ["not started"] * len(waiting)
        total = len(entries) + len(planned_failures.get(model, {})) + len(waiting)
        acc_mean, acc_std = mean_std([r.test_acc for r in ok if r.test_acc is not None])
        first = (ok or summaries or [RunSummary()])[0]
        mems = [r.peak_mem_mb for r in ok if r.peak_mem_mb is not None]
        rows.append(
            {
                "model": model,
                "family": first.family or info.get("family"),
                "preset": first.preset or info.get("preset"),
                "status": _status(ok, errors, statuses),
                "incomplete": sum(1 for status in statuses if status in INCOMPLETE),
                "runs": total,
                "ok": len(ok),
                "seeds": [r.seed for r in ok],
                "epochs": first.epochs_completed,
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "params": first.params,
                "fwd_iters": _mean([r.fwd_iters for r in ok]),
                "bwd_iters": _mean([r.bwd_iters for r in ok]),
                "unit": first.unit or "",
                "seconds_per_epoch": _mean([r.seconds_per_epoch for r in ok]),
                "seconds_per_epoch_median": _epoch_seconds_median(ok),
                "peak_mem_mb": max(mems) if mems else None,
                "peak_mem_kind": first.peak_mem_kind,
                "failed_solves": sum(int(r.failed_solves or 0) for r in ok),
                "error": "; ".join(errors) or None,
                "preset_options": info.get("preset_options"),
                "training": _training_of(first),
                "note": info.get("note"),
            }
        )
    return rows


def pick_reference(rows: list[dict[str, Any]], reference: str | None = None) -> str | None:
    """The model the ratio columns divide by: ``reference`` if given, else the first pcDEQ
    model with a finished run, else the first model with one (``None`` if none has).

    Raises:
        ConfigError: ``reference`` is not one of the compared models (it lists them).
    """
    if reference is not None:
        check_reference(reference, [r["model"] for r in rows])
        return reference
    finished = [r for r in rows if r.get("ok")]
    pcdeq = [r for r in finished if r.get("family") == "pcdeq"]
    return (pcdeq or finished or [{"model": None}])[0]["model"]


def add_ratios(rows: list[dict[str, Any]], reference: str | None) -> None:
    """Set ``time_ratio`` (median train s/epoch) and ``fwd_ratio`` (forward iterations or
    NFE per solve) of every row relative to the ``reference`` row (``None`` when either
    side has no number)."""
    ref = next((r for r in rows if r["model"] == reference), {})

    def ratio(row: dict[str, Any], key: str) -> float | None:
        mine, theirs = row.get(key), ref.get(key)
        if mine is None or not theirs:
            return None
        return float(mine) / float(theirs)

    for row in rows:
        row["time_ratio"] = ratio(row, "seconds_per_epoch_median")
        row["fwd_ratio"] = ratio(row, "fwd_iters")


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10:
        return f"{value:.0f}x"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"  # 2 significant digits


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """A GitHub pipe table (plus notes for failures and the memory measure)."""
    meta = meta or {}
    header = [
        "model", "family", "preset", "test acc % (mean ± std)", "params", "fwd iters/NFE",
        "bwd iters/NFE", "train s/epoch (median)", "peak mem MiB", "failed solves", "runs ok",
        "time vs ref", "fwd iters vs ref",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in rows:
        if row["status"] == "not registered":
            cells = [row["model"], "-", "-", "not registered", *["-"] * 6, "0/0", "-", "-"]
            notes.append(f"- `{row['model']}`: not registered ({row.get('error')})")
        else:
            acc = (
                (row["status"] if row["status"] in ("interrupted", "diverged") else "failed")
                if row["test_acc_mean"] is None
                else (f"{100 * row['test_acc_mean']:.2f} ± {100 * row['test_acc_std']:.2f}")
            )
            unit = f" {row['unit']}" if row.get("unit") else ""
            cells = [
                row["model"],
                _fmt(row.get("family")),
                _fmt(row.get("preset") or "default"),
                acc,
                f"{row['params']:,}" if row.get("params") is not None else "-",
                _fmt(row.get("fwd_iters")) + (unit if row.get("fwd_iters") is not None else ""),
                _fmt(row.get("bwd_iters")) + (unit if row.get("bwd_iters") is not None else ""),
                _fmt(
                    row.get("seconds_per_epoch_median", row.get("seconds_per_epoch")),
                    2 if (row.get("seconds_per_epoch_median") or 10) < 1 else 1,
                ),
                _fmt(row.get("peak_mem_mb"), 0),
                str(row.get("failed_solves", "-")),
                f"{row['ok']}/{row['runs']}",
                _fmt_ratio(row.get("time_ratio")),
                _fmt_ratio(row.get("fwd_ratio")),
            ]
            if row.get("error"):
                notes.append(f"- `{row['model']}` {row['status']}: {row['error']}")
        lines.append("| " + " | ".join(cells) + " |")
    intro = []
    if meta.get("dataset"):
        intro.append(
            f"Dataset `{meta.get('dataset')}`, {meta.get('epochs')} epoch(s), seeds "
            f"{', '.join(map(str, meta.get('seeds', [])))}; presets as listed."
        )
    sizes = [
        f"`{r['model']}` {r.get('preset')}: "
        + ", ".join(f"{k}={v}" for k, v in r["preset_options"].items())
        for r in rows
        if r.get("preset_options")
    ]
    if sizes:
        intro.append("Preset sizes: " + "; ".join(sizes) + ".")
    recipes = [f"`{r['model']}` {r['training']}" for r in rows if r.get("training")]
    if recipes:
        intro.append(
            "Training (each model's recipe over the harness defaults): " + "; ".join(recipes) + "."
        )
    notes += [f"- `{r['model']}`: {r['note']}" for r in rows if r.get("note")]
    kinds = {r.get("peak_mem_kind") for r in rows if r.get("peak_mem_kind")}
    if kinds:
        intro.append(
            "Peak memory: "
            + ", ".join(sorted(kinds))
            + " (cpu_rss_high_water is the whole process's resident-set high-water mark)."
        )
    intro.append(
        "Iterations are fixed-point iterations per solve (DEQs) or function evaluations (NFE, "
        "ODEs), averaged over a model's implicit blocks and over training batches; "
        "failed solves count samples that missed tolerance (forward + backward, train + test)."
    )
    if meta.get("interrupted"):
        intro.append(
            "**Interrupted**: partial results (runs marked KeyboardInterrupt stopped early); "
            "`pcdeq-bench compare ... --resume` with the same --out completes the table."
        )
    reference = meta.get("reference")
    if reference:
        intro.append(
            f"Train s/epoch is the median over every epoch of every seed. The last two columns "
            f"divide a model's median train s/epoch and its forward iterations/NFE per solve by "
            f"those of `{reference}` (1.00x); an ODE's NFE and a DEQ's iteration both count "
            "evaluations of the layer's function."
        )
    jobs = meta.get("jobs") or 1
    if jobs > 1:
        intro.append(
            f"Timed with {jobs} worker processes training side by side (one torch thread "
            "each); on a machine with fewer free cores the seconds are inflated."
        )
    text = "\n".join(intro) + "\n\n" + "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text
