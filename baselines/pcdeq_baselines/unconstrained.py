"""Unconstrained DEQ baselines through TorchDEQ: the "no guarantees" reference.

The networks mirror the pcDEQ backbones (linear, single conv, multi conv; same layers,
widths and parameter counts as the official pcDEQ code), but each equilibrium layer is an
ordinary DEQ cell

    z = act(W z + b + u(x))

with an unconstrained recurrent weight ``W``, an ordinary bias ``b``, the pre-injection
``u(x)`` used as it is (no positivity map) and an ordinary activation (``tanh`` by
default). Nothing guarantees that a fixed point exists or that the solver finds it, so
every solve's outcome is recorded.

Initialisation (``recurrent_init``): ``"pcdeq"`` (default) draws ``W`` uniformly from
``+-sqrt(1e-4) / sqrt(n_out + n_in)``, the signed counterpart of the official pcDEQ
initialisation (same magnitude, any sign), with ``b = 0``, so both families start from
the same easy, strongly contractive cell and only training can make the unconstrained one
hard to solve. ``"torch"`` keeps PyTorch's default initialisation, whose recurrent map is
already close to non-contractive (slow solves from the first batch).

Solving goes through ``torchdeq.get_deq``: core ``"sliced"``, implicit differentiation with
``ift=True`` (the ``autograd.Function`` variant, not ``hook_ift``), relative stopping in
both directions, Anderson by default (``solver="broyden"`` or ``"fixed_point_iter"`` by
option), one ``get_deq`` instance per block, built from a fresh dict so no caller object is
mutated.

Statistics (``block.last_stats``, unit ``"iter"``):

* forward: ``iterations`` counts the block's function evaluations inside the forward
  solver (the extra differentiable step TorchDEQ appends in training is not counted);
  ``residual`` is TorchDEQ's ``info["rel_lowest"]`` per sample,
  ``||f(z) - z|| / ||f(z)||`` of the returned iterate; ``converged = residual <= tol``.
* backward: recorded from inside the backward pass. ``iterations`` counts the
  vector-Jacobian products the backward solver performed (measured by an identity
  ``autograd.Function`` inside the cell); ``residual`` is the backward solver's
  ``info["rel_lowest"]`` (relative residual of the adjoint equation ``g = J^T g + dL/dz``),
  delivered by TorchDEQ's ``backward_writer``; ``converged = residual <= backward_tol``.

Known TorchDEQ limits kept visible: solver options (``solver_options``, e.g. Anderson's
``m``) reach the forward solver only; in ``eval()`` mode TorchDEQ returns a detached state.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchdeq import get_deq

from pcdeq_plugin import (
    BlockStats,
    ConvergenceError,
    ConvergenceWarning,
    ImplicitBlock,
    ImplicitModel,
    ModelSpec,
    SolveStats,
)

__all__ = [
    "ACTIVATIONS",
    "MODEL_SPECS",
    "RECURRENT_INITS",
    "SOLVERS",
    "UnconstrainedDEQBlock",
    "UnconstrainedDEQLinear",
    "UnconstrainedDEQMultiConv",
    "UnconstrainedDEQSingleConv",
    "build_deq_linear",
    "build_deq_multi_conv",
    "build_deq_single_conv",
]

#: Ordinary activations for the unconstrained cell (no concavity or sign requirement).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "relu6": F.relu6,
    "softsign": F.softsign,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "gelu": F.gelu,
}
#: TorchDEQ solvers usable in both directions. ``simple_fixed_point_iter`` is left out: it
#: records no statistics and crashes as the backward solver under IFT.
SOLVERS: tuple[str, ...] = ("anderson", "broyden", "fixed_point_iter")
RECURRENT_INITS: tuple[str, ...] = ("pcdeq", "torch")
FAILURE_POLICIES: tuple[str, ...] = ("ignore", "warn", "raise")


def _choice(kind: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; available: {', '.join(choices)}")
    return value


class _Record:
    """Counts of one forward call and of the backward pass that follows it."""

    def __init__(self, stats: BlockStats) -> None:
        self.stats = stats
        self.calls = 0
        self.vjps = 0
        self.backward_start: float | None = None


class _CountVJP(torch.autograd.Function):
    """Identity on the state; its backward counts one vector-Jacobian product of the cell."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, record: _Record) -> torch.Tensor:
        ctx.record = record
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        record: _Record = ctx.record
        if record.backward_start is None:
            record.backward_start = time.perf_counter()
        record.vjps += 1
        return grad, None


def _pcdeq_magnitude_init(layer: nn.Module) -> None:
    """``W ~ U(-a, a)``, ``a = sqrt(1e-4) / sqrt(n_out + n_in)``; ``b = 0`` (see module docs)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(
            f"recurrent_init='pcdeq' needs a layer with a weight of >= 2 dims, got {type(layer).__name__}"
        )
    bound = math.sqrt(1e-4) / math.sqrt(weight.shape[0] + weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


class UnconstrainedDEQBlock(ImplicitBlock):
    """``z* = act(layer(z*) + u)`` solved by TorchDEQ, with implicit differentiation.

    Args:
        layer: The recurrent map ``W z + b`` (an ``nn.Linear`` or a shape-preserving
            ``nn.Conv2d``); its weight is unconstrained.
        activation: Name in :data:`ACTIVATIONS`.
        solver: Forward TorchDEQ solver (:data:`SOLVERS`).
        backward_solver: Backward solver; ``None`` reuses ``solver``.
        tol: Relative residual tolerance of the forward solve.
        max_iter: Iteration cap of the forward solve.
        backward_tol: Relative tolerance of the backward solve; ``None`` reuses ``tol``.
        backward_max_iter: Cap of the backward solve; ``None`` reuses ``max_iter``.
        solver_options: Extra keyword options of the forward solver (e.g. ``{"m": 5}``).
        on_failure: ``"ignore"``, ``"warn"`` or ``"raise"`` when a solve misses its tolerance.
        recurrent_init: ``"pcdeq"`` (re-initialise ``layer`` with the signed pcDEQ magnitude
            and a zero bias) or ``"torch"`` (leave ``layer`` as it is); see the module docs.
        name: Block name in the statistics.
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        activation: str = "tanh",
        solver: str = "anderson",
        backward_solver: str | None = None,
        tol: float = 1e-4,
        max_iter: int = 50,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        solver_options: dict[str, Any] | None = None,
        on_failure: str = "warn",
        recurrent_init: str = "pcdeq",
        name: str = "deq",
    ) -> None:
        super().__init__(name)
        self.recurrent_init = _choice("recurrent_init", recurrent_init, RECURRENT_INITS)
        self.activation_name = _choice("activation", activation, tuple(ACTIVATIONS))
        self.activation = ACTIVATIONS[activation]
        self.solver = _choice("solver", solver, SOLVERS)
        self.backward_solver = _choice("backward solver", backward_solver or solver, SOLVERS)
        self.tol = float(tol)
        self.backward_tol = float(tol if backward_tol is None else backward_tol)
        self.max_iter = max_iter
        self.backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
        for label, value in (("tol", self.tol), ("backward_tol", self.backward_tol)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{label} must be a positive finite number, got {value!r}")
        for label, value, method in (
            ("max_iter", self.max_iter, self.solver),
            ("backward_max_iter", self.backward_max_iter, self.backward_solver),
        ):
            # TorchDEQ's Anderson returns its start point unchanged below 3 iterations.
            floor = 3 if method == "anderson" else 1
            if not (isinstance(value, int) and value >= floor):
                raise ValueError(
                    f"{label} must be an integer >= {floor} for {method!r}, got {value!r}"
                )
        self.on_failure = _choice("on_failure", on_failure, FAILURE_POLICIES)
        options = dict(solver_options or {})  # never keep (or mutate) the caller's dict
        reserved = sorted({"tol", "max_iter", "stop_mode", "indexing"} & set(options))
        if reserved:
            raise ValueError(
                f"solver_options may not set {reserved}: use the block's own tol/max_iter arguments"
            )
        self.solver_options = options
        self.layer = layer
        if recurrent_init == "pcdeq":
            _pcdeq_magnitude_init(layer)
        # One TorchDEQ instance per block, from keyword arguments only (a fresh config).
        self.deq = get_deq(
            core="sliced",
            ift=True,
            hook_ift=False,
            f_solver=self.solver,
            b_solver=self.backward_solver,
            f_max_iter=self.max_iter,
            b_max_iter=self.backward_max_iter,
            f_tol=self.tol,
            b_tol=self.backward_tol,
            f_stop_mode="rel",
            b_stop_mode="rel",
        )

    def _fail(self, message: str) -> None:
        text = f"{self.block_name}: {message}"
        if self.on_failure == "raise":
            raise ConvergenceError(text)
        if self.on_failure == "warn":
            warnings.warn(text, ConvergenceWarning, stacklevel=3)

    def _backward_writer(self, record: _Record) -> Callable[[dict], None]:
        def write(info: dict) -> None:
            residual = info["rel_lowest"].detach().float()
            converged = residual <= self.backward_tol  # NaN counts as not converged
            start = (
                record.backward_start if record.backward_start is not None else time.perf_counter()
            )
            record.stats.backward = SolveStats(
                iterations=record.vjps,
                residual=residual,
                converged=converged,
                seconds=time.perf_counter() - start,
                unit="iter",
                solver=self.backward_solver,
                max_iter=self.backward_max_iter,
            )
            if not bool(converged.all()):
                self._fail(
                    f"backward solve ({self.backward_solver}) missed tol {self.backward_tol:g} on "
                    f"{int((~converged).sum())} of {converged.numel()} samples after {record.vjps} iterations"
                )
            record.vjps = 0  # a second backward through the same graph starts afresh
            record.backward_start = None

        return write

    def forward(self, injection: torch.Tensor) -> torch.Tensor:
        """Solve ``z = act(layer(z) + injection)`` from ``z = 0`` and return the fixed point."""
        stats = BlockStats(self.block_name)
        self.last_stats = stats
        record = _Record(stats)

        def cell(z: torch.Tensor) -> torch.Tensor:
            record.calls += 1
            if z.requires_grad:  # only the IFT backward differentiates w.r.t. the state
                z = _CountVJP.apply(z, record)
            return self.activation(self.layer(z) + injection)

        start = time.perf_counter()
        z_out, info = self.deq(
            cell,
            torch.zeros_like(injection),  # positional: DEQSliced names this argument z_star
            solver_kwargs=dict(self.solver_options),
            backward_writer=self._backward_writer(record),
        )
        # In training TorchDEQ appends one differentiable step z = f(z*) after the solve.
        iterations = record.calls - (1 if self.deq.training else 0)
        residual = info["rel_lowest"].detach().float()
        converged = residual <= self.tol
        stats.forward = SolveStats(
            iterations=iterations,
            residual=residual,
            converged=converged,
            seconds=time.perf_counter() - start,
            unit="iter",
            solver=self.solver,
            max_iter=self.max_iter,
        )
        if not bool(converged.all()):
            self._fail(
                f"forward solve ({self.solver}) missed tol {self.tol:g} on "
                f"{int((~converged).sum())} of {converged.numel()} samples after {iterations} "
                f"iterations (max residual {float(residual.max()):.3g})"
            )
        return z_out[-1]


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


def _check_positive_ints(label: str, values: Sequence[Any], count: int) -> tuple[int, ...]:
    values = tuple(values)
    if len(values) != count or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{label} must be {count} integer(s) >= 1, got {values!r}")
    return values


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
        (width,) = _check_positive_ints("width", (width,), 1)
        self.embed = nn.Linear(math.prod(input_shape), width)
        self.bn_in = nn.BatchNorm1d(width)
        self.deq = UnconstrainedDEQBlock(nn.Linear(width, width), name="deq", **block_options)
        self.bn_out = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        (width,) = _check_positive_ints("width", (width,), 1)
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
        c1, c2, c3 = _check_positive_ints("widths", widths, 3)
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
        z = self.deq1(self.stage1(x))
        z = self.deq2(self.stage2(z))
        z = self.deq3(self.stage3(z))
        return self.head(self.tail(z).flatten(1))


def _factory(cls: type[ImplicitModel], model: str, size_key: str) -> Callable[..., ImplicitModel]:
    valid = (size_key, *_BLOCK_KEYS)

    def build(
        input_shape: tuple[int, int, int], num_classes: int, **overrides: Any
    ) -> ImplicitModel:
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(
                f"{model}: unknown option(s) {unknown}; valid options: {', '.join(valid)}"
            )
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
