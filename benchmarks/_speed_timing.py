"""The timed part of ``bench_speed.py``: train steps and eval forwards, interleaved, medians."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _paper_reference import paper_records
from _speed_setup import Variant, Workload
from _timing import timed

__all__ = ["time_variants"]


def _counted(stats: list[Any], field: str) -> int | None:
    """A per-solve count the library records (warm, refinement), summed over blocks."""
    counts = [getattr(s, field, None) for s in stats]
    return None if all(c is None for c in counts) else sum(c or 0 for c in counts)


def _phase(prefix: str, stats: list[Any]) -> dict[str, int | None]:
    return {
        prefix: sum(s.iterations for s in stats),
        f"{prefix}_warm": _counted(stats, "warm_iterations"),
        f"{prefix}_corr": _counted(stats, "refine_iterations"),
    }


def _none(*prefixes: str, total: int | None = 0) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for prefix in prefixes:
        out.update({prefix: total, f"{prefix}_warm": None, f"{prefix}_corr": None})
    return out


def _iterations(variant: Variant) -> dict[str, int | None]:
    """Forward and backward iterations of the latest training step (summed over blocks),
    and of those the warm start's and the refinement's corrections."""
    if variant.is_bound:  # no solves (the floor: its bare linear maps)
        out = _none("fwd", "bwd")
        if variant.counts is not None:
            out.update(fwd=variant.counts["fwd"], bwd=variant.counts["bwd"])
        return out
    if variant.is_paper:
        records = paper_records(variant.model)
        out = _none("fwd", "bwd")
        out["fwd"] = sum(r.forward_iterations for r in records)
        out["bwd"] = sum(r.backward_iterations or 0 for r in records)
        return out
    forward = [s.forward for s in variant.model.solver_stats() if s.forward is not None]
    backward = [s.backward for s in variant.model.solver_stats() if s.backward is not None]
    return {**_phase("fwd", forward), **_phase("bwd", backward)}


def _eval_iterations(variant: Variant) -> dict[str, int | None]:
    """Forward iterations of the latest evaluation forward (summed over blocks)."""
    if variant.is_bound:
        return _none("eval", total=variant.counts["eval"] if variant.counts else 0)
    if variant.is_paper:
        out = _none("eval")
        out["eval"] = sum(r.forward_iterations for r in paper_records(variant.model))
        return out
    return _phase("eval", [s.forward for s in variant.model.solver_stats() if s.forward])


def _train_step(variant: Variant) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
    model = variant.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1.5e-2)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        model.after_optimizer_step()

    return step


def _eval_forward(variant: Variant, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        variant.model.eval()
        with torch.no_grad():
            variant.model(x)

    return forward


def time_variants(
    variants: list[Variant], data: Workload, *, repeats: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Median train-step and eval-forward ms and median iterations of every variant."""
    batches = data.train_batches()
    train_batches = [next(batches) for _ in range(repeats + 1)]
    eval_x = data.test_chunks()[0]
    steps = {v.name: _train_step(v) for v in variants}
    evals = {v.name: _eval_forward(v, eval_x) for v in variants}
    timings: dict[str, dict[str, list[float]]] = {
        v.name: {"train": [], "eval": []} for v in variants
    }
    counts: dict[str, list[dict[str, int | None]]] = {v.name: [] for v in variants}
    for variant in variants:  # untimed warm-up (allocator, kernel choice, compilation)
        steps[variant.name](train_batches[0])
        evals[variant.name]()
    for r in range(repeats):
        for variant in variants:  # interleaved: drifts of the machine hit every variant
            step = functools.partial(steps[variant.name], train_batches[r + 1])
            timings[variant.name]["train"].append(timed(step, device))
            counts[variant.name].append(_iterations(variant))
            timings[variant.name]["eval"].append(timed(evals[variant.name], device))
            counts[variant.name][-1].update(_eval_iterations(variant))
    out = {}
    for name, t in timings.items():
        row: dict[str, Any] = {
            "train_ms": 1e3 * statistics.median(t["train"]),
            "eval_ms": 1e3 * statistics.median(t["eval"]),
        }
        for key in counts[name][0]:
            values = [c[key] for c in counts[name] if c[key] is not None]
            row[f"{key}_it"] = statistics.median(values) if values else None
        out[name] = row
    return out
