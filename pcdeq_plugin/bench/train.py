"""The one training loop every registered model goes through.

:class:`Trainer` holds one run's state (model, optimizer, scheduler, history, the resume
point) and runs its epochs; :func:`pcdeq_plugin.bench.session.run` sets a run up around it.
Under ``torchrun`` it trains with DDP unchanged.
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

from pcdeq_plugin.registry import MODELS

from .checkpoint import CheckpointError, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate, model_solve_summary, progress_disabled, reset_solver_stats
from .guards import check_finite_batch, divergence_message, loss_is_finite
from .loaders import test_loader, train_loader
from .metrics import EpochMeter, write_history, write_json
from .records import EpochRow, RunSummary
from .rundir import RunDirectory
from .runtime import (
    DistContext,
    RunInterrupted,
    StopFlag,
    autocast,
    get_rng_state,
    make_grad_scaler,
    peak_memory,
    reset_peak_memory,
    set_rng_state,
)

__all__ = ["BatchCallback", "EpochCallback", "Trainer"]

BatchCallback = Callable[[int, int], None]
EpochCallback = Callable[[dict[str, Any]], None]


class Trainer:
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
        row = EpochRow(
            epoch=self.epoch + 1,
            lr=self.lr,
            train_loss=train["loss"],
            train_acc=train["acc"],
            test_loss=test["test_loss"],
            test_acc=test["test_acc"],
            fwd_iters=train["fwd_iters"],
            bwd_iters=train["bwd_iters"],
            test_fwd_iters=test["test_fwd_iters"],
            unit=self.meter.unit or "",
            max_residual=train["max_residual"],
            failed_solves=train["failed_solves"],
            test_failed_solves=test["test_failed_solves"],
            nonfinite_batches=train["nonfinite_batches"],
            train_seconds=self.train_seconds,
            test_seconds=test_seconds,
            epoch_seconds=self.train_seconds + test_seconds,
            peak_mem_mb=mem,
            peak_mem_kind=mem_kind,
        ).to_dict()
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
        summary = RunSummary.of_run(
            self.identity, self.history, self.best, status, error, self.cfg
        ).to_dict()
        if self.out is not None:
            try:
                write_history(self.out.path, self.history)
                write_json(self.out.path / "summary.json", summary)
            except CheckpointError:
                if not quiet:
                    raise
        return summary


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
    )
