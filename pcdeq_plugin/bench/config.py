"""The training configuration: one flat, plain-data record shared by the CLI and ``run``.

Precedence when a run starts: harness defaults < the model's ``ModelSpec.training``
recommendations < the checkpoint's config (``resume``) < what the caller gave.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pcdeq_plugin.checks import (
    check_choice,
    check_count,
    check_flag,
    check_known_keys,
    is_count,
    is_finite_number,
)
from pcdeq_plugin.recipes import HARNESS_KEYS, OPTIMIZERS

__all__ = [
    "AMP_MODES",
    "ATTACKS",
    "COMPARE_EPOCHS",
    "DEVICES",
    "RESUMABLE_OVERRIDES",
    "TRAINING_KEYS",
    "ConfigError",
    "TrainConfig",
]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")
#: The attacks of ``eval --attack`` and ``compare --robustness`` (see robustness.py).
ATTACKS: tuple[str, ...] = ("fgsm", "pgd-l2", "pgd-linf")

# The keys of a ``ModelSpec.training`` recipe the harness applies (its notes are shown only);
# the optimizer choices and these keys have their one home with the recipes.
TRAINING_KEYS: tuple[str, ...] = HARNESS_KEYS

# Epochs of each run of `compare` by default. Three: enough for the per-epoch curves to
# show a trend and for the accuracies to separate the models, while the default job
# (6 models x 3 seeds; NODE/ANODE dominate at ~15 s per epoch each) still ends within
# about 10 minutes on 2 CPU cores.
COMPARE_EPOCHS = 3

# What may differ between a checkpoint and the resumed run; anything else must match so
# the resumed run is the same experiment.
RESUMABLE_OVERRIDES: frozenset[str] = frozenset(
    {
        "epochs",
        "device",
        "workers",
        "progress",
        "out_dir",
        "resume",
        "data_dir",
        "download",
        "plugins",
        "test_batch_size",
        "overwrite",
    }
)

# Above this a "learning rate" is a typo: weights move by ~lr per step and overflow float32
# within a few steps. (1e8 is still accepted: that run ends with status "diverged".)
MAX_LR = 1e10
# torch, NumPy and the loaders' (seed, epoch) generators all accept seeds in this range.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A configuration the harness cannot run; the message says what to change."""


@dataclass
class TrainConfig:
    """Everything one training run needs, as plain data (JSON- and checkpoint-safe).

    Attributes:
        model: Registered model name (``pcdeq-bench list``).
        preset: Model preset (e.g. ``"small"``, ``"mnist"``); ``None`` uses the factory defaults.
        model_options: Extra keyword overrides for the model factory.
        dataset: Registered dataset name (``mnist5k`` is embedded and offline).
        data_dir: Where torchvision datasets live (or are downloaded to).
        download: Let torchvision download a missing dataset.
        augment: Training augmentation (CIFAR-10: random crop, padding 4, horizontal flip).
        train_limit: Use only this many training images (a fixed, seeded subset).
        test_limit: Use only this many test images (a fixed, seeded subset).
        epochs: Number of epochs.
        batch_size: Training batch size (per process under DDP).
        test_batch_size: Evaluation batch size; ``None`` reuses ``batch_size``.
        optimizer: ``adamw`` (the pcDEQ scripts), ``adam`` or ``sgd``.
        lr: Learning rate.
        weight_decay: Weight decay.
        milestone: The one MultiStepLR milestone (epoch); ``None`` picks ``round(0.75*epochs)``
            (40 -> 30 as in the pcDEQ MNIST script), ``0`` disables the decay.
        gamma: Learning-rate factor at the milestone.
        seed: Seed of weights, data order and augmentation.
        deterministic: ``torch.use_deterministic_algorithms(True)`` and friends.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        amp: Mixed precision: ``off``, ``bf16`` or ``fp16`` (fp16 uses a GradScaler on CUDA).
        workers: DataLoader worker processes.
        out_dir: Run directory (checkpoints, metrics); ``None`` writes nothing.
        resume: Continue from ``out_dir/last.pt``.
        overwrite: Replace an earlier run in ``out_dir`` (its checkpoints, metrics and
            summary; nothing else there is touched) instead of refusing to start.
        progress: Show tqdm bars (``None``: only on a terminal).
        plugins: Extra plugin modules to add by import path (``pkg.module``).
    """

    model: str = "pcdeq-linear-1"
    preset: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist5k"
    data_dir: str = "./data"
    download: bool = False
    augment: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    epochs: int = 10
    batch_size: int = 64
    test_batch_size: int | None = None
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 1.5e-2
    milestone: int | None = None
    gamma: float = 0.1
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "off"
    workers: int = 0
    out_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None
    plugins: list[str] = field(default_factory=list)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, config: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` naming any unknown key and listing the valid ones."""
        check_known_keys(config, cls.keys(), noun="config key", error=ConfigError)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        cls.check_keys(config)
        made = cls(**config)
        made.validate()
        return made

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_milestone(self) -> int | None:
        if self.milestone is None:
            mark = round(0.75 * self.epochs)
            return mark if 0 < mark < self.epochs else None
        return self.milestone if self.milestone > 0 else None

    def validate(self) -> None:
        """Check types and ranges; every message names the key and the valid choices."""

        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        need(
            isinstance(self.model, str) and bool(self.model),
            f"model must be a name, got {self.model!r}",
        )
        need(
            isinstance(self.dataset, str) and bool(self.dataset),
            f"dataset must be a name, got {self.dataset!r}",
        )
        need(
            isinstance(self.model_options, dict),
            "model_options must be a dict of factory overrides",
        )
        check_choice("device", self.device, DEVICES, error=ConfigError)
        check_choice("amp mode", self.amp, AMP_MODES, error=ConfigError)
        check_choice("optimizer", self.optimizer, OPTIMIZERS, error=ConfigError)
        for key in ("epochs", "batch_size"):
            check_count(key, getattr(self, key), error=ConfigError)
        for key in ("train_limit", "test_limit", "test_batch_size"):
            check_count(key, getattr(self, key), allow_none=True, error=ConfigError)
        check_count("workers", self.workers, 0, error=ConfigError)
        need(
            is_count(self.seed, 0) and self.seed <= MAX_SEED,
            f"seed must be an integer from 0 to 2**32 - 1 = {MAX_SEED}, got {self.seed!r}",
        )
        need(
            is_finite_number(self.lr) and 0 < self.lr < MAX_LR,
            f"lr must be a finite number in (0, {MAX_LR:g}), got {self.lr!r}",
        )
        need(
            is_finite_number(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}",
        )
        check_count("milestone", self.milestone, 0, allow_none=True, error=ConfigError)
        need(
            is_finite_number(self.gamma) and 0 < self.gamma <= 1,
            f"gamma must be in (0, 1], got {self.gamma!r}",
        )
        for key in ("download", "augment", "deterministic", "resume", "overwrite"):
            check_flag(key, getattr(self, key), error=ConfigError)
        check_flag("progress", self.progress, allow_none=True, error=ConfigError)
        need(
            self.preset is None or (isinstance(self.preset, str) and bool(self.preset)),
            f"preset must be a name or None, got {self.preset!r}",
        )
        need(
            isinstance(self.plugins, list) and all(isinstance(p, str) for p in self.plugins),
            "plugins must be a list of module paths",
        )
        need(
            not (self.resume and not self.out_dir),
            "resume needs out_dir (the run directory to continue)",
        )
        need(
            not (self.resume and self.overwrite),
            "resume and overwrite contradict each other: --resume continues the run in --out, "
            "--overwrite replaces it; pass one of them",
        )


def defaults() -> dict[str, Any]:
    """The harness defaults as a plain dict."""
    return TrainConfig().to_dict()
