"""Evaluation: one pass over a test loader (used every epoch), and ``eval`` of a saved checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pcdeq_plugin import UnknownNameError, build_model
from pcdeq_plugin.checks import check_count
from pcdeq_plugin.registry import MODELS

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .datasets import dataset_info, load_dataset
from .metrics import EpochMeter, solve_summary
from .resolve import checkpoint_plugins_note, load_plugins_from_config
from .runtime import DistContext, autocast, select_device

__all__ = ["evaluate", "evaluate_checkpoint"]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_solve_summary(model: nn.Module) -> dict[str, Any]:
    """The latest solver statistics of an implicit model, summarised for one batch."""
    stats = model.solver_stats() if hasattr(model, "solver_stats") else []
    return solve_summary(stats)


def reset_solver_stats(model: nn.Module) -> None:
    """Clear the blocks' statistics so a batch never reports the previous batch's solves."""
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
    inner = unwrap(model)
    meter = EpochMeter()
    model.eval()
    with torch.no_grad():
        for x, y in tqdm(
            loader, desc="eval", leave=False, disable=progress_disabled(progress, ctx)
        ):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            reset_solver_stats(inner)
            with autocast(amp, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            meter.update(loss, logits, y, model_solve_summary(inner))
    return meter.reduce(ctx.all_reduce_sum, device).result("test_")


def progress_disabled(progress: bool | None, ctx: DistContext) -> bool | None:
    """tqdm's ``disable``: off on other ranks; ``None`` = only on a terminal."""
    if not ctx.is_main or progress is False:
        return True
    return None if progress is None else False


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    device: str = "auto",
    batch_size: int = 256,
    limit: int | None = None,
    plugins: list[str] | None = None,
    attack: str | None = None,
    eps: list[float] | None = None,
    attack_steps: int = 10,
) -> dict[str, Any]:
    """Rebuild the checkpoint's model, load its weights and evaluate it.

    Args:
        path: A ``last.pt``/``best.pt`` written by the harness.
        dataset: Dataset to score on (default: the one it was trained on). Its input shape
            and class count must match the checkpoint's.
        attack: Also run this attack (``fgsm``, ``pgd-l2``, ``pgd-linf``) at the radii
            ``eps`` (pixel scale) with ``attack_steps`` steps; adds ``robustness``.

    Returns:
        ``test_acc``, ``test_loss``, forward iterations/NFE and failed solves, plus identity.

    Raises:
        CheckpointError: missing, corrupt or foreign checkpoint.
        ConfigError: the dataset does not fit the model.
    """
    if limit is not None:
        check_count("test_limit", limit, context=" (images to score)", error=ConfigError)
    check_count("batch_size", batch_size, error=ConfigError)
    state = load_checkpoint(path)
    config = dict(state["config"])
    # only the plugins given here are imported: a checkpoint never causes code to run
    load_plugins_from_config(list(plugins or []))
    note = checkpoint_plugins_note(list(config.get("plugins") or []), Path(path))
    try:
        MODELS.get(config["model"])
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc}; {note}" if note else str(exc)) from None
    if note:
        print(f"pcdeq-bench: note: {note}", file=sys.stderr, flush=True)
    trained = (state.get("identity") or {}).get("model")
    if trained is not None and trained != config["model"]:
        raise CheckpointError(
            f"checkpoint {path} holds weights of model {trained!r} but its config names "
            f"{config['model']!r} (a hand-edited or mixed-up file); it was not evaluated"
        )
    name = dataset or config["dataset"]
    trained_on, target = dataset_info(config["dataset"]), dataset_info(name)
    if (trained_on.input_shape, trained_on.num_classes) != (target.input_shape, target.num_classes):
        raise ConfigError(
            f"checkpoint was trained on {config['dataset']!r} {trained_on.input_shape}/{trained_on.num_classes} "
            f"classes; dataset {name!r} has {target.input_shape}/{target.num_classes}"
        )
    dev = select_device(device)
    model = build_model(
        config["model"],
        trained_on.input_shape,
        trained_on.num_classes,
        preset=config.get("preset"),
        **config.get("model_options", {}),
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit model {config['model']!r}: {exc}"
        ) from exc
    model.to(dev)
    test_set = load_dataset(
        name,
        "test",
        data_dir=data_dir or config.get("data_dir", "./data"),
        download=download,
        limit=limit,
    )
    loader = DataLoader(
        test_set, batch_size=batch_size, shuffle=False, pin_memory=dev.type == "cuda"
    )
    metrics = evaluate(model, loader, dev, config.get("amp", "off"), progress=None)
    if attack is not None:  # the robustness axis: pcdeq_plugin.bench.robustness
        from .robustness import pixel_space, robustness_metrics

        metrics["robustness"] = robustness_metrics(
            model, loader, kind=attack, eps=eps or [], space=pixel_space(name),
            steps=attack_steps, device=dev,
        )  # fmt: skip
    return {
        "checkpoint": str(Path(path)),
        "model": config["model"],
        "preset": config.get("preset"),
        "trained_epochs": state["epoch"],
        "dataset": name,
        "images": len(test_set),  # type: ignore[arg-type]
        **metrics,
    }
