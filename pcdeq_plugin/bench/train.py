"""The one training loop every registered model goes through, and ``run(config) -> metrics``.

``run`` is the entry point for the CLI, for ``compare`` and for sweep engines (Ray Tune,
Optuna): give it a plain dict of :class:`~pcdeq_plugin.bench.config.TrainConfig` keys and it
returns the run's summary metrics. Under ``torchrun`` it trains with DDP unchanged.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pcdeq_plugin import UnknownNameError, build_model
from pcdeq_plugin.registry import MODELS

from .checkpoint import CheckpointError, save_checkpoint
from .config import ConfigError, TrainConfig
from .datasets import dataset_info, ensure_registered, load_dataset
from .loaders import test_loader, train_loader
from .metrics import EpochMeter, solve_summary, write_history, write_json
from .resolve import (
    BEST,
    LAST,
    load_plugins_from_config,
    prepare_out_dir,
    resolve_config,
    training_recipe,
)
from .runtime import (
    DistContext,
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

__all__ = ["evaluate", "load_plugins_from_config", "resolve_config", "run", "training_recipe"]

BatchCallback = Callable[[int, int], None]
EpochCallback = Callable[[dict[str, Any]], None]


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _stats(model: nn.Module) -> dict[str, Any]:
    stats = model.solver_stats() if hasattr(model, "solver_stats") else []
    return solve_summary(stats)


def _reset_stats(model: nn.Module) -> None:
    if hasattr(model, "reset_stats"):
        model.reset_stats()


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str = "off",
    ctx: DistContext | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Test loss, accuracy and forward solver statistics of ``model`` over ``loader``."""
    ctx = ctx or DistContext()
    inner = _inner(model)
    meter = EpochMeter()
    model.eval()
    with torch.no_grad():
        for x, y in tqdm(loader, desc="eval", leave=False, disable=_bar(progress, ctx)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _reset_stats(inner)
            with autocast(amp, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            meter.update(loss, logits, y, _stats(inner))
    return meter.reduce(ctx.all_reduce_sum, device).result("test_")


def _bar(progress: bool | None, ctx: DistContext) -> bool | None:
    """tqdm's ``disable``: off on other ranks; ``None`` = only on a terminal."""
    if not ctx.is_main or progress is False:
        return True
    return None if progress is None else False


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the next batch boundary; the second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        CheckpointError: ``resume`` with a missing or corrupt checkpoint (left untouched).
        KeyboardInterrupt: after writing a resumable checkpoint and the metrics so far.
    """
    ensure_registered()
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
    out = prepare_out_dir(cfg, checkpoint is not None) if ctx.is_main else None

    info = dataset_info(cfg.dataset)
    common = {"data_dir": cfg.data_dir, "download": cfg.download, "augment": cfg.augment}
    train_set = load_dataset(cfg.dataset, "train", limit=cfg.train_limit, **common)
    test_set = load_dataset(cfg.dataset, "test", limit=cfg.test_limit, **common)

    seed_everything(cfg.seed)
    model = _build(cfg, info.input_shape, info.num_classes)
    model.to(device)
    spec = MODELS.get(cfg.model)
    params = _param_count(model)
    optimizer = _make_optimizer(cfg, model)
    milestone = cfg.effective_milestone
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[milestone] if milestone else [], gamma=cfg.gamma
    )
    scaler = make_grad_scaler(cfg.amp, device)
    if out is not None and checkpoint is None:
        write_json(out / "config.json", cfg.to_dict())

    history: list[dict[str, Any]] = []
    best = {"epoch": None, "test_acc": None}
    start_epoch, start_step, partial = 0, 0, None
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"the checkpoint in {cfg.out_dir} does not fit model {cfg.model!r} as built now "
                f"(did the model code or its options change?): {str(exc).splitlines()[0]}"
            ) from exc
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        history = list(checkpoint.get("history", []))
        best = dict(checkpoint.get("best", best))
        start_epoch, start_step = int(checkpoint["epoch"]), int(checkpoint.get("step", 0))
        partial = checkpoint.get("partial")

    if ctx.enabled:
        ddp_args = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_args)
    inner = _inner(model)
    pin = device.type == "cuda"
    eval_loader = test_loader(test_set, cfg, ctx, pin)

    identity = {
        "model": cfg.model,
        "family": getattr(inner, "family", spec.family),
        "preset": cfg.preset,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "params": params,
        "world_size": ctx.world_size,
        "device": str(device),
    }

    def state(epoch: int, step: int, meter: EpochMeter | None, seconds: float) -> dict[str, Any]:
        return {
            "config": cfg.to_dict(),
            "model": inner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": get_rng_state(),
            "epoch": epoch,
            "step": step,
            "partial": None if meter is None else {"meter": meter.state(), "seconds": seconds},
            "history": history,
            "best": best,
            "identity": identity,
        }

    def finish(status: str, error: str | None = None) -> dict[str, Any]:
        summary = _summary(identity, history, best, status, error, cfg)
        if out is not None:
            write_history(out, history)
            write_json(out / "summary.json", summary)
        return summary

    stop = _StopFlag()
    epoch, step, meter, train_seconds = start_epoch, start_step, EpochMeter(), 0.0
    # False while the state is half-updated (inside an optimizer step, or between the
    # scheduler step and the end-of-epoch checkpoint): an interrupt then saves nothing new
    # and the previous checkpoint stays the resume point.
    consistent = True
    tick, training = time.perf_counter(), False
    try:
        with stop.installed(enabled=not ctx.enabled):
            for epoch in range(start_epoch, cfg.epochs):
                step, meter, train_seconds = 0, EpochMeter(), 0.0
                if epoch == start_epoch and partial is not None:
                    step = start_step
                    meter = EpochMeter(**partial["meter"])
                    train_seconds = float(partial["seconds"])
                reset_peak_memory(device)
                lr = optimizer.param_groups[0]["lr"]
                loader = train_loader(train_set, cfg, ctx, epoch, step, pin)
                model.train()
                tick, training = time.perf_counter(), True
                bar = tqdm(
                    loader,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    leave=False,
                    disable=_bar(cfg.progress, ctx),
                )
                for x, y in bar:
                    consistent = False
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    _reset_stats(inner)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(cfg.amp, device):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    if hasattr(inner, "after_optimizer_step"):
                        inner.after_optimizer_step()  # on the wrapped module under DDP
                    meter.update(loss, logits, y, _stats(inner))
                    step += 1
                    consistent = True
                    if on_batch is not None:
                        on_batch(epoch, step)
                    if stop.requested:
                        raise KeyboardInterrupt
                train_seconds += time.perf_counter() - tick
                training = False
                train = meter.reduce(ctx.all_reduce_sum, device).result("")
                tick = time.perf_counter()
                test = evaluate(model, eval_loader, device, cfg.amp, ctx, cfg.progress)
                test_seconds = time.perf_counter() - tick
                consistent = False
                scheduler.step()
                mem, mem_kind = peak_memory(device)
                row = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": train["loss"],
                    "train_acc": train["acc"],
                    "test_loss": test["test_loss"],
                    "test_acc": test["test_acc"],
                    "fwd_iters": train["fwd_iters"],
                    "bwd_iters": train["bwd_iters"],
                    "test_fwd_iters": test["test_fwd_iters"],
                    "unit": meter.unit or "",
                    "max_residual": train["max_residual"],
                    "failed_solves": train["failed_solves"],
                    "test_failed_solves": test["test_failed_solves"],
                    "nonfinite_batches": train["nonfinite_batches"],
                    "train_seconds": train_seconds,
                    "test_seconds": test_seconds,
                    "epoch_seconds": train_seconds + test_seconds,
                    "peak_mem_mb": mem,
                    "peak_mem_kind": mem_kind,
                }
                history.append(row)
                improved = best["test_acc"] is None or (test["test_acc"] or 0.0) > best["test_acc"]
                if improved:
                    best = {"epoch": epoch + 1, "test_acc": test["test_acc"]}
                if out is not None:
                    snapshot = state(epoch + 1, 0, None, 0.0)
                    save_checkpoint(out / LAST, snapshot)
                    if improved:
                        save_checkpoint(out / BEST, snapshot)
                    write_history(out, history)
                consistent = True
                if on_epoch is not None:
                    on_epoch(dict(row, **identity))
                partial = None
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        epoch_saved = len(history) > epoch  # this epoch's row and checkpoint are written
        if out is not None and consistent and not epoch_saved:
            if training:
                train_seconds += time.perf_counter() - tick
            # a mid-epoch checkpoint: resume skips the `step` batches already trained
            save_checkpoint(out / LAST, state(epoch, step, meter, train_seconds))
        finish("interrupted", "KeyboardInterrupt")
        raise
    except Exception as exc:
        finish("failed", f"{type(exc).__name__}: {exc}")
        raise
    ctx.barrier()
    return finish("ok")


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


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _summary(
    identity: dict[str, Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    status: str,
    error: str | None,
    cfg: TrainConfig,
) -> dict[str, Any]:
    last = history[-1] if history else {}
    return {
        **identity,
        "status": status,
        "error": error,
        "epochs_completed": len(history),
        "test_acc": last.get("test_acc"),
        "train_acc": last.get("train_acc"),
        "test_loss": last.get("test_loss"),
        "best_epoch": best.get("epoch"),
        "best_test_acc": best.get("test_acc"),
        "fwd_iters": _mean([r.get("fwd_iters") for r in history]),
        "bwd_iters": _mean([r.get("bwd_iters") for r in history]),
        "test_fwd_iters": _mean([r.get("test_fwd_iters") for r in history]),
        "unit": next((r["unit"] for r in history if r.get("unit")), ""),
        "seconds_per_epoch": _mean([r.get("train_seconds") for r in history]),
        "peak_mem_mb": max((r["peak_mem_mb"] for r in history), default=None),
        "peak_mem_kind": last.get("peak_mem_kind"),
        "failed_solves": sum(
            r.get("failed_solves", 0) + r.get("test_failed_solves", 0) for r in history
        ),
        "config": cfg.to_dict(),
        "history": history,
    }
