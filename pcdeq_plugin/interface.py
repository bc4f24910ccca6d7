"""The common implicit-model interface.

Everything the training harness needs from an implicit model, and nothing else:

* :class:`SolveStats` -- one record for one solve (forward or backward) of one block,
  shared by every family: fixed-point iterations for DEQs, function evaluations for ODEs.
* :class:`BlockStats` -- the latest forward and backward :class:`SolveStats` of one block.
* :class:`SolverConfig` -- the knobs of a forward/backward solve, shared by all DEQ blocks.
* :class:`ImplicitBlock` -- base class of any module that performs an implicit solve.
* :class:`ImplicitModel` -- base class of a classifier built from implicit blocks. It
  collects :class:`BlockStats` from its blocks and offers the one hook the training loop
  calls after every optimizer step (:meth:`ImplicitModel.after_optimizer_step`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pcdeq_plugin.checks import (
    check_choice,
    check_count,
    check_flag,
    check_known_keys,
    check_positive,
)

__all__ = [
    "BlockStats",
    "ConvergenceError",
    "ConvergenceWarning",
    "ImplicitBlock",
    "FixedPointResult",
    "ImplicitModel",
    "SolveStats",
    "SolverConfig",
    "split_solver_options",
]

FailurePolicy = Literal["ignore", "warn", "raise"]
FAILURE_POLICIES: tuple[str, ...] = ("ignore", "warn", "raise")

#: ``SolverConfig.warm_start`` values (see :mod:`pcdeq_plugin.warm_start`)
WARM_START_CHOICES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")
#: ``SolverConfig.adjoint`` values
ADJOINT_CHOICES: tuple[str, ...] = ("auto", "analytic", "autograd")

#: Default convergence-check period on CUDA/MPS: a check costs one host synchronisation
#: there, while a pcDEQ solve typically needs 5-20 iterations.
ACCELERATOR_CHECK_EVERY = 4


class ConvergenceWarning(RuntimeWarning):
    """A solve stopped at its iteration (or step) cap before reaching its tolerance."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when the failure policy is ``"raise"``."""


@dataclass
class SolveStats:
    """Statistics of one solve of one implicit block.

    Attributes:
        iterations: Fixed-point iterations performed (DEQs) or function evaluations (ODEs).
        residual: Final residual per sample, detached, shape ``[B]`` (where a refined
            solve's last check was certified, an upper bound on the float32 residual;
            :func:`pcdeq_plugin.warm_start.refine_iterate`).
        converged: Per-sample flag, shape ``[B]``: the sample met the tolerance.
        seconds: Wall time of the solve as seen by the host.
        unit: ``"iter"`` for fixed-point iterations, ``"nfe"`` for function evaluations.
        solver: Name of the solver that produced the record.
        max_iter: The cap the solve ran under (``0`` where it does not apply).
        warm_iterations: Of ``iterations``, those run in low precision by a warm start.
        refine_iterations: Of ``iterations``, the low-precision corrections made after the
            warm phase (``SolverConfig.warm_refine``), which replace float32 iterations.
        warm_dtype: The warm start's precision (``"bfloat16"``, ``"float16"``), or ``""``.
    """

    iterations: int
    residual: torch.Tensor
    converged: torch.Tensor
    seconds: float
    unit: Literal["iter", "nfe"] = "iter"
    solver: str = ""
    max_iter: int = 0
    warm_iterations: int = 0
    refine_iterations: int = 0
    warm_dtype: str = ""

    @property
    def batch_size(self) -> int:
        return int(self.converged.numel())

    @property
    def num_failed(self) -> int:
        """Number of samples that did not converge (synchronises with the device)."""
        if self.converged.device.type == "cpu" and not self.converged.requires_grad:
            return int(self.converged.numel() - self.converged.numpy().astype(bool).sum())
        return int((~self.converged.bool()).sum().item())

    @property
    def all_converged(self) -> bool:
        return self.num_failed == 0

    @property
    def max_residual(self) -> float:
        if self.residual.numel() == 0:
            return 0.0
        value = float(self.residual.detach().max().item())
        return value if math.isfinite(value) else float("inf")

    def summary(self) -> dict[str, float | int | str]:
        """Plain-Python summary, safe to JSON-serialise."""
        return {
            "iterations": int(self.iterations),
            "unit": self.unit,
            "solver": self.solver,
            "max_iter": int(self.max_iter),
            "warm_iterations": int(self.warm_iterations),
            "refine_iterations": int(self.refine_iterations),
            "max_residual": self.max_residual,
            "failed": self.num_failed,
            "batch": self.batch_size,
            "seconds": float(self.seconds),
        }


@dataclass
class FixedPointResult:
    """What every fixed-point solver returns: the solution and its statistics."""

    value: torch.Tensor
    stats: SolveStats


@dataclass
class BlockStats:
    """The latest forward and backward statistics of one implicit block."""

    block: str
    forward: SolveStats | None = None
    backward: SolveStats | None = None

    def summary(self) -> dict[str, object]:
        return {
            "block": self.block,
            "forward": None if self.forward is None else self.forward.summary(),
            "backward": None if self.backward is None else self.backward.summary(),
        }


@dataclass(frozen=True)
class SolverConfig:
    """How a DEQ block solves its forward fixed point and its backward (adjoint) problem.

    Attributes:
        solver: Registered name of the forward solver (see ``pcdeq_plugin.list_solvers()``).
        tol: Per-sample relative residual tolerance of the forward solve.
        max_iter: Iteration cap of the forward solve.
        backward_solver: Registered name of the backward solver; ``None`` reuses ``solver``.
        backward_tol: Tolerance of the backward solve; ``None`` reuses ``tol``.
        backward_max_iter: Iteration cap of the backward solve; ``None`` reuses ``max_iter``.
        check_every: Test convergence only every this many iterations. ``None``
            (default): solvers that can (plain iteration) predict the checks from the
            observed geometric rate (:mod:`pcdeq_plugin.iteration`); others check every
            iteration on the CPU and every :data:`ACCELERATOR_CHECK_EVERY` on CUDA/MPS,
            where a check costs a host synchronisation.
        on_failure: What a solve that hits its cap does: ``"ignore"`` (only recorded),
            ``"warn"`` (recorded and a :class:`ConvergenceWarning`), ``"raise"``
            (:class:`ConvergenceError`).
        solver_options: Extra keyword options for the solver (e.g. Anderson memory).
        warm_start: Mixed-precision warm start of forward and backward solves
            (:mod:`pcdeq_plugin.warm_start`): ``"auto"`` (bfloat16 for large float32
            states of pcDEQ maps on hardware with fast bfloat16, off elsewhere), ``"off"``,
            ``"bf16"`` or ``"fp16"`` (forced). Final residuals, flags and the failure
            policy always come from the full-precision phase (or from a certified upper
            bound on its residual, see ``warm_refine``).
        warm_tol: Residual at which the warm phase hands over to full precision (it also
            stops at the low precision's floor).
        warm_refine: After the warm phase, a map that offers it (pcDEQ cells) takes one
            full-precision evaluation and iterates low-precision corrections around it
            until the next full-precision evaluation should meet ``tol``
            (:func:`pcdeq_plugin.warm_start.refine_iterate`); where the corrections carry
            a rigorous error bound (tanh and sigmoid cells, bfloat16 on the CPU), that
            last check is itself a correction whose residual bound must meet ``tol``.
            ``False`` hands the warm state straight to the full-precision solve.
        adjoint: Where ``J^T y`` comes from: ``"auto"`` (the map's analytic adjoint where it
            has one, as pcDEQ cells do, else autograd), ``"analytic"`` or ``"autograd"``.
        reuse_step_graph: The autograd adjoint differentiates the graph of the one
            differentiable step (one evaluation per training step); ``False`` rebuilds
            that graph inside the backward hook (the paper's two evaluations).
    """

    solver: str = "fixed_point"
    tol: float = 1e-4
    max_iter: int = 200
    backward_solver: str | None = None
    backward_tol: float | None = None
    backward_max_iter: int | None = None
    check_every: int | None = None
    on_failure: FailurePolicy = "warn"
    solver_options: dict = field(default_factory=dict)
    warm_start: str = "auto"
    warm_tol: float = 4e-3
    warm_refine: bool = True
    adjoint: str = "auto"
    reuse_step_graph: bool = True

    def __post_init__(self) -> None:
        _check_name("solver", self.solver)
        if self.backward_solver is not None:
            _check_name("backward_solver", self.backward_solver)
        check_positive("tol", self.tol)
        check_count("max_iter", self.max_iter)
        # None means "same as the forward solve" / "per device": set-but-bad reads as below.
        if self.backward_tol is not None:
            check_positive("backward_tol", self.backward_tol)
        if self.backward_max_iter is not None:
            check_count("backward_max_iter", self.backward_max_iter)
        if self.check_every is not None:
            check_count("check_every", self.check_every)
        check_choice("on_failure", self.on_failure, FAILURE_POLICIES)
        check_choice("warm_start", self.warm_start, WARM_START_CHOICES)
        check_positive("warm_tol", self.warm_tol)
        check_flag("warm_refine", self.warm_refine)
        check_choice("adjoint", self.adjoint, ADJOINT_CHOICES)
        check_flag("reuse_step_graph", self.reuse_step_graph)
        if not isinstance(self.solver_options, Mapping) or not all(
            isinstance(key, str) for key in self.solver_options
        ):
            raise TypeError(
                "solver_options must be a dict of keyword options for the solver (e.g. "
                f"{{'memory': 5}} for 'anderson'), got {self.solver_options!r}"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the fields, in order (the keyword options a model forwards here)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def effective_backward_solver(self) -> str:
        return self.backward_solver or self.solver

    @property
    def effective_backward_tol(self) -> float:
        return self.backward_tol if self.backward_tol is not None else self.tol

    @property
    def effective_backward_max_iter(self) -> int:
        return self.backward_max_iter if self.backward_max_iter is not None else self.max_iter

    def effective_check_every(self, device: torch.device | str) -> int:
        """``check_every`` for a solve on ``device`` (resolves the ``None`` default)."""
        if self.check_every is not None:
            return self.check_every
        return 1 if torch.device(device).type == "cpu" else ACCELERATOR_CHECK_EVERY

    def replace(self, **changes: object) -> SolverConfig:
        """A copy with some fields changed (validated again)."""
        check_known_keys(changes, self.field_names(), noun="SolverConfig field")
        return dataclasses.replace(self, **changes)


def _check_name(field_name: str, value: object) -> None:
    if not (isinstance(value, str) and value):
        raise TypeError(
            f"{field_name} must be the name of a registered solver (a string, see "
            f"pcdeq_plugin.list_solvers()), got {value!r}"
        )


def split_solver_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into :class:`SolverConfig` fields and the rest.

    Model factories take solver settings and their own options as one flat ``**overrides``;
    this separates them so that ``SolverConfig(**solver_part)`` gets exactly its fields.

    Returns:
        ``(solver_part, rest)``: two new dicts; ``solver_part`` holds the keys of
        :meth:`SolverConfig.field_names`, ``rest`` everything else (for the caller to check).
    """
    fields = set(SolverConfig.field_names())
    solver_part = {k: v for k, v in options.items() if k in fields}
    rest = {k: v for k, v in options.items() if k not in fields}
    return solver_part, rest


class ImplicitBlock(nn.Module):
    """Base class of a module that performs an implicit solve (a DEQ block, an ODE block).

    Subclasses write their latest statistics into ``self.last_stats`` (forward during the
    forward pass, backward during ``loss.backward()``), and may override
    :meth:`after_optimizer_step` (pcDEQ projects its recurrent weights there).
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.block_name = name or type(self).__name__
        self.last_stats = BlockStats(self.block_name)

    def reset_stats(self) -> None:
        self.last_stats = BlockStats(self.block_name)

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step. Default: nothing."""


class ImplicitModel(nn.Module):
    """Base class of an implicit-model classifier.

    The harness relies only on this surface: ``forward(x) -> logits``,
    :meth:`solver_stats`, :meth:`after_optimizer_step` and the ``family`` attribute.
    """

    #: Family name shown in reports (``"pcdeq"``, ``"mondeq"``, ``"node"``, ...).
    family: str = "implicit"

    def implicit_blocks(self) -> list[ImplicitBlock]:
        """The implicit blocks of this model, in module order."""
        return [m for m in self.modules() if isinstance(m, ImplicitBlock)]

    def solver_stats(self) -> list[BlockStats]:
        """Latest per-block statistics (forward after ``forward``, backward after ``backward``)."""
        return [block.last_stats for block in self.implicit_blocks()]

    def reset_stats(self) -> None:
        for block in self.implicit_blocks():
            block.reset_stats()

    def after_optimizer_step(self) -> None:
        """The one hook the training loop calls after every optimizer step."""
        for block in self.implicit_blocks():
            block.after_optimizer_step()
