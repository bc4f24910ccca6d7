"""The typed records of a run: one row per epoch, and the run's summary.

They are the one description of a run's results: ``metrics.csv``'s columns, the lines of
``metrics.jsonl``, ``summary.json`` and the report's table all derive from them.
Reading is tolerant: a run directory written before a field existed still reads (the
field is ``None``), and ``milestone``, which summaries record since this module exists, is
recomputed from the saved config for older ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError, TrainConfig

__all__ = ["EPOCH_COLUMNS", "EpochRow", "RunSummary"]


@dataclass
class EpochRow:
    """One epoch of one run (training numbers averaged over its batches).

    Attributes:
        epoch: 1-based epoch number.
        lr: Learning rate during the epoch.
        train_loss / train_acc / test_loss / test_acc: Mean loss and accuracy (0..1).
        fwd_iters / bwd_iters: Mean forward/backward iterations (or NFE) per solve, training.
        test_fwd_iters: The same for the forward solves of the evaluation.
        unit: ``"iter"`` or ``"nfe"`` (what ``*_iters`` count).
        max_residual: Largest final forward residual of the epoch.
        failed_solves / test_failed_solves: Samples that missed the tolerance.
        nonfinite_batches: Training batches whose loss was NaN or infinite.
        train_seconds / test_seconds / epoch_seconds: Wall time of each phase.
        peak_mem_mb / peak_mem_kind: Peak memory and how it was measured.
    """

    epoch: int
    lr: float | None = None
    train_loss: float | None = None
    train_acc: float | None = None
    test_loss: float | None = None
    test_acc: float | None = None
    fwd_iters: float | None = None
    bwd_iters: float | None = None
    test_fwd_iters: float | None = None
    unit: str = ""
    max_residual: float | None = None
    failed_solves: int = 0
    test_failed_solves: int = 0
    nonfinite_batches: int = 0
    train_seconds: float | None = None
    test_seconds: float | None = None
    epoch_seconds: float | None = None
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> EpochRow:
        """Read a saved row (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.items() if k in known and v is not None}
        return cls(**{"epoch": 0, **values})


#: Column order of ``metrics.csv`` (the JSONL lines carry the same keys).
EPOCH_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EpochRow))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass
class RunSummary:
    """What one run did (``summary.json``): who it was, how it ended, its mean numbers.

    The identity fields (``model`` ... ``device``) are those of the trainer; ``history``
    holds the :class:`EpochRow` dicts; ``milestone`` is the learning-rate milestone the run
    used (``None``: no decay), so a report needs no config parsing to show it.
    """

    model: str | None = None
    family: str | None = None
    preset: str | None = None
    dataset: str | None = None
    seed: int | None = None
    params: int | None = None
    world_size: int | None = None
    device: str | None = None
    status: str | None = None
    error: str | None = None
    epochs_completed: int | None = None
    test_acc: float | None = None
    train_acc: float | None = None
    test_loss: float | None = None
    best_epoch: int | None = None
    best_test_acc: float | None = None
    fwd_iters: float | None = None
    bwd_iters: float | None = None
    test_fwd_iters: float | None = None
    unit: str = ""
    seconds_per_epoch: float | None = None
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None
    failed_solves: int = 0
    milestone: int | None = None
    config: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of_run(
        cls,
        identity: dict[str, Any],
        history: list[dict[str, Any]],
        best: dict[str, Any],
        status: str,
        error: str | None,
        cfg: TrainConfig,
    ) -> RunSummary:
        """The summary of a run from its identity, its epoch rows and its best epoch."""
        rows = [EpochRow.from_dict(r) for r in history]
        last = rows[-1] if rows else None
        peaks = [r.peak_mem_mb for r in rows if r.peak_mem_mb is not None]
        return cls(
            **identity,  # a new identity key needs its field here (TypeError otherwise)
            status=status,
            error=error,
            epochs_completed=len(rows),
            test_acc=last.test_acc if last else None,
            train_acc=last.train_acc if last else None,
            test_loss=last.test_loss if last else None,
            best_epoch=best.get("epoch"),
            best_test_acc=best.get("test_acc"),
            fwd_iters=_mean([r.fwd_iters for r in rows]),
            bwd_iters=_mean([r.bwd_iters for r in rows]),
            test_fwd_iters=_mean([r.test_fwd_iters for r in rows]),
            unit=next((r.unit for r in rows if r.unit), ""),
            seconds_per_epoch=_mean([r.train_seconds for r in rows]),
            peak_mem_mb=max(peaks, default=None),
            peak_mem_kind=last.peak_mem_kind if last else None,
            failed_solves=sum(r.failed_solves + r.test_failed_solves for r in rows),
            milestone=cfg.effective_milestone,
            config=cfg.to_dict(),
            history=history,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """Read a saved summary, old ones included (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        summary = cls(**{k: v for k, v in data.items() if k in known and v is not None})
        if "milestone" not in data:  # written before summaries recorded it
            summary.milestone = _milestone_of(summary.config)
        return summary

    @property
    def epochs(self) -> list[EpochRow]:
        return [EpochRow.from_dict(r) for r in self.history]


def _milestone_of(config: dict[str, Any] | None) -> int | None:
    """The milestone a run used, from its saved config (summaries older than ``milestone``)."""
    if not config:
        return None
    try:  # None in the config: 3/4 of the epochs
        return TrainConfig.from_dict(config).effective_milestone
    except (ConfigError, TypeError):
        return config.get("milestone")
