"""Unconstrained DEQ baselines through TorchDEQ: the "no guarantees" reference.

The networks mirror the pcDEQ backbones (linear, single conv, multi conv; same layers,
widths and parameter counts as the official pcDEQ code), but each equilibrium layer is an
ordinary DEQ cell

    z = act(W z + b + u(x))

with an unconstrained recurrent weight ``W``, an ordinary bias ``b``, the pre-injection
``u(x)`` used as it is (no positivity map) and an ordinary activation (``tanh`` by
default). Nothing guarantees that a fixed point exists or that the solver finds it, so
every solve's outcome is recorded; the cell, its TorchDEQ solve, its initialisation and
its statistics are described in :mod:`pcdeq_baselines.deq.block`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pcdeq_plugin import ImplicitModel, ModelSpec

from ..options import check_counts, check_input_shape, check_overrides
from .block import UnconstrainedDEQBlock

__all__ = [
    "MODEL_SPECS",
    "UnconstrainedDEQLinear",
    "UnconstrainedDEQMultiConv",
    "UnconstrainedDEQSingleConv",
    "build_deq_linear",
    "build_deq_multi_conv",
    "build_deq_single_conv",
]

_BLOCK_KEYS = (
    "activation",
    "solver",
    "backward_solver",
    "tol",
    "max_iter",
    "backward_tol",
    "backward_max_iter",
    "solver_options",
    "on_failure",
    "recurrent_init",
)


def _pooled(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class UnconstrainedDEQLinear(ImplicitModel):
    """flatten -> Linear -> BN -> DEQ(Linear) -> BN -> Linear (the pcDEQ linear backbone).

    Args:
        input_shape: ``(channels, height, width)``.
        num_classes: Output classes.
        width: Width of the equilibrium state.
        **block_options: Options of :class:`UnconstrainedDEQBlock`.
    """

    family = "deq"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 80,
        **block_options: Any,
    ) -> None:
        super().__init__()
        (width,) = check_counts("width", width, 1)
        self.input_shape = tuple(input_shape)
        self.embed = nn.Linear(math.prod(input_shape), width)
        self.bn_in = nn.BatchNorm1d(width)
        self.deq = UnconstrainedDEQBlock(nn.Linear(width, width), name="deq", **block_options)
        self.bn_out = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.input_shape, "deq-linear")
        z = self.deq(self.bn_in(self.embed(x.flatten(1))))
        return self.head(self.bn_out(z))


class UnconstrainedDEQSingleConv(ImplicitModel):
    """conv -> BN -> DEQ(conv3x3) -> maxpool(3,1,1) -> BN -> avgpool(8) -> Linear.

    Args:
        input_shape: ``(channels, height, width)``; height and width at least 8.
        num_classes: Output classes.
        width: Channels of the equilibrium state.
        **block_options: Options of :class:`UnconstrainedDEQBlock`.
    """

    family = "deq"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 82,
        **block_options: Any,
    ) -> None:
        super().__init__()
        channels, height, wide = input_shape
        if min(height, wide) < 8:
            raise ValueError(f"deq-single-conv needs images of at least 8x8, got {height}x{wide}")
        (width,) = check_counts("width", width, 1)
        self.input_shape = tuple(input_shape)
        self.embed = nn.Conv2d(channels, width, 3, padding=1)
        self.bn_in = nn.BatchNorm2d(width)
        self.deq = UnconstrainedDEQBlock(
            nn.Conv2d(width, width, 3, padding=1), name="deq", **block_options
        )
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.bn_out = nn.BatchNorm2d(width)
        self.avg = nn.AvgPool2d(8)
        self.head = nn.Linear(width * _pooled(height, 8, 8) * _pooled(wide, 8, 8), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.input_shape, "deq-single-conv")
        z = self.deq(self.bn_in(self.embed(x)))
        return self.head(self.avg(self.bn_out(self.pool(z))).flatten(1))


class UnconstrainedDEQMultiConv(ImplicitModel):
    """Three DEQ stages separated by stride-2 convolutions (the pcDEQ multi-conv backbone).

    Args:
        input_shape: ``(channels, height, width)``; spatial sizes 28 and 32 end at 1x1.
        num_classes: Output classes.
        widths: Channels of the three equilibrium states.
        **block_options: Options of every :class:`UnconstrainedDEQBlock`.
    """

    family = "deq"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        widths: Sequence[int] = (12, 24, 48),
        **block_options: Any,
    ) -> None:
        super().__init__()
        channels, height, wide = input_shape
        c1, c2, c3 = check_counts("widths", widths, 3)
        self.input_shape = tuple(input_shape)
        h3, w3 = (_pooled(_pooled(s, 3, 2), 3, 2) for s in (height, wide))
        if min(h3, w3) < 4:
            raise ValueError(
                f"deq-multi-conv needs images of at least 23x23 (the third stage must be >= 4x4), "
                f"got {height}x{wide}"
            )
        cell = lambda c: nn.Conv2d(c, c, 3, padding=1)  # noqa: E731
        self.stage1 = nn.Sequential(nn.Conv2d(channels, c1, 3, padding=1), nn.BatchNorm2d(c1))
        self.deq1 = UnconstrainedDEQBlock(cell(c1), name="deq1", **block_options)
        self.stage2 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1),
            nn.BatchNorm2d(c1),
            nn.Conv2d(c1, c2, 3, stride=2),
            nn.BatchNorm2d(c2),
        )
        self.deq2 = UnconstrainedDEQBlock(cell(c2), name="deq2", **block_options)
        self.stage3 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1),
            nn.BatchNorm2d(c2),
            nn.Conv2d(c2, c3, 3, stride=2),
            nn.BatchNorm2d(c3),
        )
        self.deq3 = UnconstrainedDEQBlock(cell(c3), name="deq3", **block_options)
        self.tail = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(c3), nn.AvgPool2d(4))
        self.head = nn.Linear(c3 * _pooled(h3, 4, 4) * _pooled(w3, 4, 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.input_shape, "deq-multi-conv")
        z = self.deq1(self.stage1(x))
        z = self.deq2(self.stage2(z))
        z = self.deq3(self.stage3(z))
        return self.head(self.tail(z).flatten(1))


def _factory(cls: type[ImplicitModel], model: str, size_key: str) -> Callable[..., ImplicitModel]:
    valid = (size_key, *_BLOCK_KEYS)

    def build(
        input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
    ) -> ImplicitModel:
        check_overrides(model, overrides, valid)
        return cls(tuple(input_shape), num_classes, **overrides)

    build.__name__ = f"build_{model.replace('-', '_')}"
    build.__doc__ = f"Build {model!r}: ``factory(input_shape, num_classes, **overrides)``."
    return build


build_deq_linear = _factory(UnconstrainedDEQLinear, "deq-linear", "width")
build_deq_single_conv = _factory(UnconstrainedDEQSingleConv, "deq-single-conv", "width")
build_deq_multi_conv = _factory(UnconstrainedDEQMultiConv, "deq-multi-conv", "widths")


def _training(**per_dataset: dict[str, Any]) -> dict[str, Any]:
    # The pcDEQ recipe (official README examples), so the comparison differs only in the cell.
    return {
        "optimizer": "adamw",
        "lr": 5e-4,
        "batch_size": 64,
        "schedule": "multistep, gamma 0.1 at one milestone",
        "source": "pcDEQ README (mateuszgabor/pcdeq); applied unchanged to the unconstrained cell",
        **per_dataset,
    }


_MNIST = {"epochs": 40, "milestone": 30, "weight_decay": 1.5e-2}
_SVHN = {"epochs": 80, "milestone": 70, "weight_decay": 2e-2}
_CIFAR = {"epochs": 120, "milestone": 100, "weight_decay": 2e-2}

MODEL_SPECS: dict[str, ModelSpec] = {
    "deq-linear": ModelSpec(
        name="deq-linear",
        factory=build_deq_linear,
        family="deq",
        description="Unconstrained DEQ, pcDEQ linear backbone, TorchDEQ Anderson + IFT",
        presets={"mnist": {"width": 80}, "small": {"width": 64}},  # mnist: 70,410 parameters
        training=_training(mnist=_MNIST),
    ),
    "deq-single-conv": ModelSpec(
        name="deq-single-conv",
        factory=build_deq_single_conv,
        family="deq",
        description="Unconstrained DEQ, pcDEQ single-conv backbone, TorchDEQ Anderson + IFT",
        presets={
            "mnist": {"width": 82},  # 69,136 parameters
            "svhn": {"width": 125},  # 164,760
            "cifar10": {"width": 125},
            # pcDEQ's small preset uses 16 channels; the unconstrained cell needs 2-3x more
            # solver iterations by the end of a small epoch (about 57 s of CPU at 16), so 8.
            "small": {"width": 8},
        },
        training=_training(mnist=_MNIST, svhn=_SVHN, cifar10=_CIFAR),
    ),
    "deq-multi-conv": ModelSpec(
        name="deq-multi-conv",
        factory=build_deq_multi_conv,
        family="deq",
        description="Unconstrained DEQ, pcDEQ multi-conv backbone (3 DEQs), TorchDEQ Anderson + IFT",
        presets={
            "mnist": {"widths": (12, 24, 48)},  # 41,278 parameters
            "svhn": {"widths": (20, 50, 80)},  # 130,950
            "cifar10": {"widths": (20, 50, 80)},
            "cifar10-aug": {"widths": (100, 120, 140)},  # 661,470
            "small": {"widths": (8, 16, 32)},
        },
        training=_training(mnist=_MNIST, svhn=_SVHN, cifar10=_CIFAR),
    ),
}
