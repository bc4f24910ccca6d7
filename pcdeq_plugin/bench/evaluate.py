"""``eval``: score a saved checkpoint on a dataset's test split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from pcdeq_plugin import build_model

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .datasets import dataset_info, ensure_registered, load_dataset
from .runtime import select_device
from .train import evaluate, load_plugins_from_config

__all__ = ["evaluate_checkpoint"]


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
) -> dict[str, Any]:
    """Rebuild the checkpoint's model, load its weights and evaluate it.

    Args:
        path: A ``last.pt``/``best.pt`` written by the harness.
        dataset: Dataset to score on (default: the one it was trained on). Its input shape
            and class count must match the checkpoint's.

    Returns:
        ``test_acc``, ``test_loss``, forward iterations/NFE and failed solves, plus identity.

    Raises:
        CheckpointError: missing, corrupt or foreign checkpoint.
        ConfigError: the dataset does not fit the model.
    """
    state = load_checkpoint(path)
    config = dict(state["config"])
    load_plugins_from_config(list(config.get("plugins", [])) + list(plugins or []))
    ensure_registered()
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
    return {
        "checkpoint": str(Path(path)),
        "model": config["model"],
        "preset": config.get("preset"),
        "trained_epochs": state["epoch"],
        "dataset": name,
        "images": len(test_set),  # type: ignore[arg-type]
        **metrics,
    }
