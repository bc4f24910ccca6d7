"""Tables and plots from a results directory (one run or a whole ``compare``).

Everything is re-rendered from files on disk: every ``summary.json`` below the directory
(one per run) plus, for a comparison, ``compare_plan.json`` (which names models that were
not registered or whose runs died before writing a summary).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes
from .config import ConfigError, TrainConfig
from .metrics import write_json
from .robustness_report import robustness_section

__all__ = [
    "add_ratios",
    "aggregate",
    "collect_runs",
    "pick_reference",
    "render_markdown",
    "write_plots",
    "write_report",
]

PLAN = "compare_plan.json"


def _summary_paths(results_dir: Path) -> list[Path]:
    """The ``summary.json`` files that belong to ``results_dir``.

    A comparison (it holds ``compare_plan.json``) owns exactly ``runs/<model>/seed<k>/``;
    any other directory owns the summaries below it, except those inside a nested
    comparison (that one is reported on its own, not mixed into this table).
    """
    if (results_dir / PLAN).is_file():
        return sorted((results_dir / "runs").glob("*/seed*/summary.json"))
    found = []
    for path in sorted(results_dir.rglob("summary.json")):
        parents = path.relative_to(results_dir).parents
        if any((results_dir / p / PLAN).is_file() for p in parents if str(p) != "."):
            continue
        found.append(path)
    return found


def collect_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every run summary that belongs to ``results_dir`` (sorted by model, then seed)."""
    runs = []
    for path in _summary_paths(Path(results_dir)):
        if ".failed-" in path.parent.name:  # superseded attempts kept by `compare --resume`
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            runs.append(
                {
                    "model": path.parent.name,
                    "status": "failed",
                    "error": f"unreadable {path}: {exc}",
                }
            )
            continue
        if not isinstance(data, dict) or "model" not in data:
            continue  # some other tool's summary.json, not a pcdeq-bench run
        data["run_dir"] = str(path.parent)
        runs.append(data)
    return sorted(runs, key=lambda r: (str(r.get("model")), r.get("seed") or 0))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
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


def _epoch_seconds_median(runs: list[dict[str, Any]]) -> float | None:
    """Median training seconds of one epoch over every epoch of every run.

    A median, not a mean: one epoch slowed by another process on a shared machine (or
    the first epoch's warm-up) does not move it.
    """
    per_epoch = [row.get("train_seconds") for r in runs for row in r.get("history") or []]
    if any(v is not None for v in per_epoch):
        return _median(per_epoch)
    return _median([r.get("seconds_per_epoch") for r in runs])


def _training_of(config: dict[str, Any] | None) -> str | None:
    """The optimisation recipe a run used, in one short phrase."""
    if not config:
        return None
    text = (
        f"{config.get('optimizer')} lr {config.get('lr'):g} wd {config.get('weight_decay'):g} "
        f"batch {config.get('batch_size')}"
    )
    try:  # the milestone the run used (None in the config: 3/4 of the epochs)
        milestone = TrainConfig.from_dict(config).effective_milestone
    except (ConfigError, TypeError):
        milestone = config.get("milestone")
    gamma = config.get("gamma", 0.1)
    return text + (f", lr x{gamma:g} after epoch {milestone}" if milestone else "")


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
        ok = [r for r in entries if r.get("status") == "ok"]
        errors = [
            f"seed {r.get('seed')}: {r.get('error')}" for r in entries if r.get("status") != "ok"
        ]
        errors += [f"seed {seed}: {msg}" for seed, msg in planned_failures.get(model, {}).items()]
        waiting = plan.get("not_started", {}).get(model, {})
        errors += [f"seed {seed}: not started ({why})" for seed, why in waiting.items()]
        statuses = [str(r.get("status")) for r in entries if r.get("status") != "ok"]
        statuses += ["failed"] * len(planned_failures.get(model, {}))
        statuses += ["not started"] * len(waiting)
        total = len(entries) + len(planned_failures.get(model, {})) + len(waiting)
        acc_mean, acc_std = _mean_std([r["test_acc"] for r in ok if r.get("test_acc") is not None])
        first = (ok or entries or [{}])[0]
        mems = [r["peak_mem_mb"] for r in ok if r.get("peak_mem_mb") is not None]
        rows.append(
            {
                "model": model,
                "family": first.get("family", info.get("family")),
                "preset": first.get("preset", info.get("preset")),
                "status": _status(ok, errors, statuses),
                "incomplete": sum(1 for status in statuses if status in INCOMPLETE),
                "runs": total,
                "ok": len(ok),
                "seeds": [r.get("seed") for r in ok],
                "epochs": first.get("epochs_completed"),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "params": first.get("params"),
                "fwd_iters": _mean([r.get("fwd_iters") for r in ok]),
                "bwd_iters": _mean([r.get("bwd_iters") for r in ok]),
                "unit": first.get("unit") or "",
                "seconds_per_epoch": _mean([r.get("seconds_per_epoch") for r in ok]),
                "seconds_per_epoch_median": _epoch_seconds_median(ok),
                "peak_mem_mb": max(mems) if mems else None,
                "peak_mem_kind": first.get("peak_mem_kind"),
                "failed_solves": sum(int(r.get("failed_solves") or 0) for r in ok),
                "error": "; ".join(errors) or None,
                "preset_options": info.get("preset_options"),
                "training": _training_of(first.get("config")),
                "note": info.get("note"),
            }
        )
    return rows


def pick_reference(rows: list[dict[str, Any]], reference: str | None = None) -> str | None:
    """The model the ratio columns divide by: ``reference`` if given, else the first pcDEQ
    model with a finished run, else the first model with one (``None`` if none has).

    Raises:
        ValueError: ``reference`` is not one of the compared models (the message lists them).
    """
    names = [r["model"] for r in rows]
    if reference is not None:
        if reference not in names:
            raise ValueError(
                f"reference model {reference!r} is not in this comparison; choose one of "
                f"{', '.join(names) or '(none)'}"
            )
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


def _per_epoch(
    runs: list[dict[str, Any]], key: str
) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per model: epochs, and the mean and std of ``key`` over seeds at each epoch."""
    series: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        if run.get("status") != "ok":
            continue
        for row in run.get("history", []):
            if row.get(key) is not None:
                series.setdefault(run["model"], {}).setdefault(row["epoch"], []).append(
                    float(row[key])
                )
    out = {}
    for model, points in series.items():
        epochs = sorted(points)
        stats = [_mean_std(points[e]) for e in epochs]
        out[model] = (epochs, [m for m, _ in stats], [sd for _, sd in stats])
    return out


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _finish_axes(ax: Any, epochs: bool) -> None:
    """Grid, integer epoch ticks, and the legend outside the axes so it hides no data."""
    from matplotlib.ticker import MaxNLocator

    if epochs:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, 0.5), max(hi, 1.5))  # one epoch: a readable column, not a sliver
    ax.grid(alpha=0.3)


def write_plots(
    out_dir: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> list[Path]:
    """Accuracy and iterations per epoch; final accuracy vs parameters and vs training time.

    PNG files (Agg backend): ``accuracy_per_epoch``, ``iterations_per_epoch``,
    ``accuracy_vs_params``, ``accuracy_vs_time``.

    Each model keeps one colour and one marker across all plots; legends sit outside
    the axes (models of equal size never hide each other's labels); error bars are the std
    over seeds; accuracies are in %.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r["model"] for r in rows if r.get("status") != "not registered"]
    palette = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    colour = {model: palette(i % palette.N) for i, model in enumerate(models)}
    marker = {model: _MARKERS[i % len(_MARKERS)] for i, model in enumerate(models)}
    units = {r["model"]: r.get("unit") or "" for r in rows if r.get("status") != "not registered"}
    style = {"capsize": 3, "markersize": 5, "linewidth": 1.5}
    written = []

    def save(fig: Any, axes: list[Any], name: str) -> None:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                       fontsize="small", frameon=False)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / name)

    # accuracy per epoch (%)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = _per_epoch(runs, "test_acc")
    for model in [m for m in models if m in series]:
        epochs, mean, std = series[model]
        ax.errorbar(epochs, [100 * v for v in mean], yerr=[100 * v for v in std], label=model,
                    color=colour[model], marker=marker[model], **style)  # fmt: skip
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    _finish_axes(ax, epochs=True)
    save(fig, [ax], "accuracy_per_epoch.png")

    # forward and backward iterations / NFE per epoch, side by side
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), sharex=True)
    for ax, key, title in (
        (axes[0], "fwd_iters", "forward"),
        (axes[1], "bwd_iters", "backward"),
    ):
        series = _per_epoch(runs, key)
        for model in [m for m in models if m in series]:
            epochs, mean, std = series[model]
            unit = units.get(model)
            ax.errorbar(epochs, mean, yerr=std, label=f"{model} ({unit})" if unit else model,
                        color=colour[model], marker=marker[model], **style)  # fmt: skip
        ax.set_title(f"{title} solve", fontsize="medium")
        ax.set_ylabel("iterations / NFE per solve (train)")
        ax.set_ylim(bottom=0)
        _finish_axes(ax, epochs=True)
    save(fig, list(axes), "iterations_per_epoch.png")

    # final accuracy vs parameters, and vs training time (the cost/accuracy trade-off)
    placed = [r for r in rows if r.get("test_acc_mean") is not None and r.get("params")]
    for key, name, xlabel in (
        ("params", "accuracy_vs_params.png", "parameters (log scale)"),
        ("seconds_per_epoch_median", "accuracy_vs_time.png",
         "train seconds per epoch, median (log scale)"),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        same_x: dict[Any, list[str]] = {}
        points = [r for r in placed if r.get(key)]
        for row in points:
            same_x.setdefault(round(float(row[key]), 2), []).append(row["model"])
        for row in points:
            model = row["model"]
            # models with the same x sit side by side (a few % apart on the log axis), so
            # their markers and error bars do not cover each other
            group = same_x[round(float(row[key]), 2)]
            shift = 1.03 ** (group.index(model) - (len(group) - 1) / 2)
            detail = f"{row['params']:,}" if key == "params" else f"{row[key]:.2g} s"
            ax.errorbar(float(row[key]) * shift, 100 * row["test_acc_mean"],
                        yerr=100 * row["test_acc_std"], label=f"{model} ({detail})",
                        color=colour[model], marker=marker[model], linestyle="none",
                        **style)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final test accuracy % (mean ± std)")
        _finish_axes(ax, epochs=False)
        save(fig, [ax], name)
    return written


def write_report(
    results_dir: str | Path, *, plots: bool = True, reference: str | None = None
) -> dict[str, Any]:
    """(Re-)write ``compare.md``, ``compare.json`` and the PNG plots of ``results_dir``.

    Args:
        results_dir: A ``compare`` output directory, one ``train --out`` directory, or a
            directory holding several run directories.
        plots: Also write the PNG plots.
        reference: Model the ratio columns divide by (default: the one the comparison
            was run with, else the first pcDEQ model with a finished run).

    Raises:
        FileNotFoundError: the directory holds neither run summaries nor a compare plan.
        ValueError: ``reference`` is not one of the compared models.
    """
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results directory {results} does not exist")
    plan_path = results / PLAN
    try:
        plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{plan_path} is unreadable ({exc}); it names the compared models -- restore it, "
            "or delete it to report the run summaries alone"
        ) from exc
    runs = collect_runs(results)
    if not runs and not plan:
        raise FileNotFoundError(
            f"{results} holds no summary.json (from `pcdeq-bench train --out`) and no {PLAN} "
            "(from `pcdeq-bench compare`)"
        )
    rows = aggregate(runs, plan)
    chosen = pick_reference(rows, reference or plan.get("reference"))
    add_ratios(rows, chosen)
    meta = {k: plan[k] for k in ("dataset", "epochs", "seeds", "jobs", "interrupted") if k in plan}
    meta["reference"] = chosen
    markdown = render_markdown(rows, meta)
    robust_md, robust_rows = robustness_section(results, runs, plots=plots)  # compare --robustness
    markdown += robust_md
    try:
        atomic_write_bytes(results / "compare.md", markdown.encode())
    except OSError as exc:
        raise ValueError(
            f"cannot write the report into {results} ({exc}); copy the directory somewhere "
            "writable and report that copy"
        ) from exc
    slim_runs = [{k: v for k, v in r.items() if k not in ("history", "config")} for r in runs]
    report = {"meta": {**plan, "reference": chosen}, "rows": rows, "runs": slim_runs}
    if robust_rows:
        report["robustness"] = robust_rows
    incomplete: dict[str, int] = {}
    for run in runs:
        if run.get("status") == "interrupted":
            incomplete["interrupted"] = incomplete.get("interrupted", 0) + 1
    waiting = sum(len(seeds) for seeds in plan.get("not_started", {}).values())
    if waiting:
        incomplete["not started"] = waiting
    report["incomplete"] = incomplete
    write_json(results / "compare.json", report)
    report["markdown"] = markdown
    report["plots"] = [str(p) for p in write_plots(results, runs, rows)] if plots else []
    return report
