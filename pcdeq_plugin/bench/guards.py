"""Checks the training loop makes before it changes any state, and what divergence is.

Each check refuses a run (or a batch) *before* a module or the optimizer has been touched,
so a refused input never leaves a half-updated model behind (BatchNorm running statistics
included), and the message says what the user did and what to do instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .runtime import DistContext

__all__ = [
    "DataError",
    "check_batchnorm_batch",
    "check_finite_batch",
    "check_has_batches",
    "divergence_message",
    "loss_is_finite",
]


class DataError(ValueError):
    """A batch the model must not see (NaN/Inf inputs); nothing was updated."""


def training_batches(samples: int, batch_size: int) -> int:
    """Batches of one epoch of ``samples`` (a final batch of one sample is dropped)."""
    full, rest = divmod(samples, batch_size)
    return full + (1 if rest >= 2 else 0)


def check_has_batches(train_samples: int, cfg: TrainConfig, ctx: DistContext) -> None:
    """Refuse a run whose epochs would train on no batch at all."""
    per_process = math.ceil(train_samples / ctx.world_size)
    if training_batches(per_process, cfg.batch_size) == 0:
        where = f" per process ({ctx.world_size} processes)" if ctx.enabled else ""
        raise ConfigError(
            f"{train_samples} training image(s){where} at batch_size {cfg.batch_size} leave no "
            "batch to train on (a final batch of a single sample is dropped: BatchNorm cannot "
            "train on it); use --train-limit 2 or more, or no --train-limit"
        )


def check_batchnorm_batch(model: nn.Module, cfg: TrainConfig) -> None:
    """BatchNorm cannot compute batch statistics of a single sample."""
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if cfg.batch_size == 1 and has_norm:
        raise ConfigError(
            f"batch_size 1: model {cfg.model!r} has BatchNorm layers, which cannot train on "
            "batches of one sample; use --batch-size 2 or more"
        )


def check_finite_batch(x: torch.Tensor, epoch: int, step: int, dataset: str) -> None:
    """Refuse NaN/Inf inputs before the model sees them (any model, plugins included)."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        raise DataError(
            f"training batch {step + 1} of epoch {epoch + 1} (dataset {dataset!r}) holds "
            f"{int((~finite).sum())} NaN/Inf input value(s); nothing was updated -- clean the "
            "dataset or drop those images"
        )


def loss_is_finite(loss: torch.Tensor, ctx: DistContext, device: torch.device) -> bool:
    """Whether the loss is finite on every process (all ranks must stop together)."""
    bad = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
    return ctx.all_reduce_sum([bad], device)[0] == 0.0


def divergence_message(
    epoch: int, step: int, batches: int | None, loss: float, last_good_epoch: int, where: str
) -> str:
    of = f" of {batches}" if batches else ""
    kept = (
        f"the last good checkpoint (end of epoch {last_good_epoch}) was kept in {where}"
        if last_good_epoch and where
        else "no epoch had finished, so there is no checkpoint"
    )
    return (
        f"training diverged: the loss was {loss} at epoch {epoch + 1}, step {step + 1}{of}; "
        f"the run stopped there and {kept}. Lower --lr (or use --amp off) and start again"
    )
