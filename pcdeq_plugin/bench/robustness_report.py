"""``compare --robustness``: attack every finished run of a results directory, then one
table section and one plot (accuracy against eps, one line per model).

Each run's numbers go to ``runs/<model>/seed<k>/robustness.json`` (its ``last.pt``
evaluated with :func:`~pcdeq_plugin.bench.evaluate.evaluate_checkpoint`); ``report``
re-renders the section from those files (:func:`robustness_section`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .metrics import write_json

__all__ = ["ROBUSTNESS_FILE", "attack_runs", "robustness_section"]

ROBUSTNESS_FILE = "robustness.json"


def attack_runs(
    runs: list[dict[str, Any]],
    *,
    attack: str,
    eps: Sequence[float],
    steps: int = 10,
    limit: int | None = None,
    device: str = "auto",
    plugins: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Evaluate every finished run's ``last.pt`` under ``attack``; returns runs attacked."""
    from .evaluate import evaluate_checkpoint

    done = 0
    for run in runs:
        run_dir = Path(run.get("run_dir", ""))
        checkpoint = run_dir / "last.pt"
        if run.get("status") != "ok" or not checkpoint.is_file():
            continue
        result = evaluate_checkpoint(
            checkpoint, device=device, limit=limit, plugins=plugins, attack=attack,
            eps=list(eps), attack_steps=steps,
        )  # fmt: skip
        write_json(run_dir / ROBUSTNESS_FILE, result["robustness"])
        log(f"[robustness] {run.get('model')} seed {run.get('seed')}: {attack} done")
        done += 1
    return done


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        path = Path(run.get("run_dir", "")) / ROBUSTNESS_FILE
        if path.is_file():
            try:
                by_model.setdefault(str(run.get("model")), []).append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
    rows = []
    for model, results in by_model.items():
        radii = [a["eps"] for a in results[0]["adversarial"]]
        rows.append(
            {
                "model": model,
                "attack": results[0]["attack"],
                "seeds": len(results),
                "clean_acc": _mean([r["clean_acc"] for r in results]),
                "lipschitz_empirical": max(r["lipschitz_empirical"] for r in results),
                "lipschitz_bound": _mean([r["lipschitz_bound"] for r in results]),
                "eps": radii,
                "adv_acc": [_mean([r["adversarial"][i]["acc"] for r in results]) for i in range(len(radii))],
                "certified_acc": [
                    _mean([r["adversarial"][i]["certified_acc"] for r in results])
                    for i in range(len(radii))
                ],
            }
        )  # fmt: skip
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _markdown(rows: list[dict[str, Any]]) -> str:
    attack, radii = rows[0]["attack"], rows[0]["eps"]
    head = ["model", "seeds", "clean acc %"]
    head += [f"adv acc % (eps={e:g})" for e in radii]
    head += ["margin Lip. (emp.)", "Lip. bound (cert.)"]
    head += [f"cert. acc % (eps={e:g})" for e in radii]
    lines = [
        "",
        f"## Robustness ({attack}, eps in pixel units of [0, 1] images)",
        "",
        "Lipschitz values are in pixel space: the empirical one is the largest l2 norm of the "
        "input gradient of the logit margin over the scored images; the certified bound "
        "gamma (LBEN) bounds the logits, so each margin is at most sqrt(2) gamma-Lipschitz, "
        "and a sample counts as certified when margin > sqrt(2) gamma r, r = eps (l2) or "
        "sqrt(d) eps (l_inf).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        bound = "-" if r["lipschitz_bound"] is None else f"{r['lipschitz_bound']:.3g}"
        cells = [r["model"], str(r["seeds"]), _pct(r["clean_acc"])]
        cells += [_pct(a) for a in r["adv_acc"]]
        cells += [f"{r['lipschitz_empirical']:.3g}", bound]
        cells += [_pct(c) for c in r["certified_acc"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        eps = [0.0, *r["eps"]] if 0.0 not in r["eps"] else r["eps"]
        acc = [r["clean_acc"], *r["adv_acc"]] if 0.0 not in r["eps"] else r["adv_acc"]
        ax.plot(eps, [100 * a for a in acc], marker="o", label=r["model"])
    ax.set_xlabel(f"eps ({rows[0]['attack']}, pixel scale)")
    ax.set_ylabel("adversarial test accuracy % (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    path = out_dir / "accuracy_vs_eps.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def robustness_section(
    results_dir: Path, runs: list[dict[str, Any]], *, plots: bool = True
) -> tuple[str, list[dict[str, Any]]]:
    """The markdown section and rows for the runs' ``robustness.json`` files ("" if none);
    with ``plots``, also ``accuracy_vs_eps.png``."""
    rows = _rows(runs)
    if not rows:
        return "", []
    if plots:
        _plot(Path(results_dir), rows)
    return _markdown(rows), rows
