"""Turning what the caller gave into a validated run: plugins, recipes, checkpoint, output dir.

Precedence: harness defaults < the model's ``ModelSpec.training`` recipe < the checkpoint's
config (``resume``) < what the caller gave.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from pcdeq_plugin import add_plugin
from pcdeq_plugin.registry import MODELS

from .checkpoint import load_checkpoint
from .config import RESUMABLE_OVERRIDES, TRAINING_KEYS, ConfigError, TrainConfig, defaults
from .datasets import dataset_info

__all__ = [
    "BEST",
    "LAST",
    "load_plugins_from_config",
    "prepare_out_dir",
    "resolve_config",
    "training_recipe",
]

LAST = "last.pt"
BEST = "best.pt"


def load_plugins_from_config(modules: list[str]) -> None:
    """Add plugin modules named by import path (besides installed entry points)."""
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import plugin module {module_name!r}: {exc}") from exc
        add_plugin(module, module_name)


def training_recipe(training: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The harness keys of a ``ModelSpec.training`` mapping, for ``dataset``.

    Understands ``milestones: [m]`` (one milestone, as in the pcDEQ scripts) and a
    ``per_dataset: {name: {...}}`` table whose entry for ``dataset`` wins.
    """
    flat = dict(training)
    per_dataset = flat.pop("per_dataset", None)
    if isinstance(per_dataset, dict) and isinstance(per_dataset.get(dataset), dict):
        flat.update(per_dataset[dataset])
    milestones = flat.pop("milestones", None)
    if "milestone" not in flat and isinstance(milestones, (list, tuple)) and len(milestones) == 1:
        flat["milestone"] = int(milestones[0])
    return {k: v for k, v in flat.items() if k in TRAINING_KEYS}


def resolve_config(given: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Merge defaults, the model's training recommendations, a checkpoint and ``given``.

    Returns:
        The validated config and the checkpoint to resume from (``None`` for a fresh run).
    """
    TrainConfig.check_keys(given)
    load_plugins_from_config(list(given.get("plugins", [])))
    merged = defaults()
    checkpoint = None
    if given.get("resume"):
        if not given.get("out_dir"):
            raise ConfigError("resume needs out_dir (the run directory to continue)")
        checkpoint = load_checkpoint(Path(given["out_dir"]) / LAST)
        saved = dict(checkpoint["config"])
        conflicts = sorted(
            k for k in given if k not in RESUMABLE_OVERRIDES and k in saved and given[k] != saved[k]
        )
        if conflicts:
            detail = ", ".join(
                f"{k}: checkpoint {saved[k]!r} vs given {given[k]!r}" for k in conflicts
            )
            raise ConfigError(
                f"cannot resume with a different experiment ({detail}); only "
                f"{', '.join(sorted(RESUMABLE_OVERRIDES))} may change on resume"
            )
        load_plugins_from_config(list(saved.get("plugins", [])))
        merged.update(saved)
    else:
        spec = MODELS.get(given.get("model", merged["model"]))
        recipe = training_recipe(spec.training, given.get("dataset", merged["dataset"]))
        other_length = "epochs" in given and given["epochs"] != recipe.get("epochs")
        if other_length and "milestone" not in given:
            recipe.pop("milestone", None)  # the recipe's milestone belongs to its epoch count
        merged.update(recipe)
    merged.update(given)
    config = TrainConfig.from_dict(merged)
    MODELS.get(config.model)  # unknown model -> UnknownNameError listing the names
    dataset_info(config.dataset)  # unknown dataset -> UnknownNameError listing the names
    return config, checkpoint


def prepare_out_dir(config: TrainConfig, resuming: bool) -> Path | None:
    if config.out_dir is None:
        return None
    out = Path(config.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"output directory {out} is not writable ({exc}); choose another --out"
        ) from exc
    if not resuming and any((out / name).exists() for name in (LAST, "metrics.jsonl")):
        raise ConfigError(
            f"{out} already holds a run (found {LAST} or metrics.jsonl); pass --resume to continue "
            "it or choose another --out directory (nothing was overwritten)"
        )
    return out
