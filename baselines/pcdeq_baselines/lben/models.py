"""LBEN networks, factories and registry entries (``lben-fc``, ``lben-conv``).

Both use :class:`~pcdeq_baselines.mondeq.MonDEQBlock`, i.e. monDEQ's splitting
solves, Theorem-3 backward, alpha tuning, statistics and failure policy, on the operators of
:mod:`.operators`. The released code has no multi-tier LBEN, so neither do we.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from pcdeq_plugin import ModelSpec
from pcdeq_plugin.recipes import TrainingRecipe

from ..mondeq.block import MonDEQBlock
from ..mondeq.models import _SOLVER_DEFAULTS, _MonDEQNet
from ..options import check_choice, check_count, check_overrides, check_pool
from .certificate import LipschitzCertificate, check_gamma, fc_lmi_min_eigenvalue
from .operators import METRICS, LbenConvOperator, LbenFcOperator

__all__ = ["MODEL_SPECS", "LbenConvNet", "LbenFcNet", "make_lben_conv", "make_lben_fc"]


class _LbenNet(_MonDEQNet):
    family = "lben"
    operator: LbenFcOperator | LbenConvOperator

    @property
    def lipschitz_bound(self) -> float | None:
        """The certified l2 Lipschitz bound from the model's input to its logits (or None)."""
        return self.operator.gamma

    def lipschitz_certificate(self) -> LipschitzCertificate:
        """The bound the parametrisation guarantees for the current weights."""
        return LipschitzCertificate(self.lipschitz_bound, self.lipschitz_bound is not None)


class LbenFcNet(_LbenNet):
    """Flatten -> LBEN (``width`` units) -> ``G`` (the output layer inside the bound)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int,
        gamma: float | None,
        m: float,
        **solver: Any,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.operator = LbenFcOperator(
            math.prod(input_shape), check_count("width", width), num_classes, check_gamma(gamma), m
        )
        self.block = MonDEQBlock(self.operator, name="lben", **solver)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator.G(self.block(self._check(x))[0])

    def lipschitz_certificate(self) -> LipschitzCertificate:
        op = self.operator
        if op.gamma is None:
            return LipschitzCertificate(None, False)
        eig = fc_lmi_min_eigenvalue(
            op.lben_weight(), op.metric_inverse(), op.U.weight, op.G.weight, op.gamma
        )
        return LipschitzCertificate(op.gamma, True, eig)


class LbenConvNet(_LbenNet):
    """LBEN with one circular 3x3 convolution -> AvgPool(pool) -> ``G``."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: int,
        gamma: float | None,
        m: float,
        pool: int,
        metric: str,
        **solver: Any,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        c, h, w = input_shape
        size = (h + 2, w + 2)
        check_count("channels", channels)
        check_pool(pool, min(size))
        check_choice("metric", metric, METRICS)
        self.operator = LbenConvOperator(
            c, channels, size, num_classes, check_gamma(gamma), pool=pool, metric=metric, m=m
        )
        self.block = MonDEQBlock(self.operator, name="lben", **solver)
        if self.operator.gamma is not None and self.block.splitting == "peaceman-rachford":
            self.operator.resolvent(1.0)  # too large for a dense inverse: fail at build time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator.read_out(self.block(self._check(x))[0])


# -- factories and registry entries ------------------------------------------------------


def _options(model: str, overrides: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    valid = {**_SOLVER_DEFAULTS, **defaults}
    check_overrides(model, overrides, valid)
    return {**valid, **overrides}


def make_lben_fc(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> LbenFcNet:
    """``lben-fc``: options ``width`` (80), ``gamma`` (5.0; ``None``: no bound), ``m`` (1.0)
    and monDEQ's solver options (``splitting`` Peaceman-Rachford, ``alpha``, ``tol``, ...)."""
    options = _options("lben-fc", overrides, {"width": 80, "gamma": 5.0, "m": 1.0})
    return LbenFcNet(input_shape, num_classes, **options)


def make_lben_conv(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> LbenConvNet:
    """``lben-conv``: options ``channels`` (81; 54 for 1x28x28), ``pool`` (2; 3 for 1x28x28),
    ``gamma`` (5.0; ``None``: no bound), ``metric`` (``"full"``), ``m`` (0.1) and the solver
    options (forward-backward splitting with ``alpha`` 0.5, tuned up to ``max_alpha`` 1)."""
    mnist = input_shape[0] == 1 and max(input_shape[1:]) <= 28
    defaults = {
        "channels": 54 if mnist else 81,
        "pool": 3 if mnist else 2,
        "gamma": 5.0,
        "metric": "full",
        "m": 0.1,
        "splitting": "forward-backward",
        "alpha": 0.5,
        "max_iter": 200,
    }
    options = _options("lben-conv", overrides, defaults)
    return LbenConvNet(input_shape, num_classes, **options)


# The released scripts: Adam (no weight decay), batch 128, lr 1e-3 decayed x0.1 every
# `lr_step_epochs`; one run (seed 1). MNIST FC: 30 epochs, decay every 10. CIFAR conv:
# 25 epochs, decay every 15, float64, test batch 250.
_TRAINING_FC = TrainingRecipe(
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    batch_size=128,
    epochs=30,
    milestones=(10,),
    gamma=0.1,
    notes={"test_batch_size": 400, "schedule": "step", "lr_step_epochs": 10, "runs": 1},
    source="LBEN code (mrevay/LipschitzBoundedEquilibriumModels), mnist_experiment.py",
)
_TRAINING_CONV = dataclasses.replace(
    _TRAINING_FC,
    epochs=25,
    milestones=(15,),
    notes={"test_batch_size": 250, "schedule": "step", "lr_step_epochs": 15, "runs": 1},
    source="LBEN code (mrevay/LipschitzBoundedEquilibriumModels), conv_experiment.py",
)
_SMALL = {"steps_per_epoch": 32}
_MNIST, _SVHN, _CIFAR = ({"steps_per_epoch": n} for n in (469, 573, 391))

MODEL_SPECS: dict[str, ModelSpec] = {
    "lben-fc": ModelSpec(
        "lben-fc",
        make_lben_fc,
        "lben",
        "LBEN fully connected, certified l2 Lipschitz bound gamma (80 units, 76,490 params "
        "on MNIST), Peaceman-Rachford",
        presets={
            "mnist": {"width": 80, **_MNIST},
            "cifar10": {"width": 80, **_CIFAR},
            "small": {"width": 32, **_SMALL},
        },
        training=_TRAINING_FC,
    ),
    "lben-conv": ModelSpec(
        "lben-conv",
        make_lben_conv,
        "lben",
        "LBEN single circular conv, certified l2 Lipschitz bound gamma (81 ch., pool 2, "
        "448,104 params on CIFAR-10), forward-backward",
        presets={
            "mnist": {"channels": 54, "pool": 3, **_MNIST},
            "svhn": {"channels": 81, "pool": 2, **_SVHN},
            "cifar10": {"channels": 81, "pool": 2, **_CIFAR},
            "small": {"channels": 8, "pool": 6, "m": 0.5, **_SMALL},
        },
        training=_TRAINING_CONV,
    ),
}
