"""The comparison's plots (PNG, Agg backend): accuracy and iterations per epoch, final
accuracy against parameters and against training time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .records import RunSummary
from .table import mean_std

__all__ = ["write_plots"]


def _per_epoch(
    runs: list[dict[str, Any]], key: str
) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per model: epochs, and the mean and std of ``key`` over seeds at each epoch."""
    series: dict[str, dict[int, list[float]]] = {}
    for run in map(RunSummary.from_dict, runs):
        if run.status != "ok":
            continue
        for row in run.epochs:
            value = getattr(row, key)
            if value is not None:
                series.setdefault(str(run.model), {}).setdefault(row.epoch, []).append(float(value))
    out = {}
    for model, points in series.items():
        epochs = sorted(points)
        stats = [mean_std(points[e]) for e in epochs]
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
