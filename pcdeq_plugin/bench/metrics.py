"""Per-epoch accounting: loss/accuracy, solver statistics, and the JSONL/CSV files.

The files' columns are the fields of :class:`~pcdeq_plugin.bench.records.EpochRow`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pcdeq_plugin import BlockStats

from .checkpoint import atomic_write_bytes
from .records import EPOCH_COLUMNS

__all__ = ["EpochMeter", "solve_summary", "write_history", "write_json"]


def solve_summary(stats: Sequence[BlockStats]) -> dict[str, Any]:
    """One batch's solver numbers, averaged over blocks like the pcDEQ scripts do.

    Returns ``fwd``/``bwd`` (mean iterations or NFE over blocks that recorded one, ``None``
    if none did), ``unit``, ``failed`` (samples that missed tolerance, summed over blocks and
    directions) and ``residual`` (the largest final residual).
    """
    fwd = [s.forward for s in stats if s.forward is not None]
    bwd = [s.backward for s in stats if s.backward is not None]
    unit = fwd[0].unit if fwd else (bwd[0].unit if bwd else "")
    residuals = [r.max_residual for r in fwd + bwd]
    return {
        "fwd": sum(r.iterations for r in fwd) / len(fwd) if fwd else None,
        "bwd": sum(r.iterations for r in bwd) / len(bwd) if bwd else None,
        "unit": unit,
        "failed": sum(r.num_failed for r in fwd + bwd),
        "residual": max(residuals) if residuals else None,
    }


@dataclass
class EpochMeter:
    """Running sums for one pass over a loader (picklable as plain floats for checkpoints)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    fwd_sum: float = 0.0
    fwd_batches: float = 0.0
    bwd_sum: float = 0.0
    bwd_batches: float = 0.0
    failed: float = 0.0
    max_residual: float = 0.0
    batches: float = 0.0
    nonfinite: float = 0.0  # batches whose loss was NaN or infinite (a diverged solve, say)

    unit: str = ""

    def update(
        self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, solve: dict[str, Any]
    ) -> None:
        n = int(target.numel())
        value = float(loss.detach())
        if not math.isfinite(value):
            self.nonfinite += 1
        self.loss_sum += value * n
        self.correct += float((logits.detach().argmax(dim=1) == target).sum())
        self.count += n
        self.batches += 1
        if solve["fwd"] is not None:
            self.fwd_sum += solve["fwd"]
            self.fwd_batches += 1
        if solve["bwd"] is not None:
            self.bwd_sum += solve["bwd"]
            self.bwd_batches += 1
        self.failed += solve["failed"]
        if solve["residual"] is not None:
            residual = solve["residual"] if math.isfinite(solve["residual"]) else float("inf")
            self.max_residual = max(self.max_residual, residual)
        self.unit = self.unit or solve["unit"]

    _SUMMED = (
        "loss_sum",
        "correct",
        "count",
        "fwd_sum",
        "fwd_batches",
        "bwd_sum",
        "bwd_batches",
        "failed",
        "batches",
        "nonfinite",
    )

    def reduce(self, all_reduce_sum: Any, device: torch.device) -> EpochMeter:
        """Sum the counters over DDP ranks (``max_residual`` stays this rank's)."""
        summed = all_reduce_sum([getattr(self, k) for k in self._SUMMED], device)
        out = EpochMeter(**self.state())
        for key, value in zip(self._SUMMED, summed):
            setattr(out, key, value)
        return out

    def state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def result(self, prefix: str) -> dict[str, Any]:
        def mean(total: float, n: float) -> float | None:
            return total / n if n else None

        return {
            f"{prefix}loss": mean(self.loss_sum, self.count),
            f"{prefix}acc": mean(self.correct, self.count),
            f"{prefix}fwd_iters": mean(self.fwd_sum, self.fwd_batches),
            f"{prefix}bwd_iters": mean(self.bwd_sum, self.bwd_batches),
            f"{prefix}failed_solves": int(self.failed),
            f"{prefix}max_residual": self.max_residual if self.fwd_batches else None,
            f"{prefix}nonfinite_batches": int(self.nonfinite),
        }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the full history, atomically.

    Rewriting (instead of appending) keeps the files consistent with the checkpoint after a
    resume: epochs recorded after the checkpoint was taken are not duplicated.
    """
    lines = "".join(
        json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n" for row in history
    )
    atomic_write_bytes(out_dir / "metrics.jsonl", lines.encode())
    buffer = io.StringIO()
    extra = sorted({k for row in history for k in row} - set(EPOCH_COLUMNS))
    writer = csv.DictWriter(buffer, fieldnames=[*EPOCH_COLUMNS, *extra], extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_bytes(out_dir / "metrics.csv", buffer.getvalue().encode())


def write_json(path: Path, data: Any) -> None:
    """Atomic, pretty JSON."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
