"""SubDEQ: subhomogeneous deep equilibrium models (Sittoni & Tudisco, ICML 2024).

The released networks around the SubDEQ layer of :mod:`.block`
(``tanh(W z) + relu(U x + b) + c``, optionally normalised per sample), built by name with
the released sizes and training recipe: ``subdeq-fc``, ``subdeq-conv`` and their
``-normalized`` variants (shift 1.603 and infinity-norm normalisation). Every model offers
:meth:`certificate`, the subhomogeneity certificate of its layer for the current weights.

Deviations from the released code, on purpose:

* The normalised convolutional layer divides by the per-sample infinity norm over all of
  ``C x H x W`` (the released code normalises along the image-height axis only, a quirk).
* The released fully connected class carries two unused 87-vectors (``gamma``/``beta``,
  174 parameters never used in ``forward``); they are left out, so ``subdeq-fc`` at width
  87 has 76,918 parameters where the released count is 77,092.
* Weights use PyTorch's default initialisation, as the released training script resets
  every layer (``weight_reset``) before training, overriding the constructor's N(0, 0.01).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from pcdeq_plugin import ImplicitModel, ModelSpec, SolverConfig
from pcdeq_plugin.interface import split_solver_options
from pcdeq_plugin.recipes import TrainingRecipe

from ..options import check_count, check_input_shape, check_overrides, check_pool, is_mnist_like
from .block import (
    SUBDEQ_SOLVER,
    SubDEQBlock,
    SubDEQConvBlock,
    SubDEQLinearBlock,
)
from .certificate import SubhomogeneityCertificate

__all__ = [
    "MODEL_SPECS",
    "SubDEQConvNet",
    "SubDEQFcNet",
    "make_subdeq_conv",
    "make_subdeq_conv_normalized",
    "make_subdeq_fc",
    "make_subdeq_fc_normalized",
]


class _SubDEQNet(ImplicitModel):
    family = "subdeq"
    block: SubDEQBlock

    def certificate(self, x: torch.Tensor | None = None) -> SubhomogeneityCertificate:
        """The block's :meth:`SubDEQBlock.certificate` (``x``: raw model inputs)."""
        if x is not None:
            check_input_shape(x, self.input_shape, type(self).__name__)
        return self.block.certificate(x)


class SubDEQFcNet(_SubDEQNet):
    """Flatten -> SubDEQ (width) -> BatchNorm1d -> Linear (the released MNIST FC model)."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, *, width: int, **block: Any
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        check_count("width", width)
        self.block = SubDEQLinearBlock(math.prod(input_shape), width, name="subdeq", **block)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.input_shape, type(self).__name__)
        return self.head(self.norm(self.block(x)))


class SubDEQConvNet(_SubDEQNet):
    """SubDEQ conv -> BatchNorm2d -> AvgPool(pool) -> Linear (the released conv models)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: int,
        pool: int,
        **block: Any,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        check_count("channels", channels)
        check_pool(pool, min(h, w))
        self.block = SubDEQConvBlock(c, channels, name="subdeq", **block)
        self.norm = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(pool, pool)
        self.head = nn.Linear(channels * (h // pool) * (w // pool), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.input_shape, type(self).__name__)
        return self.head(self.pool(self.norm(self.block(x))).flatten(1))


# -- factories and registry entries ------------------------------------------------------


def _split_options(
    model: str, overrides: dict[str, Any], defaults: dict[str, Any]
) -> tuple[dict[str, Any], SolverConfig]:
    """Validate ``overrides`` against the model's options and build its SolverConfig."""
    solver, rest = split_solver_options(overrides)
    check_overrides(model, overrides, [*defaults, *SolverConfig.field_names()])
    return {**defaults, **rest}, SUBDEQ_SOLVER.replace(**solver)


def _fc(
    model: str,
    normalize: bool,
    input_shape: tuple[int, int, int],
    num_classes: int,
    overrides: dict[str, Any],
) -> SubDEQFcNet:
    defaults = {"width": 87, "normalize": normalize, "shift": None}
    options, config = _split_options(model, overrides, defaults)
    return SubDEQFcNet(input_shape, num_classes, config=config, **options)


def _conv(
    model: str,
    normalize: bool,
    input_shape: tuple[int, int, int],
    num_classes: int,
    overrides: dict[str, Any],
) -> SubDEQConvNet:
    mnist = is_mnist_like(input_shape)
    defaults = {
        "channels": 32 if mnist else 48,
        "pool": 6 if mnist else 8,
        "normalize": normalize,
        "shift": None,
    }
    options, config = _split_options(model, overrides, defaults)
    return SubDEQConvNet(input_shape, num_classes, config=config, **options)


def make_subdeq_fc(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> SubDEQFcNet:
    """``subdeq-fc``: options ``width`` (87), ``normalize`` (False), ``shift`` (1.2 / 1.603)
    and the solver options of :class:`~pcdeq_plugin.SolverConfig`."""
    return _fc("subdeq-fc", False, input_shape, num_classes, overrides)


def make_subdeq_fc_normalized(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> SubDEQFcNet:
    """``subdeq-fc-normalized``: :func:`make_subdeq_fc` with ``normalize=True`` (shift 1.603)."""
    return _fc("subdeq-fc-normalized", True, input_shape, num_classes, overrides)


def make_subdeq_conv(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> SubDEQConvNet:
    """``subdeq-conv``: options ``channels`` (32 MNIST-sized, else 48), ``pool`` (6 / 8),
    ``normalize``, ``shift`` and the solver options."""
    return _conv("subdeq-conv", False, input_shape, num_classes, overrides)


def make_subdeq_conv_normalized(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> SubDEQConvNet:
    """``subdeq-conv-normalized``: :func:`make_subdeq_conv` with ``normalize=True``."""
    return _conv("subdeq-conv-normalized", True, input_shape, num_classes, overrides)


# Adam, lr 1e-3, weight decay 1e-5, cosine annealing per step down to 1e-6, batch 128
# (test 512); 30 epochs (MNIST FC) or 40 (conv); 5 runs; best-on-validation model scored.
_TRAINING_FC = TrainingRecipe(
    optimizer="adam",
    lr=1e-3,
    weight_decay=1e-5,
    batch_size=128,
    epochs=30,
    notes={"test_batch_size": 512, "schedule": "cosine_per_step", "min_lr": 1e-6, "runs": 5},
    source="SubDEQ released train.py (Sittoni & Tudisco, ICML 2024)",
)
_TRAINING_CONV = dataclasses.replace(_TRAINING_FC, epochs=40)

_FC_PRESETS = {"mnist": {"width": 87}, "small": {"width": 64}}
_CONV_PRESETS = {
    "mnist": {"channels": 32, "pool": 6},
    "svhn": {"channels": 48, "pool": 8},
    "cifar10": {"channels": 48, "pool": 8},
    "small": {"channels": 12, "pool": 7},
}

MODEL_SPECS: dict[str, ModelSpec] = {
    "subdeq-fc": ModelSpec(
        "subdeq-fc",
        make_subdeq_fc,
        "subdeq",
        "SubDEQ fully connected: tanh(Wz) + relu(Ux+b) + 1.2, Anderson from ones "
        "(77,092 params released incl. 174 unused; 76,918 here)",
        presets=_FC_PRESETS,
        training=_TRAINING_FC,
    ),
    "subdeq-fc-normalized": ModelSpec(
        "subdeq-fc-normalized",
        make_subdeq_fc_normalized,
        "subdeq",
        "SubDEQ fully connected, shift 1.603 and per-sample infinity-norm normalisation",
        presets=_FC_PRESETS,
        training=_TRAINING_FC,
    ),
    "subdeq-conv": ModelSpec(
        "subdeq-conv",
        make_subdeq_conv,
        "subdeq",
        "SubDEQ convolutional (14,730 params MNIST; 29,866 SVHN/CIFAR-10)",
        presets=_CONV_PRESETS,
        training=_TRAINING_CONV,
    ),
    "subdeq-conv-normalized": ModelSpec(
        "subdeq-conv-normalized",
        make_subdeq_conv_normalized,
        "subdeq",
        "SubDEQ convolutional, shift 1.603 and per-sample infinity-norm normalisation",
        presets=_CONV_PRESETS,
        training=_TRAINING_CONV,
    ),
}
