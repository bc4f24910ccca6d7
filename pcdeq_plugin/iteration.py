"""The generic fixed-point loop every built-in solver runs: residuals, checks, their schedule.

A solver is a small object with ``init`` and ``step`` (see :class:`IterativeSolver`); this
module holds the loop that drives it, tests convergence per sample and writes the
statistics. It is written for maps that cost microseconds as well as for large ones:

* The residual is **per sample**: ``||f(z) - z|| / (||f(z)|| + 1e-8)`` over all non-batch
  dimensions, computed with two reductions and no copy (channels-last states included).
* On the CPU the per-sample bookkeeping of a check (tolerance test, non-finite test, the
  stop decision) runs in NumPy on the two ``[B]`` norm vectors: a handful of microseconds,
  where the same logic as torch operations costs more than a small map itself. On CUDA/MPS
  the masks stay on the device and a check costs exactly one host synchronisation.
* **When to check.** ``check_every=k`` tests every ``k`` iterations (and at the cap).
  ``check_every=None`` lets the loop predict: plain iteration of a pcDEQ map (and of its
  adjoint) converges geometrically, so after two checks the worst open sample's rate
  ``q`` gives the iterations still needed, ``log(tol / r) / log(q)``; the next check is
  placed at the floor of that prediction (never later than the sample could meet the
  tolerance at the observed rate; at its ceiling where a check costs more than an
  evaluation, or where the floor could pass only if the residual fell more than twice
  below the prediction), then every iteration until it does. Checks are thus
  skipped only where they could not have stopped the loop at the observed rate, which
  saves most checks of a small map and most synchronisations on a GPU. The convergence
  test itself is the same at every check.
* A sample is *done* once its residual is below ``tol`` or becomes non-finite (NaN/Inf).
  Done samples keep the value they had at that check (so batching never changes a
  sample's answer); a NaN residual never counts as converged. The loop stops when every
  sample is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from . import convergence_checks
from .checks import check_count, check_positive
from .convergence_checks import CheckSchedule, DeviceChecks, HostChecks
from .interface import FixedPointResult, SolveStats
from .residuals import (
    LOW_PRECISION,
    RESIDUAL_EPS,
    STACK_BELOW,
    per_sample_residual,
    residual_norms,
)

__all__ = ["IterativeSolver", "RESIDUAL_EPS", "per_sample_residual", "residual_norms"]

MapFn = Callable[[torch.Tensor], torch.Tensor]


def _check_call_args(z0: torch.Tensor, tol: float, max_iter: int, check_every: int | None) -> None:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must have a non-empty batch dimension, got shape {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    check_positive("tol", tol)
    check_count("max_iter", max_iter)
    check_count("check_every", check_every, allow_none=True)


def _any_nonzero(z: torch.Tensor) -> bool:
    if z.device.type == "cpu" and z.dtype not in LOW_PRECISION:
        values = z.detach().numpy()
        # a warm or f(0) start is nonzero at its first element: no pass over a large state
        return bool(values.flat[0] != 0) or bool(values.any())
    return bool(z.any())


class IterativeSolver:
    """Base class: the generic fixed-point loop; subclasses define ``init`` and ``step``.

    Protocol:
        ``init(z0) -> state``: state carried between steps.
        ``step(state, z, fz, residual) -> (z_next, state)``: the next iterate from the
        current one and its image. ``residual`` is the per-sample residual of ``z`` when
        :attr:`needs_residual` is true or on a check step, else ``None``.
    """

    #: Registry name, written into :class:`SolveStats`.
    name: str = "iterative"
    #: Whether :meth:`step` needs the residual on every step (not only on check steps).
    needs_residual: bool = False
    #: Whether ``check_every=None`` (a check schedule predicted from the observed rate)
    #: pays for this solver; a solver that computes the residual every step anyway checks
    #: every step on the CPU instead.
    predicts_checks: bool = False
    #: Whether a solve from zero may start at ``f(0)`` (``from_image_of_zero=True``): true
    #: for plain iteration, whose second iterate is ``f(f(0))`` either way.
    starts_from_image_of_zero: bool = False

    def init(self, z0: torch.Tensor) -> Any:
        return None

    def step(
        self, state: Any, z: torch.Tensor, fz: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def __call__(
        self,
        fn: MapFn,
        z0: torch.Tensor,
        *,
        tol: float,
        max_iter: int,
        check_every: int | None = 1,
        from_image_of_zero: bool = False,
    ) -> FixedPointResult:
        """Iterate towards ``z = fn(z)`` from ``z0``.

        Args:
            fn: The map, ``[B, ...] -> [B, ...]``.
            z0: Starting point (pcDEQ starts from zeros).
            tol: Per-sample relative residual tolerance.
            max_iter: Iteration cap (number of evaluations of ``fn``).
            check_every: Test convergence every this many iterations (and at the cap);
                ``None`` predicts the checks from the observed geometric rate (see the
                module docstring).
            from_image_of_zero: ``z0`` is ``f(0)`` of a solve from zero (only for solvers
                with :attr:`starts_from_image_of_zero`): iteration 1 is done and counted,
                and the checks fall where they would from zero.

        Returns:
            :class:`FixedPointResult` with the per-sample solution (each sample's image
            ``fn(z)`` at the check where it finished, or at the cap) and its statistics.
        """
        _check_call_args(z0, tol, max_iter, check_every)
        if from_image_of_zero and not (self.starts_from_image_of_zero and max_iter > 1):
            raise ValueError(
                f"{self.name}: from_image_of_zero needs a solver that starts from f(0) and "
                f"max_iter >= 2 (got max_iter={max_iter})"
            )
        if check_every is None and not self.predicts_checks:
            check_every = 1
        start = time.perf_counter()
        on_host = z0.device.type in convergence_checks.HOST_CHECK_DEVICES
        loop = HostChecks(z0, tol) if on_host else DeviceChecks(z0, tol)
        zero_start = from_image_of_zero or (check_every is None and not _any_nonzero(z0))
        schedule = CheckSchedule(check_every, tol, max_iter, zero_start)
        z = z0.detach()
        state = self.init(z)
        first = 2 if from_image_of_zero else 1  # iteration 1 from zero gave z0 = f(0)
        iterations = first - 1
        # deterministic (never timed, so answers never depend on the machine's load): a
        # check costs more than an evaluation of a small map, or a synchronisation
        round_up = not on_host or z0.numel() < STACK_BELOW
        for k in range(first, max_iter + 1):
            fz = fn(z)
            if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
                got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
                raise ValueError(
                    f"{self.name}: the map must return a tensor shaped like its input "
                    f"{tuple(z.shape)}, got {got}"
                )
            iterations = k
            check = schedule.due(k)
            residual = None
            if check or self.needs_residual:
                residual = loop.residual(fz, z, check)
            if check:
                all_done, worst = loop.check(fz)
                if all_done:
                    break
                schedule.observe(k, worst, round_up)
            if k < max_iter:
                z, state = self.step(state, z, fz, residual)
        value, final_residual, converged = loop.result(fz)
        stats = SolveStats(
            iterations=iterations,
            residual=final_residual,
            converged=converged,
            seconds=time.perf_counter() - start,
            unit="iter",
            solver=self.name,
            max_iter=max_iter,
        )
        return FixedPointResult(value=value, stats=stats)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
