"""Turning what the caller gave into a validated run: plugins, recipes, checkpoint, output dir.

Precedence: harness defaults < the model's ``ModelSpec.training`` recipe < the checkpoint's
config (``resume``) < what the caller gave.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pcdeq_plugin import UnknownNameError, add_plugin, plugin_report
from pcdeq_plugin.catalog import MODELS
from pcdeq_plugin.recipes import TrainingRecipe

from .checkpoint import load_checkpoint
from .config import RESUMABLE_OVERRIDES, ConfigError, TrainConfig, defaults
from .datasets import dataset_info
from .rundir import BEST, LAST, RUN_FILES, describe_leftover

__all__ = [
    "BEST",
    "LAST",
    "load_plugins_from_config",
    "plugins_not_loaded",
    "resolve_config",
    "training_recipe",
]


def load_plugins_from_config(modules: list[str]) -> None:
    """Add plugin modules named by import path (``--plugin``; besides installed entry points).

    Only what the caller names is imported: never the plugins a checkpoint's config lists.
    """
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"cannot import plugin module {module_name!r} (given with --plugin): {exc}; "
                "check the name and that its directory is on PYTHONPATH"
            ) from exc
        except Exception as exc:  # the module itself raised while being imported
            raise ConfigError(
                f"plugin module {module_name!r} (given with --plugin) raised "
                f"{type(exc).__name__}: {exc} while being imported; fix that module or drop "
                f"--plugin {module_name}"
            ) from exc
        add_plugin(module, module_name)


def plugins_not_loaded(named: list[str]) -> list[str]:
    """Which of the plugin modules a checkpoint names are not loaded in this process."""
    loaded = {r.name for r in plugin_report() if r.status == "loaded"}
    return [name for name in named if name not in loaded]


def checkpoint_plugins_note(named: list[str], path: Path) -> str | None:
    """The sentence that says a checkpoint's plugins were not loaded, or ``None``."""
    missing = plugins_not_loaded(named)
    if not missing:
        return None
    flags = " ".join(f"--plugin {name}" for name in missing)
    return (
        f"{path} was trained with plugin module(s) {', '.join(missing)}, which are not loaded: "
        f"a checkpoint never imports code; pass {flags} (or install them as entry points) if "
        "its model comes from them"
    )


def training_recipe(training: TrainingRecipe | Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The harness values a model's recipe (``ModelSpec.training``) declares for ``dataset``.

    The recipe's ``per_dataset`` entry for ``dataset`` wins field by field; its one
    milestone comes back as ``milestone``. A mapping in the recipe's form is converted
    (and checked) first.
    """
    recipe = (
        training if isinstance(training, TrainingRecipe) else TrainingRecipe.from_mapping(training)
    )
    return recipe.harness_options(dataset)


def resolve_config(given: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Merge defaults, the model's training recommendations, a checkpoint and ``given``.

    Returns:
        The validated config and the checkpoint to resume from (``None`` for a fresh run).
    """
    TrainConfig.check_keys(given)
    if given.get("resume") and given.get("overwrite"):
        raise ConfigError(
            "resume and overwrite contradict each other: --resume continues the run in --out, "
            "--overwrite replaces it; pass one of them"
        )
    load_plugins_from_config(list(given.get("plugins", [])))
    merged = defaults()
    checkpoint = None
    if given.get("resume"):
        if not given.get("out_dir"):
            raise ConfigError("resume needs out_dir (the run directory to continue)")
        checkpoint = _resume_point(Path(given["out_dir"]))
        saved = dict(checkpoint["config"])
        saved.pop("overwrite", None)  # how that run started, not part of the experiment
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
        note = checkpoint_plugins_note(list(saved.get("plugins") or []), Path(given["out_dir"]))
        if note is not None:
            try:
                MODELS.get(saved.get("model", ""))
            except UnknownNameError as exc:
                raise UnknownNameError(f"{exc}; {note}") from None
            print(f"pcdeq-bench: note: {note}", file=sys.stderr, flush=True)
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


def _resume_point(out: Path) -> dict[str, Any]:
    """``out/last.pt``, or an error that says why there is none and what to do."""
    if not (out / LAST).exists():
        leftovers = [name for name in RUN_FILES if (out / name).exists()]
        if leftovers:
            raise ConfigError(
                f"cannot resume {out}: the run there ended before its first checkpoint "
                f"({describe_leftover(out)}), so there is no {LAST}; start it again with "
                "--overwrite (instead of --resume)"
            )
        raise ConfigError(
            f"cannot resume {out}: it holds no run (no {LAST}); drop --resume to start one there"
        )
    return load_checkpoint(out / LAST)
