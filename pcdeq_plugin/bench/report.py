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

from .metrics import write_json

__all__ = ["aggregate", "collect_runs", "render_markdown", "write_plots", "write_report"]

PLAN = "compare_plan.json"


def collect_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every run summary below ``results_dir`` (sorted by model, then seed)."""
    runs = []
    for path in sorted(Path(results_dir).rglob("summary.json")):
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


def _training_of(config: dict[str, Any] | None) -> str | None:
    """The optimisation recipe a run used, in one short phrase."""
    if not config:
        return None
    milestone = config.get("milestone")
    text = (
        f"{config.get('optimizer')} lr {config.get('lr'):g} wd {config.get('weight_decay'):g} "
        f"batch {config.get('batch_size')}"
    )
    return text + (f" milestone {milestone}" if milestone else "")


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
        total = len(entries) + len(planned_failures.get(model, {}))
        acc_mean, acc_std = _mean_std([r["test_acc"] for r in ok if r.get("test_acc") is not None])
        first = (ok or entries or [{}])[0]
        mems = [r["peak_mem_mb"] for r in ok if r.get("peak_mem_mb") is not None]
        rows.append(
            {
                "model": model,
                "family": first.get("family", info.get("family")),
                "preset": first.get("preset", info.get("preset")),
                "status": "ok" if ok and not errors else ("failed" if not ok else "partial"),
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
        "bwd iters/NFE", "train s/epoch", "peak mem MiB", "failed solves", "runs ok",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in rows:
        if row["status"] == "not registered":
            cells = [row["model"], "-", "-", "not registered", "-", "-", "-", "-", "-", "-", "0/0"]
            notes.append(f"- `{row['model']}`: not registered ({row.get('error')})")
        else:
            acc = (
                "failed"
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
                _fmt(row.get("seconds_per_epoch")),
                _fmt(row.get("peak_mem_mb"), 0),
                str(row.get("failed_solves", "-")),
                f"{row['ok']}/{row['runs']}",
            ]
            if row.get("error"):
                notes.append(f"- `{row['model']}` {row['status']}: {row['error']}")
        lines.append("| " + " | ".join(cells) + " |")
    intro = []
    if meta:
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
    text = "\n".join(intro) + "\n\n" + "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def _per_epoch(runs: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per model: epochs and the mean of ``key`` over seeds at each epoch."""
    series: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        if run.get("status") != "ok":
            continue
        for row in run.get("history", []):
            if row.get(key) is not None:
                series.setdefault(run["model"], {}).setdefault(row["epoch"], []).append(
                    float(row[key])
                )
    return {
        model: (sorted(points), [statistics.fmean(points[e]) for e in sorted(points)])
        for model, points in series.items()
    }


def write_plots(
    out_dir: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> list[Path]:
    """Accuracy per epoch, iterations per epoch, accuracy vs parameters (PNG, Agg backend).

    Each model keeps one colour across the three plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    models = [r["model"] for r in rows if r.get("status") != "not registered"]
    palette = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    colour = {model: palette(i % palette.N) for i, model in enumerate(models)}
    units = {r["model"]: r.get("unit") or "" for r in rows if r.get("status") != "not registered"}
    written = []
    for key, name, ylabel in (
        ("test_acc", "accuracy_per_epoch.png", "test accuracy (mean over seeds)"),
        ("fwd_iters", "iterations_per_epoch.png", "forward iterations / NFE per solve"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        series = _per_epoch(runs, key)
        for model in [m for m in models if m in series]:
            epochs, values = series[model]
            unit = units.get(model)
            label = f"{model} ({unit})" if key == "fwd_iters" and unit else model
            ax.plot(epochs, values, marker="o", label=label, color=colour[model])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    placed = 0
    for row in rows:
        if row.get("test_acc_mean") is None or not row.get("params"):
            continue
        point = (row["params"], row["test_acc_mean"])
        ax.errorbar(
            *point, yerr=row["test_acc_std"], fmt="o", capsize=3, color=colour[row["model"]]
        )
        # alternate the label above/below so neighbours of equal size stay readable
        offset = (6, 6) if placed % 2 == 0 else (6, -12)
        ax.annotate(
            row["model"], point, xytext=offset, textcoords="offset points", fontsize="small"
        )
        placed += 1
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_params.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "accuracy_vs_params.png")
    return written


def write_report(results_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """(Re-)write ``compare.md``, ``compare.json`` and the PNG plots of ``results_dir``.

    Raises:
        FileNotFoundError: the directory holds neither run summaries nor a compare plan.
    """
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results directory {results} does not exist")
    plan_path = results / PLAN
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    runs = collect_runs(results)
    if not runs and not plan:
        raise FileNotFoundError(
            f"{results} holds no summary.json (from `pcdeq-bench train --out`) and no {PLAN} "
            "(from `pcdeq-bench compare`)"
        )
    rows = aggregate(runs, plan)
    meta = {k: plan[k] for k in ("dataset", "epochs", "seeds") if k in plan}
    markdown = render_markdown(rows, meta)
    (results / "compare.md").write_text(markdown)
    slim_runs = [{k: v for k, v in r.items() if k not in ("history", "config")} for r in runs]
    report = {"meta": plan, "rows": rows, "runs": slim_runs}
    write_json(results / "compare.json", report)
    report["markdown"] = markdown
    report["plots"] = [str(p) for p in write_plots(results, runs, rows)] if plots else []
    return report
