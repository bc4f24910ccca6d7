"""GEQ networks, factories and registry entries (``geq-fc``, ``geq-conv``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin import ImplicitModel, ModelSpec, SolverConfig
from pcdeq_plugin.interface import split_solver_options
from pcdeq_plugin.recipes import TrainingRecipe

from ..options import check_count, check_input_shape, check_overrides, check_pool, is_mnist_like
from .block import GEQ_SOLVER, GEQBlock, GEQConvBlock, GEQLinearBlock

__all__ = ["MODEL_SPECS", "GEQConvNet", "GEQFcNet", "make_geq_conv", "make_geq_fc"]


class _GEQNet(ImplicitModel):
    family = "geq"
    block: GEQBlock
    input_shape: tuple[int, ...]

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.input_shape, type(self).__name__)
        return x

    def contraction_bound(self) -> float:
        """Certified Lipschitz bound of the equilibrium map in the state (< 1)."""
        return self.block.contraction_bound()


class GEQFcNet(_GEQNet):
    """Flatten -> GEQ (``width``) -> Linear."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, *, width: int, **block: Any
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        width = check_count("width", width)
        self.block = GEQLinearBlock(math.prod(input_shape), width, name="geq", **block)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self._check(x)))


class GEQConvNet(_GEQNet):
    """GEQ with 3x3 "same" convolutions -> AvgPool(pool) -> Linear."""

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
        channels = check_count("channels", channels)
        check_pool(pool, min(h, w))
        self.pool = pool
        self.block = GEQConvBlock(c, channels, name="geq", **block)
        self.head = nn.Linear(channels * (h // pool) * (w // pool), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.avg_pool2d(self.block(self._check(x)), self.pool)
        return self.head(z.flatten(1))


_BLOCK_DEFAULTS: dict[str, Any] = {"kernel": "gaussian", "kernel_gamma": 1.0, "contraction": 0.9}
_SOLVER_DEFAULTS = {
    "solver": GEQ_SOLVER.solver,
    "tol": GEQ_SOLVER.tol,
    "max_iter": GEQ_SOLVER.max_iter,
    "on_failure": GEQ_SOLVER.on_failure,
    "solver_options": GEQ_SOLVER.solver_options,
}


def _options(model: str, overrides: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    valid = set(defaults) | set(_BLOCK_DEFAULTS) | set(SolverConfig.field_names())
    check_overrides(model, overrides, valid)
    defaults_solver = dict(_SOLVER_DEFAULTS)
    if "solver" in overrides:  # Anderson's options mean nothing to another solver
        defaults_solver["solver_options"] = {}
    solver, rest = split_solver_options({**defaults_solver, **overrides})
    return {**defaults, **_BLOCK_DEFAULTS, **rest, "config": SolverConfig(**solver)}


def make_geq_fc(input_shape: tuple[int, int, int], num_classes: int, **overrides: Any) -> GEQFcNet:
    """``geq-fc``: options ``width`` (95), ``kernel`` (``"gaussian"``/``"linear"``),
    ``kernel_gamma`` (1.0), ``contraction`` (0.9) and the :class:`SolverConfig` fields
    (Anderson, tol 1e-4, 50 iterations)."""
    return GEQFcNet(input_shape, num_classes, **_options("geq-fc", overrides, {"width": 95}))


def make_geq_conv(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> GEQConvNet:
    """``geq-conv``: options ``channels`` (73 for 1x28x28 inputs, else 106), ``pool`` (4) and
    the options of ``geq-fc``."""
    defaults = {"channels": 73 if is_mnist_like(input_shape) else 106, "pool": 4}
    return GEQConvNet(input_shape, num_classes, **_options("geq-conv", overrides, defaults))


# The paper trains with SGD and a step schedule on CIFAR/ImageNet-100; it gives no MNIST or
# small-model recipe. This recipe is ours: the monDEQ-style Adam recipe of the harness.
_TRAINING = TrainingRecipe(
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    batch_size=128,
    epochs=40,
    milestones=(30,),
    gamma=0.1,
    notes={"test_batch_size": 400, "schedule": "step", "runs": 3},
    source="ours (GEQ paper: SGD + step LR at ImageNet/CIFAR scale, no small-model recipe)",
)

MODEL_SPECS: dict[str, ModelSpec] = {
    "geq-fc": ModelSpec(
        "geq-fc",
        make_geq_fc,
        "geq",
        "GEQ fully connected, Gaussian-kernel OptEq (95 units, 84,561 params on MNIST), Anderson",
        presets={"mnist": {"width": 95}, "cifar10": {"width": 95}, "small": {"width": 32}},
        training=_TRAINING,
    ),
    "geq-conv": ModelSpec(
        "geq-conv",
        make_geq_conv,
        "geq",
        "GEQ convolutional, Gaussian kernel per pixel (73 ch., 84,472 params on MNIST; "
        "106 ch., 171,943 on SVHN/CIFAR-10), Anderson",
        presets={
            "mnist": {"channels": 73},
            "svhn": {"channels": 106},
            "cifar10": {"channels": 106},
            "small": {"channels": 8, "pool": 7},
        },
        training=_TRAINING,
    ),
}
