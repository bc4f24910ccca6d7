"""The report of a results directory (one run or a whole ``compare``).

Everything is re-rendered from files on disk: every ``summary.json`` below the directory
(one per run) plus, for a comparison, its plan (which names models that were not
registered or whose runs died before writing a summary). The table is built in
:mod:`.table`, the plots in :mod:`.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes
from .metrics import write_json
from .plan import PLAN_NAME, read_plan
from .plots import write_plots
from .robustness_report import robustness_section
from .table import add_ratios, aggregate, pick_reference, render_markdown

__all__ = ["collect_runs", "write_report"]


def _summary_paths(results_dir: Path) -> list[Path]:
    """The ``summary.json`` files that belong to ``results_dir``.

    A comparison (it holds ``compare_plan.json``) owns exactly ``runs/<model>/seed<k>/``;
    any other directory owns the summaries below it, except those inside a nested
    comparison (that one is reported on its own, not mixed into this table).
    """
    if (results_dir / PLAN_NAME).is_file():
        return sorted((results_dir / "runs").glob("*/seed*/summary.json"))
    found = []
    for path in sorted(results_dir.rglob("summary.json")):
        parents = path.relative_to(results_dir).parents
        if any((results_dir / p / PLAN_NAME).is_file() for p in parents if str(p) != "."):
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
    plan = read_plan(results)
    runs = collect_runs(results)
    if not runs and not plan:
        raise FileNotFoundError(
            f"{results} holds no summary.json (from `pcdeq-bench train --out`) and no {PLAN_NAME} "
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
