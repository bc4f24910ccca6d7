"""One training run: ``run(config) -> summary``, the entry point of the CLI, ``compare``
and sweep engines (Ray Tune, Optuna).

It resolves the configuration, opens the data and the run directory, builds the model
and hands them to the :class:`~pcdeq_plugin.bench.train.Trainer`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pcdeq_plugin import UnknownNameError, build_model

from .config import ConfigError, TrainConfig
from .datasets import dataset_info, load_dataset
from .guards import check_batchnorm_batch, check_has_batches
from .metrics import write_history, write_json
from .resolve import resolve_config
from .rundir import RunDirectory
from .runtime import (
    DistContext,
    check_amp,
    init_distributed,
    seed_everything,
    select_device,
    set_deterministic,
)
from .train import BatchCallback, EpochCallback, Trainer

__all__ = ["run"]


def run(
    config: dict[str, Any],
    *,
    on_epoch: EpochCallback | None = None,
    on_batch: BatchCallback | None = None,
) -> dict[str, Any]:
    """Train and evaluate one model; the entry point for the CLI, ``compare`` and sweeps.

    Args:
        config: :class:`TrainConfig` keys (unknown keys raise :class:`ConfigError` listing the
            valid ones). Missing keys take the model's ``ModelSpec.training`` values, then the
            harness defaults (AdamW, lr 5e-4, weight decay 1.5e-2, batch 64, one milestone).
        on_epoch: Called with each epoch's metrics (e.g. ``ray.tune.report`` or an Optuna
            pruning check).
        on_batch: Called as ``on_batch(epoch, step)`` after every optimizer step.

    Returns:
        The run summary: final and best test accuracy, parameters, mean iterations or NFE,
        seconds per epoch, peak memory, failed solves, the resolved config and the history.

    Raises:
        ConfigError: bad or conflicting configuration, unwritable output directory.
        UnknownNameError: unknown model or dataset name.
        DatasetNotFoundError: data missing on disk without ``download``.
        CheckpointError: ``resume`` with a missing or corrupt checkpoint (left untouched),
            or a checkpoint that cannot be written (disk full).
        KeyboardInterrupt: (a :class:`~pcdeq_plugin.bench.runtime.RunInterrupted`) SIGINT or
            SIGTERM, after writing a resumable checkpoint and the metrics so far.

    A NaN or infinite training loss stops the run with status ``"diverged"`` (returned, not
    raised): the last good checkpoint is kept and ``error`` names the epoch and step.
    """
    cfg, checkpoint = resolve_config(config)
    ctx = init_distributed(cfg.device)
    try:
        return _run(cfg, checkpoint, ctx, on_epoch, on_batch)
    finally:
        ctx.shutdown()


def _run(
    cfg: TrainConfig,
    checkpoint: dict[str, Any] | None,
    ctx: DistContext,
    on_epoch: EpochCallback | None,
    on_batch: BatchCallback | None,
) -> dict[str, Any]:
    device = select_device(cfg.device)
    check_amp(cfg.amp, device)
    set_deterministic(cfg.deterministic)
    info = dataset_info(cfg.dataset)
    common = {"data_dir": cfg.data_dir, "download": cfg.download, "augment": cfg.augment}
    train_set = load_dataset(cfg.dataset, "train", limit=cfg.train_limit, **common)
    test_set = load_dataset(cfg.dataset, "test", limit=cfg.test_limit, **common)
    check_has_batches(len(train_set), cfg, ctx)  # type: ignore[arg-type]
    resuming = checkpoint is not None
    # nothing is written before this point: bad options and missing data leave no trace
    with RunDirectory.open(
        cfg.out_dir, resuming=resuming, overwrite=cfg.overwrite, enabled=ctx.is_main
    ) as out:
        if out is not None and resuming:
            checkpoint = out.reread()  # as it is now that this run holds the lock
            out.reconcile(checkpoint)
        seed_everything(cfg.seed)
        model = _build(cfg, info.input_shape, info.num_classes)
        check_batchnorm_batch(model, cfg)
        trainer = Trainer(cfg, ctx, device, model, out)
        if checkpoint is not None:
            trainer.restore(checkpoint)
            if out is not None:
                write_history(out.path, trainer.history)  # metrics agree with the checkpoint
        elif out is not None:
            write_json(out.path / "config.json", cfg.to_dict())
        trainer.wrap_for_ddp()
        return trainer.fit(train_set, test_set, on_epoch, on_batch)


def _build(cfg: TrainConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the model; a factory's complaint about its options becomes a ConfigError."""
    try:
        return build_model(
            cfg.model, input_shape, num_classes, preset=cfg.preset, **cfg.model_options
        )
    except UnknownNameError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"cannot build model {cfg.model!r} (preset {cfg.preset!r}, model_options "
            f"{cfg.model_options}): {exc}"
        ) from exc
