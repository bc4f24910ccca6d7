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


def _iterations(variant: Variant) -> tuple[int, int, int | None]:
    """Forward, backward and warm-start iterations of the latest training step (all blocks)."""
    if variant.is_paper:
        records = paper_records(variant.model)
        return (
            sum(r.forward_iterations for r in records),
            sum(r.backward_iterations or 0 for r in records),
            None,
        )
    forward = [s.forward for s in variant.model.solver_stats() if s.forward is not None]
    backward = [s.backward for s in variant.model.solver_stats() if s.backward is not None]
    # the warm-start phase's count, where the library records one
    warm = [getattr(s, "warm_iterations", None) for s in forward]
    warm_total = sum(w for w in warm if w is not None) if any(w is not None for w in warm) else None
    return sum(s.iterations for s in forward), sum(s.iterations for s in backward), warm_total


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
    samples: dict[str, dict[str, list]] = {
        v.name: {"train": [], "eval": [], "fwd": [], "bwd": [], "warm": []} for v in variants
    }
    for variant in variants:  # untimed warm-up (allocator, kernel choice, compilation)
        steps[variant.name](train_batches[0])
        evals[variant.name]()
    for r in range(repeats):
        for variant in variants:  # interleaved: drifts of the machine hit every variant
            s = samples[variant.name]
            step = functools.partial(steps[variant.name], train_batches[r + 1])
            s["train"].append(timed(step, device))
            fwd, bwd, warm = _iterations(variant)
            s["fwd"].append(fwd)
            s["bwd"].append(bwd)
            s["warm"].append(warm)
            s["eval"].append(timed(evals[variant.name], device))
    out = {}
    for name, s in samples.items():
        warm = [w for w in s["warm"] if w is not None]
        out[name] = {
            "train_ms": 1e3 * statistics.median(s["train"]),
            "eval_ms": 1e3 * statistics.median(s["eval"]),
            "fwd_it": statistics.median(s["fwd"]),
            "bwd_it": statistics.median(s["bwd"]),
            "warm_it": statistics.median(warm) if warm else None,
        }
    return out
