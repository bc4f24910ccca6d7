"""monDEQ: monotone operator equilibrium networks (Winston & Kolter, NeurIPS 2020).

``z* = relu(W z* + U x + b)`` with ``W = (1 - m) I - A^T A + B - B^T`` (m = 1), solved by
forward-backward or Peaceman-Rachford splitting (:mod:`.mondeq_splitting`) and
differentiated through the linear splitting problem of the paper's Theorem 3. Written from
the paper; the released code (no licence, removed ``torch.rfft`` API) was only read.

Models (parameter counts of the paper's Table E1 / the released code):

========================  ===============================  =====================
name                      preset                           parameters
========================  ===============================  =====================
``mondeq-fc``             ``mnist``: 87 units              84,313
``mondeq-single-conv``    ``svhn``/``cifar10``: 81 ch.     172,218
``mondeq-single-conv``    ``mnist``: 54 ch.                79,500 (*)
``mondeq-single-conv``    ``cifar10-large``: 200 ch.       853,612
``mondeq-multi-tier``     ``svhn``/``cifar10``: 16/32/60   170,194
``mondeq-multi-tier``     ``mnist``: 16/32/32              81,394
``mondeq-multi-tier``     ``cifar10-large``: 64/128/128    1,014,546
========================  ===============================  =====================

(*) The paper's table gives 54 channels and 84,460 parameters for the MNIST single conv;
the architecture it describes (and the released code) has 79,500 at 54 channels, and
exactly 84,460 at 56 channels (``channels=56``). The ``mnist`` preset follows the stated
width.

Solver settings of the paper's experiments: Peaceman-Rachford, ``alpha = 1``, tolerance
1e-2 on the per-sample relative change, 300 iterations, ``alpha`` re-tuned at batch 30
and mid-epoch (:meth:`MonDEQBlock.tune_alpha`). The statistics record the *true*
per-sample fixed-point residual ``||f(z) - z|| / (||f(z)|| + 1e-8)`` next to the verdict
of the stopping rule, since a 1e-2 change can leave a larger residual (reference
baselines.md section 8.2).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_plugin import ImplicitBlock, ImplicitModel, ModelSpec, SolveStats
from pcdeq_plugin.implicit import enforce_failure_policy
from pcdeq_plugin.interface import FAILURE_POLICIES

from .mondeq_ops import (
    MonFcOperator,
    MonMultiTierOperator,
    MonotoneOperator,
    MonSingleConvOperator,
    Resolvent,
    State,
)
from .mondeq_splitting import (
    SPLITTINGS,
    check_stop_rule,
    get_splitting,
    per_sample_residual,
    relu_prox,
    solve_adjoint,
    solve_equilibrium,
)

__all__ = [
    "MODEL_SPECS",
    "SPLITTINGS",
    "MonDEQBlock",
    "MonDEQFcNet",
    "MonDEQMultiTierNet",
    "MonDEQSingleConvNet",
    "make_mondeq_fc",
    "make_mondeq_multi_tier",
    "make_mondeq_single_conv",
]

#: Smallest alpha tried by the tuning (as in the paper).
_MIN_ALPHA = 1e-4


class MonDEQBlock(ImplicitBlock):
    """One monDEQ equilibrium layer: returns the state tuple ``z*`` (one tensor per tier).

    Args:
        operator: The linear part (:mod:`.mondeq_ops`).
        splitting: ``"peaceman-rachford"`` (``"pr"``) or ``"forward-backward"`` (``"fb"``).
        alpha: Splitting step size; ``None`` picks 1.0 for Peaceman-Rachford (any
            ``alpha > 0`` converges) and 0.5 for forward-backward (which needs
            ``alpha < 2 m / ||I - W||^2``; 0.5 converges at initialisation, and the tuning
            lowers it as training grows ``||I - W||``).
        tol: Tolerance of the stopping rule, forward and backward (unless overridden).
        max_iter: Iteration cap, forward and backward (unless overridden).
        backward_tol: Tolerance of the backward solve (default ``tol``).
        backward_max_iter: Cap of the backward solve (default ``max_iter``).
        check_every: Test the stopping rule every this many iterations.
        stop_rule: ``"change"`` (paper) or ``"residual"`` (see :mod:`.mondeq_splitting`).
        on_failure: ``"ignore"``, ``"warn"`` or ``"raise"`` for a solve that hits its cap.
        tune_alpha: Re-tune ``alpha`` during training at batch 30 and mid-epoch.
        steps_per_epoch: Training batches per epoch, to place the mid-epoch tuning
            (469 = MNIST at batch 128, the paper's setting).
        max_alpha: Largest ``alpha`` tried by the tuning.
        name: Block name in statistics and messages.
    """

    def __init__(
        self,
        operator: MonotoneOperator,
        *,
        splitting: str = "peaceman-rachford",
        alpha: float | None = None,
        tol: float = 1e-2,
        max_iter: int = 300,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        check_every: int = 1,
        stop_rule: str = "change",
        on_failure: str = "warn",
        tune_alpha: bool = True,
        steps_per_epoch: int = 469,
        max_alpha: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.operator = operator
        self.splitting = get_splitting(splitting)
        self.stop_rule = check_stop_rule(stop_rule)
        if alpha is None:
            alpha = 1.0 if self.splitting == "peaceman-rachford" else 0.5
        for label, value in (("alpha", alpha), ("tol", tol), ("max_alpha", max_alpha)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{label} must be a positive finite number, got {value!r}")
        if backward_tol is not None and not backward_tol > 0:
            raise ValueError(f"backward_tol must be positive, got {backward_tol!r}")
        for label, value in (
            ("max_iter", max_iter),
            ("check_every", check_every),
            ("steps_per_epoch", steps_per_epoch),
        ):
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if backward_max_iter is not None and not (
            isinstance(backward_max_iter, int) and backward_max_iter >= 1
        ):
            raise ValueError(
                f"backward_max_iter must be an integer >= 1, got {backward_max_iter!r}"
            )
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(
                f"unknown on_failure {on_failure!r}; choose one of {', '.join(FAILURE_POLICIES)}"
            )
        self.tol = float(tol)
        self.max_iter = max_iter
        self.backward_tol = float(backward_tol) if backward_tol is not None else self.tol
        self.backward_max_iter = backward_max_iter or max_iter
        self.check_every = check_every
        self.on_failure = on_failure
        self.tune_alpha_enabled = bool(tune_alpha)
        self.steps_per_epoch = steps_per_epoch
        self.max_alpha = float(max_alpha)
        # alpha and the training-batch counter are state: saved and restored with the weights
        self.register_buffer("_alpha", torch.tensor(float(alpha)))
        self.register_buffer("_train_batches", torch.tensor(0, dtype=torch.long))

    @property
    def alpha(self) -> float:
        return float(self._alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha.fill_(float(value))

    def after_optimizer_step(self) -> None:
        self.operator.project()

    # -- solves --------------------------------------------------------------------------
    def _solve(self, bias: State, alpha: float, resolvent: Resolvent | None):
        prox = relu_prox(self.operator.interior_masks(bias[0]))
        result = solve_equilibrium(
            self.operator,
            bias,
            prox,
            splitting=self.splitting,
            alpha=alpha,
            tol=self.tol,
            max_iter=self.max_iter,
            check_every=self.check_every,
            stop_rule=self.stop_rule,
            resolvent=resolvent,
        )
        return result, prox

    @torch.no_grad()
    def tune_alpha(self, x: torch.Tensor) -> float:
        """Re-tune ``alpha`` on the batch ``x`` as in the paper; returns the new ``alpha``.

        Starting at ``max_alpha``, ``alpha`` is halved while the forward iteration count
        does not grow; the last value before it grew is kept. If that value still hit the
        iteration cap, the previous ``alpha`` is restored.
        """
        bias = tuple(b.detach() for b in self.operator.injection(x))

        def iterations(alpha: float) -> int:
            result = self._solve(bias, alpha, None)[0]
            # a solve that failed (cap, or NaN stopping it early) counts as the full cap
            return result.iterations if bool(result.converged.all()) else self.max_iter

        alpha = self.max_alpha
        best_alpha, best = alpha, iterations(alpha)
        while alpha / 2 >= _MIN_ALPHA:
            alpha /= 2
            count = iterations(alpha)
            if count > best:
                break
            best_alpha, best = alpha, count
        if best < self.max_iter:
            self.alpha = best_alpha
        return self.alpha

    def _tuning_due(self) -> bool:
        if not (self.tune_alpha_enabled and self.training and torch.is_grad_enabled()):
            return False
        self._train_batches += 1
        batch_idx = (int(self._train_batches) - 1) % self.steps_per_epoch
        return batch_idx in (30, self.steps_per_epoch // 2) and batch_idx > 0

    def forward(self, x: torch.Tensor) -> State:
        device_type = x.device.type
        try:
            autocast_on = torch.is_autocast_enabled(device_type)
        except (TypeError, RuntimeError):  # a device type autocast does not know
            autocast_on = False
        if autocast_on:
            # the FFTs, per-frequency inverses and a 1e-2 tolerance need float32: solve with
            # autocast off (the head outside the block still runs under autocast)
            with torch.autocast(device_type=device_type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> State:
        if self._tuning_due():
            self.tune_alpha(x)
        start = time.perf_counter()
        bias = self.operator.injection(x)
        alpha = self.alpha
        with torch.no_grad():
            detached = tuple(b.detach() for b in bias)
            resolvent = (
                self.operator.resolvent(alpha) if self.splitting == "peaceman-rachford" else None
            )
            result, prox = self._solve(detached, alpha, resolvent)
        # the one differentiable application of the layer at the equilibrium
        z = prox(tuple(w + b for w, b in zip(self.operator.multiply(result.value), bias)))
        residual = per_sample_residual(tuple(t.detach() for t in z), result.value)
        stats = SolveStats(
            iterations=result.iterations,
            residual=residual,
            converged=result.converged & torch.isfinite(residual),
            seconds=time.perf_counter() - start,
            unit="iter",
            solver=self.splitting,
            max_iter=self.max_iter,
        )
        self.last_stats.forward, self.last_stats.backward = stats, None
        enforce_failure_policy(
            stats, self.on_failure, block=self.block_name, phase="forward", tol=self.tol
        )
        if any(t.requires_grad for t in z):
            z = _AdjointStep.apply(self, alpha, resolvent, *z)
        return z


class _AdjointStep(torch.autograd.Function):
    """Identity forward; backward replaces ``g`` by ``g + W^T u`` (Theorem 3)."""

    @staticmethod
    def forward(ctx, block: MonDEQBlock, alpha: float, resolvent: Resolvent | None, *z):
        ctx.block, ctx.alpha, ctx.resolvent = block, alpha, resolvent
        ctx.save_for_backward(*z)
        return tuple(t.view_as(t) for t in z)

    @staticmethod
    def backward(ctx, *grads):
        block: MonDEQBlock = ctx.block
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{block.block_name}: double backward (create_graph=True) through a monDEQ "
                "solve is not supported; the adjoint splitting is not itself differentiable"
            )
        start = time.perf_counter()
        z = ctx.saved_tensors
        op = block.operator
        active = tuple(t > 0 for t in z)  # relu' at the equilibrium (the border stays 0)
        result = solve_adjoint(
            op,
            active,
            grads,
            splitting=block.splitting,
            alpha=ctx.alpha,
            tol=block.backward_tol,
            max_iter=block.backward_max_iter,
            check_every=block.check_every,
            stop_rule=block.stop_rule,
            resolvent=ctx.resolvent,
        )
        u = result.value
        wtu = op.multiply_transpose(u)
        fu = tuple(
            torch.where(j, w + g, torch.zeros_like(w)) for j, w, g in zip(active, wtu, grads)
        )
        residual = per_sample_residual(fu, u)
        stats = SolveStats(
            iterations=result.iterations,
            residual=residual,
            converged=result.converged & torch.isfinite(residual),
            seconds=time.perf_counter() - start,
            unit="iter",
            solver=block.splitting,
            max_iter=block.backward_max_iter,
        )
        block.last_stats.backward = stats
        enforce_failure_policy(
            stats,
            block.on_failure,
            block=block.block_name,
            phase="backward",
            tol=block.backward_tol,
        )
        return (None, None, None, *(g + w for g, w in zip(grads, wtu)))


# -- models -------------------------------------------------------------------------------


class _MonDEQNet(ImplicitModel):
    family = "mondeq"
    block: MonDEQBlock

    def tune_alpha(self, x: torch.Tensor) -> float:
        """Re-tune the splitting step size on the batch ``x`` (see :meth:`MonDEQBlock.tune_alpha`)."""
        return self.block.tune_alpha(x)


class MonDEQFcNet(_MonDEQNet):
    """Flatten -> monDEQ (``width`` units) -> Linear."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int,
        m: float,
        **solver: Any,
    ) -> None:
        super().__init__()
        op = MonFcOperator(math.prod(input_shape), width, m=m)
        self.block = MonDEQBlock(op, name="mondeq", **solver)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x)[0])


class MonDEQSingleConvNet(_MonDEQNet):
    """monDEQ with one circular 3x3 convolution -> AvgPool(pool) -> Linear."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: int,
        m: float,
        pool: int,
        **solver: Any,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        size = (h + 2, w + 2)
        if not (1 <= pool <= min(size)):
            raise ValueError(f"pool must be between 1 and {min(size)}, got {pool}")
        op = MonSingleConvOperator(c, channels, size, m=m)
        self.block = MonDEQBlock(op, name="mondeq", **solver)
        self.pool = pool
        self.head = nn.Linear(channels * (size[0] // pool) * (size[1] // pool), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.avg_pool2d(self.block(x)[0], self.pool)
        return self.head(z.flatten(1))


class MonDEQMultiTierNet(_MonDEQNet):
    """Multi-tier monDEQ -> Linear on the flattened coarsest tier."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: tuple[int, ...],
        m: float,
        **solver: Any,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        op = MonMultiTierOperator(c, tuple(channels), (h + 2, w + 2), m=m)
        self.block = MonDEQBlock(op, name="mondeq", **solver)
        hl, wl = op.sizes[-1]
        self.head = nn.Linear(op.A[-1].in_channels * hl * wl, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x)[-1].flatten(1))


# -- factories and registry entries ------------------------------------------------------

_SOLVER_DEFAULTS: dict[str, Any] = {
    "splitting": "peaceman-rachford",
    "alpha": None,
    "tol": 1e-2,
    "max_iter": 300,
    "backward_tol": None,
    "backward_max_iter": None,
    "check_every": 1,
    "stop_rule": "change",
    "on_failure": "warn",
    "tune_alpha": True,
    "steps_per_epoch": 469,
    "max_alpha": 1.0,
}


def _options(model: str, overrides: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    valid = {**defaults, "m": 1.0, **_SOLVER_DEFAULTS}
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(
            f"{model}: unknown option(s) {unknown}; valid options: {', '.join(sorted(valid))}"
        )
    return {**valid, **overrides}


def _is_mnist_like(input_shape: tuple[int, int, int]) -> bool:
    return input_shape[0] == 1 and max(input_shape[1:]) <= 28


def make_mondeq_fc(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> MonDEQFcNet:
    """``mondeq-fc``: option ``width`` (87), ``m`` (1.0) and the solver options
    (``splitting``, ``alpha``, ``tol``, ``max_iter``, ``stop_rule``, ``on_failure``, ...)."""
    options = _options("mondeq-fc", overrides, {"width": 87})
    return MonDEQFcNet(input_shape, num_classes, **options)


def make_mondeq_single_conv(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> MonDEQSingleConvNet:
    """``mondeq-single-conv``: options ``channels`` (54 for 1x28x28 inputs, else 81),
    ``pool`` (4), ``m`` and the solver options."""
    channels = 54 if _is_mnist_like(input_shape) else 81
    options = _options("mondeq-single-conv", overrides, {"channels": channels, "pool": 4})
    return MonDEQSingleConvNet(input_shape, num_classes, **options)


def make_mondeq_multi_tier(
    input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
) -> MonDEQMultiTierNet:
    """``mondeq-multi-tier``: options ``channels`` ((16, 32, 32) for 1x28x28 inputs, else
    (16, 32, 60)), ``m`` and the solver options."""
    channels = (16, 32, 32) if _is_mnist_like(input_shape) else (16, 32, 60)
    options = _options("mondeq-multi-tier", overrides, {"channels": channels})
    return MonDEQMultiTierNet(input_shape, num_classes, **options)


# Adam (no weight decay), batch 128 (test 400), 40 epochs, lr x0.1 every `lr_step_epochs`
# epochs; 3 runs. CIFAR multi-tier uses lr 1e-2; the single convs on SVHN/CIFAR decay every
# 25 epochs. The harness applies one milestone (`milestone`, `gamma`): the paper's first
# decay; `lr_step_epochs` records the full step schedule.
_TRAINING_BASE = {
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 128,
    "test_batch_size": 400,
    "epochs": 40,
    "milestone": 10,
    "gamma": 0.1,
    "schedule": "step",
    "lr_step_epochs": 10,
    "runs": 3,
    "source": "monDEQ paper, Winston & Kolter 2020, appendix E",
}
_SLOW_DECAY = {"milestone": 25, "lr_step_epochs": 25}
_TRAINING = {
    "mondeq-fc": dict(_TRAINING_BASE),
    "mondeq-single-conv": {
        **_TRAINING_BASE,
        "per_dataset": {"svhn": _SLOW_DECAY, "cifar10": _SLOW_DECAY},
    },
    "mondeq-multi-tier": {**_TRAINING_BASE, "per_dataset": {"cifar10": {"lr": 1e-2}}},
}

# "small": one epoch over 4,000 MNIST images in well under a minute on CPU; alpha is tuned
# at batch 30 and mid-epoch of 32 batches (4,000 images at the recipe's batch 128)
_SMALL_SCHEDULE = {"steps_per_epoch": 32}

MODEL_SPECS: dict[str, ModelSpec] = {
    "mondeq-fc": ModelSpec(
        "mondeq-fc",
        make_mondeq_fc,
        "mondeq",
        "monDEQ fully connected (87 units, 84,313 params on MNIST), Peaceman-Rachford",
        presets={"mnist": {"width": 87}, "small": {"width": 64, **_SMALL_SCHEDULE}},
        training=_TRAINING["mondeq-fc"],
    ),
    "mondeq-single-conv": ModelSpec(
        "mondeq-single-conv",
        make_mondeq_single_conv,
        "mondeq",
        "monDEQ single circular conv, FFT inverse (81 ch., 172,218 params on SVHN/CIFAR-10)",
        presets={
            "mnist": {"channels": 54},
            "svhn": {"channels": 81},
            "cifar10": {"channels": 81},
            "cifar10-large": {"channels": 200},
            "small": {"channels": 8, **_SMALL_SCHEDULE},
        },
        training=_TRAINING["mondeq-single-conv"],
    ),
    "mondeq-multi-tier": ModelSpec(
        "mondeq-multi-tier",
        make_mondeq_multi_tier,
        "mondeq",
        "monDEQ multi-tier (16/32/60, 170,194 params on SVHN/CIFAR-10; 16/32/32 on MNIST)",
        presets={
            "mnist": {"channels": (16, 32, 32)},
            "svhn": {"channels": (16, 32, 60)},
            "cifar10": {"channels": (16, 32, 60)},
            "cifar10-large": {"channels": (64, 128, 128)},
            "small": {"channels": (4, 8, 8), **_SMALL_SCHEDULE},
        },
        training=_TRAINING["mondeq-multi-tier"],
    ),
}
