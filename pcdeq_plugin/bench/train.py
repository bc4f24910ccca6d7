"""The one training loop every registered model goes through, and ``run(config) -> metrics``.

``run`` is the entry point for the CLI, for ``compare`` and for sweep engines (Ray Tune,
Optuna): give it a plain dict of :class:`~pcdeq_plugin.bench.config.TrainConfig` keys and it
returns the run's summary metrics. Under ``torchrun`` it trains with DDP unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pcdeq_plugin import UnknownNameError, build_model
from pcdeq_plugin.registry import MODELS

from .checkpoint import CheckpointError, save_checkpoint
from .config import ConfigError, TrainConfig
from .datasets import dataset_info, load_dataset
from .evaluate import evaluate, model_solve_summary, progress_disabled, reset_solver_stats
from .guards import (
    check_batchnorm_batch,
    check_finite_batch,
    check_has_batches,
    divergence_message,
    loss_is_finite,
)
from .loaders import test_loader, train_loader
from .metrics import EpochMeter, run_summary, write_history, write_json
from .resolve import resolve_config
from .rundir import RunDirectory
from .runtime import (
    DistContext,
    RunInterrupted,
    StopFlag,
    autocast,
    check_amp,
    get_rng_state,
    init_distributed,
    make_grad_scaler,
    peak_memory,
    reset_peak_memory,
    seed_everything,
    select_device,
    set_deterministic,
    set_rng_state,
)

__all__ = ["run"]

BatchCallback = Callable[[int, int], None]
EpochCallback = Callable[[dict[str, Any]], None]


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
        trainer = _Trainer(cfg, ctx, device, model, out)
        if checkpoint is not None:
            trainer.restore(checkpoint)
            if out is not None:
                write_history(out.path, trainer.history)  # metrics agree with the checkpoint
        elif out is not None:
            write_json(out.path / "config.json", cfg.to_dict())
        trainer.wrap_for_ddp()
        return trainer.fit(train_set, test_set, on_epoch, on_batch)


class _Trainer:
    """The state of one run and the loop over its epochs.

    ``epoch``/``step``/``meter``/``train_seconds`` always describe the resume point an
    interrupt would save; ``consistent`` is false while the state is half-updated (inside
    an optimizer step, or between the scheduler step and the end-of-epoch checkpoint), and
    then an interrupt saves nothing new: the previous checkpoint stays the resume point.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext,
        device: torch.device,
        model: nn.Module,
        out: RunDirectory | None,
    ) -> None:
        self.cfg, self.ctx, self.device, self.out = cfg, ctx, device, out
        model.to(device)
        self.model = self.inner = model
        self.optimizer = _make_optimizer(cfg, model)
        milestone = cfg.effective_milestone
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=[milestone] if milestone else [], gamma=cfg.gamma
        )
        self.scaler = make_grad_scaler(cfg.amp, device)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "test_acc": None}
        self.epoch, self.step, self.meter, self.train_seconds = 0, 0, EpochMeter(), 0.0
        self.partial: dict[str, Any] | None = None
        self.consistent, self.training, self.tick = True, False, time.perf_counter()
        spec = MODELS.get(cfg.model)
        self.identity = {
            "model": cfg.model,
            "family": getattr(model, "family", spec.family),
            "preset": cfg.preset,
            "dataset": cfg.dataset,
            "seed": cfg.seed,
            "params": sum(p.numel() for p in model.parameters()),
            "world_size": ctx.world_size,
            "device": str(device),
        }

    # -- checkpoints -------------------------------------------------------------------
    def restore(self, checkpoint: dict[str, Any]) -> None:
        trained = (checkpoint.get("identity") or {}).get("model")
        if trained is not None and trained != self.cfg.model:
            raise CheckpointError(
                f"the checkpoint in {self.cfg.out_dir} holds weights of model {trained!r} but "
                f"its config names {self.cfg.model!r} (a hand-edited or mixed-up file); it was "
                "left untouched -- restore the original last.pt or start a new run"
            )
        try:
            self.inner.load_state_dict(checkpoint["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"the checkpoint in {self.cfg.out_dir} does not fit model {self.cfg.model!r} as "
                f"built now (did the model code or its options change?): {str(exc).splitlines()[0]}"
            ) from exc
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        self.history = list(checkpoint.get("history", []))
        self.best = dict(checkpoint.get("best", self.best))
        self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint.get("step", 0))
        self.partial = checkpoint.get("partial")

    def state(
        self, epoch: int, step: int, meter: EpochMeter | None, seconds: float
    ) -> dict[str, Any]:
        """Everything a resume needs, as plain data."""
        return {
            "config": self.cfg.to_dict(),
            "model": self.inner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": get_rng_state(),
            "epoch": epoch,
            "step": step,
            "partial": None if meter is None else {"meter": meter.state(), "seconds": seconds},
            "history": self.history,
            "best": self.best,
            "identity": self.identity,
        }

    def wrap_for_ddp(self) -> None:
        if self.ctx.enabled:
            ddp_args = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = nn.parallel.DistributedDataParallel(self.inner, **ddp_args)

    # -- the loop ----------------------------------------------------------------------
    def fit(
        self,
        train_set: Dataset,
        test_set: Dataset,
        on_epoch: EpochCallback | None,
        on_batch: BatchCallback | None,
    ) -> dict[str, Any]:
        cfg = self.cfg
        pin = self.device.type == "cuda"
        eval_loader = test_loader(test_set, cfg, self.ctx, pin)
        stop = StopFlag()
        try:
            with stop.installed(enabled=not self.ctx.enabled):
                for epoch in range(self.epoch, cfg.epochs):
                    self._start_epoch(epoch)
                    loader = train_loader(train_set, cfg, self.ctx, epoch, self.step, pin)
                    diverged = self._train(loader, stop, on_batch)
                    if diverged is not None:
                        return self.finish("diverged", diverged)
                    tick = time.perf_counter()
                    test = evaluate(
                        self.model, eval_loader, self.device, cfg.amp, self.ctx, cfg.progress
                    )
                    row = self._end_epoch(test, time.perf_counter() - tick)
                    if on_epoch is not None:
                        on_epoch(dict(row, **self.identity))
                    if stop.requested:
                        raise stop.interrupt()
        except KeyboardInterrupt as exc:
            epoch_saved = len(self.history) > self.epoch  # its row and checkpoint are written
            if self.out is not None and self.consistent and not epoch_saved:
                if self.training:
                    self.train_seconds += time.perf_counter() - self.tick
                # a mid-epoch checkpoint: resume skips the `step` batches already trained
                save_checkpoint(
                    self.out.last,
                    self.state(self.epoch, self.step, self.meter, self.train_seconds),
                )
            name = exc.signal_name if isinstance(exc, RunInterrupted) else "SIGINT"
            self.finish("interrupted", f"interrupted by {name}", quiet=True)
            raise
        except Exception as exc:
            self.finish("failed", f"{type(exc).__name__}: {exc}", quiet=True)
            raise
        self.ctx.barrier()
        return self.finish("ok")

    def _start_epoch(self, epoch: int) -> None:
        resuming = epoch == self.epoch and self.partial is not None
        self.epoch = epoch
        if resuming:
            self.meter = EpochMeter(**self.partial["meter"])
            self.train_seconds = float(self.partial["seconds"])
        else:
            self.step, self.meter, self.train_seconds = 0, EpochMeter(), 0.0
        self.partial = None
        reset_peak_memory(self.device)
        self.lr = self.optimizer.param_groups[0]["lr"]

    def _train(
        self, loader: DataLoader, stop: StopFlag, on_batch: BatchCallback | None
    ) -> str | None:
        """One epoch from ``self.step``; returns the divergence message if the loss went
        NaN/Inf (before that step changed anything), else ``None``."""
        cfg, model, inner, device = self.cfg, self.model, self.inner, self.device
        model.train()
        self.tick, self.training = time.perf_counter(), True
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=progress_disabled(cfg.progress, self.ctx),
        )
        for x, y in bar:
            check_finite_batch(x, self.epoch, self.step, cfg.dataset)
            self.consistent = False
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            reset_solver_stats(inner)
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(cfg.amp, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if not loss_is_finite(loss, self.ctx, device):
                # stop before backward: the weights are still those of the previous step
                self.consistent, self.training = True, False
                where = str(self.out.last) if self.out is not None else ""
                return divergence_message(
                    self.epoch,
                    self.step,
                    len(loader),
                    float(loss.detach()),
                    len(self.history),
                    where,
                )
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            if hasattr(inner, "after_optimizer_step"):
                inner.after_optimizer_step()  # on the wrapped module under DDP
            self.meter.update(loss, logits, y, model_solve_summary(inner))
            self.step += 1
            self.consistent = True
            if on_batch is not None:
                on_batch(self.epoch, self.step)
            if stop.requested:
                raise stop.interrupt()
        self.train_seconds += time.perf_counter() - self.tick
        self.training = False
        return None

    def _end_epoch(self, test: dict[str, Any], test_seconds: float) -> dict[str, Any]:
        train = self.meter.reduce(self.ctx.all_reduce_sum, self.device).result("")
        self.consistent = False
        self.scheduler.step()
        mem, mem_kind = peak_memory(self.device)
        row = {
            "epoch": self.epoch + 1,
            "lr": self.lr,
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "test_loss": test["test_loss"],
            "test_acc": test["test_acc"],
            "fwd_iters": train["fwd_iters"],
            "bwd_iters": train["bwd_iters"],
            "test_fwd_iters": test["test_fwd_iters"],
            "unit": self.meter.unit or "",
            "max_residual": train["max_residual"],
            "failed_solves": train["failed_solves"],
            "test_failed_solves": test["test_failed_solves"],
            "nonfinite_batches": train["nonfinite_batches"],
            "train_seconds": self.train_seconds,
            "test_seconds": test_seconds,
            "epoch_seconds": self.train_seconds + test_seconds,
            "peak_mem_mb": mem,
            "peak_mem_kind": mem_kind,
        }
        self.history.append(row)
        improved = (
            self.best["test_acc"] is None or (test["test_acc"] or 0.0) > self.best["test_acc"]
        )
        if improved:
            self.best = {"epoch": self.epoch + 1, "test_acc": test["test_acc"]}
        if self.out is not None:
            self.out.commit_epoch(self.state(self.epoch + 1, 0, None, 0.0), improved)
            write_history(self.out.path, self.history)
        self.consistent = True
        return row

    def finish(self, status: str, error: str | None = None, quiet: bool = False) -> dict[str, Any]:
        """Write the summary; ``quiet``: on the way out of an error, whose message matters
        more than a second one about the summary (e.g. on a full disk)."""
        summary = run_summary(
            self.identity, self.history, self.best, status, error, self.cfg.to_dict()
        )
        if self.out is not None:
            try:
                write_history(self.out.path, self.history)
                write_json(self.out.path / "summary.json", summary)
            except CheckpointError:
                if not quiet:
                    raise
        return summary


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


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
    )
