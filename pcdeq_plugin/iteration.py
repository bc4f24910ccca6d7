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
  tolerance at the observed rate), then every iteration until it does. Checks are thus
  skipped only where they could not have stopped the loop at the observed rate, which
  saves most checks of a small map and most synchronisations on a GPU. The convergence
  test itself is the same at every check.
* A sample is *done* once its residual is below ``tol`` or becomes non-finite (NaN/Inf).
  Done samples keep the value they had at that check (so batching never changes a
  sample's answer); a NaN residual never counts as converged. The loop stops when every
  sample is done.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .interface import FixedPointResult, SolveStats

__all__ = ["IterativeSolver", "RESIDUAL_EPS", "per_sample_residual", "residual_norms"]

#: Added to the denominator of the relative residual so that a zero image does not divide by 0.
RESIDUAL_EPS = 1e-8

MapFn = Callable[[torch.Tensor], torch.Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Devices whose tensors the host reads without a synchronisation: their checks run in
#: NumPy. Every other device keeps its masks on the device (the tests also run that path
#: on the CPU by emptying this tuple).
HOST_CHECK_DEVICES: tuple[str, ...] = ("cpu",)


def residual_norms(fz: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``||f(z) - z||`` and ``||f(z)||`` (float32 for half-precision states).

    Reduces over every non-batch dimension in place, so a channels-last state is not copied.
    A half-precision state is reduced in its own dtype (torch accumulates in float32) and
    only the ``[B]`` results are cast: casting the state first would copy it twice.
    """
    if fz.shape != z.shape:
        raise ValueError(
            f"the map changed the state's shape: got {tuple(fz.shape)} from {tuple(z.shape)}"
        )
    if z.dim() == 0:
        raise ValueError("the state must have a batch dimension, got a 0-d tensor")
    out = torch.float32 if z.dtype in _LOW_PRECISION else z.dtype
    if z.dim() == 1:  # one scalar per sample
        return (fz - z).abs().to(out), fz.abs().to(out)
    dims = tuple(range(1, z.dim()))
    diff = torch.linalg.vector_norm(fz - z, dim=dims)
    image = torch.linalg.vector_norm(fz, dim=dims)
    return diff.to(out), image.to(out)


#: Below this many elements the per-sample norms are taken in one reduction over the
#: stacked ``[f(z) - z, f(z)]`` (fewer operations; the copy is negligible).
_STACK_BELOW = 1 << 16


def _stacked_norms(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``[||f(z) - z||, ||f(z)||]`` per sample as one ``[2, B]`` tensor, without a graph."""
    if fz.requires_grad or z.requires_grad:
        fz, z = fz.detach(), z.detach()
    if z.dim() > 1 and z.numel() < _STACK_BELOW and fz.shape == z.shape:
        dims = tuple(range(2, z.dim() + 1))
        norms = torch.linalg.vector_norm(torch.stack((fz - z, fz)), dim=dims)
        return norms.float() if z.dtype in _LOW_PRECISION else norms
    return torch.stack(residual_norms(fz, z))


def per_sample_residual(
    fz: torch.Tensor, z: torch.Tensor, eps: float = RESIDUAL_EPS
) -> torch.Tensor:
    """Relative residual of each sample: ``||f(z) - z|| / (||f(z)|| + eps)``.

    Args:
        fz: The map's output ``f(z)``, shape ``[B, ...]``.
        z: The iterate, same shape.
        eps: Added to the denominator.

    Returns:
        A ``[B]`` tensor (NaN or Inf where the sample holds non-finite values).
    """
    diff, image = residual_norms(fz, z)
    return diff / (image + eps)


def _check_call_args(z0: torch.Tensor, tol: float, max_iter: int, check_every: int | None) -> None:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must have a non-empty batch dimension, got shape {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    tol_is_number = isinstance(tol, (int, float)) and not isinstance(tol, bool)
    if not (tol_is_number and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if isinstance(max_iter, bool) or not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if check_every is not None and (
        isinstance(check_every, bool) or not (isinstance(check_every, int) and check_every >= 1)
    ):
        raise ValueError(
            f"check_every must be an integer >= 1 or None (predicted), got {check_every!r}"
        )


def _batch_where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where the per-sample ``mask`` holds, else ``b`` (mask broadcast over non-batch dims)."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _any_nonzero(z: torch.Tensor) -> bool:
    if z.device.type == "cpu" and z.dtype not in _LOW_PRECISION:
        return bool(z.detach().numpy().any())  # no torch dispatch for a start test
    return bool(z.any())


class _CheckSchedule:
    """Which iterations test convergence: every ``k``-th, or predicted from the rate.

    The prediction places the next check where the worst open sample meets ``tol`` at the
    rate observed between the last two checks. It rounds down (check early, never iterate
    past the prediction) where a check is cheaper than an evaluation of the map, as for
    large states on the CPU; it rounds up (risk one extra evaluation to save a check)
    where a check costs more: small states, whose cost is per-operation overhead, and
    accelerators, where a check is a host synchronisation. The choice depends only on the
    state's size and device, never on timings, so a solve is reproducible.
    """

    def __init__(
        self, check_every: int | None, tol: float, max_iter: int, zero_start: bool
    ) -> None:
        self.every = check_every
        self.tol = tol
        self.max_iter = max_iter
        # From z0 = 0 the first residual is ||f(0)|| / ||f(0)|| = 1: a free first point
        # of the rate estimate, so the first real check can wait one iteration longer.
        self.last: tuple[int, float] | None = (1, 1.0) if zero_start else None
        if check_every is not None:
            self.next = check_every
        else:
            self.next = 3 if zero_start else 2

    def due(self, k: int) -> bool:
        return k >= self.next or k == self.max_iter

    def observe(self, k: int, worst: float, round_up: bool) -> None:
        """Record the worst open residual at check ``k`` and place the next check."""
        if self.every is not None:
            self.next = k + self.every
            return
        previous, self.last = self.last, (k, worst)
        step = 1
        if previous is not None:
            j, r_j = previous
            # j == k: the zero-start prior at iteration 1 and a check there (max_iter = 1)
            if k > j and 0 < worst < r_j and math.isfinite(r_j):
                rate = (worst / r_j) ** (1.0 / (k - j))
                needed = math.log(self.tol / worst) / math.log(rate)
                if math.isfinite(needed):
                    step = max(1, math.ceil(needed) if round_up else math.floor(needed))
        self.next = k + step


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

        Returns:
            :class:`FixedPointResult` with the per-sample solution (each sample's image
            ``fn(z)`` at the check where it finished, or at the cap) and its statistics.
        """
        _check_call_args(z0, tol, max_iter, check_every)
        if check_every is None and not self.predicts_checks:
            check_every = 1
        start = time.perf_counter()
        on_host = z0.device.type in HOST_CHECK_DEVICES
        loop = _HostChecks(z0, tol) if on_host else _DeviceChecks(z0, tol)
        zero_start = check_every is None and not _any_nonzero(z0)
        schedule = _CheckSchedule(check_every, tol, max_iter, zero_start)
        z = z0.detach()
        state = self.init(z)
        iterations = 0
        # deterministic (never timed, so answers never depend on the machine's load): a
        # check costs more than an evaluation of a small map, or a synchronisation
        round_up = not on_host or z0.numel() < _STACK_BELOW
        for k in range(1, max_iter + 1):
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


class _HostChecks:
    """Per-sample bookkeeping in NumPy (CPU tensors: reading them costs no synchronisation)."""

    def __init__(self, z0: torch.Tensor, tol: float) -> None:
        self.tol = tol
        self.batch = z0.shape[0]
        self.float_dtype = np.float64 if z0.dtype == torch.float64 else np.float32
        self.value: torch.Tensor | None = None  # set once some samples are done
        self.current: np.ndarray | None = None
        self.done = self.converged = self.final = None  # per-sample arrays, made lazily

    def residual(self, fz: torch.Tensor, z: torch.Tensor, check: bool) -> torch.Tensor:
        if not check:  # a solver that needs the residual on every step: stay in torch
            diff, image = _stacked_norms(fz, z)
            return diff / (image + RESIDUAL_EPS)
        diff, image = _stacked_norms(fz, z).numpy()  # one read
        if np.isfinite(image).all():  # no inf/inf or overflow: NumPy has nothing to warn of
            self.current = diff / (image + RESIDUAL_EPS)
        else:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                self.current = diff / (image + RESIDUAL_EPS)
        return torch.from_numpy(self.current)

    def check(self, fz: torch.Tensor) -> tuple[bool, float]:
        residual = self.current
        assert residual is not None
        if self.value is None:  # nothing finished at an earlier check: the common cases
            worst = residual.max()  # NaN if any sample is NaN
            if worst < self.tol:  # every sample at once
                self.value, self.final = fz, residual
                self.converged = self.done = np.ones(self.batch, dtype=bool)
                return True, 0.0
            if residual.min() >= self.tol and worst < math.inf:  # none yet
                return False, float(worst)
            self.done = np.zeros(self.batch, dtype=bool)
            self.converged = np.zeros(self.batch, dtype=bool)
            self.final = np.full(self.batch, math.inf, dtype=self.float_dtype)
        ok = residual < self.tol  # False for NaN
        finished = ok | ~np.isfinite(residual)
        still_open = ~self.done
        if self.value is None or still_open.all():
            self.value = fz
        else:
            self.value = _batch_where(torch.from_numpy(still_open), fz, self.value)
        self.final = np.where(still_open, residual, self.final)
        self.converged = self.converged | (still_open & ok)
        self.done = self.done | finished
        if self.done.all():
            return True, 0.0
        return False, float(residual[~self.done].max())

    def result(self, fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.value is None:  # the cap, with nothing finished: the last check's figures
            residual = self.current
            if residual is None:  # no check ran (max_iter reached before the first)
                residual = np.full(self.batch, math.inf, dtype=self.float_dtype)
            ok = residual < self.tol
            return fz, torch.from_numpy(residual), torch.from_numpy(ok)
        return self.value, torch.from_numpy(self.final), torch.from_numpy(self.converged)


class _DeviceChecks:
    """Per-sample bookkeeping on the device; one host synchronisation per check."""

    def __init__(self, z0: torch.Tensor, tol: float) -> None:
        self.tol = tol
        batch, device = z0.shape[0], z0.device
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.converged = torch.zeros_like(self.done)
        dtype = torch.float32 if z0.dtype in _LOW_PRECISION else z0.dtype
        self.final = torch.full((batch,), math.inf, dtype=dtype, device=device)
        self.value: torch.Tensor | None = None
        self.current: torch.Tensor | None = None
        self.any_done = False

    def residual(self, fz: torch.Tensor, z: torch.Tensor, check: bool) -> torch.Tensor:
        diff, image = _stacked_norms(fz, z)
        self.current = diff / (image + RESIDUAL_EPS)
        return self.current

    def check(self, fz: torch.Tensor) -> tuple[bool, float]:
        residual = self.current
        assert residual is not None
        ok = residual < self.tol
        finished = ok | ~torch.isfinite(residual)
        if not self.any_done:
            self.value, self.final, self.converged, self.done = fz, residual, ok, finished
        else:
            still_open = ~self.done
            self.value = _batch_where(still_open, fz, self.value)
            self.final = torch.where(still_open, residual, self.final)
            self.converged = self.converged | (still_open & ok)
            self.done = self.done | finished
        open_worst = torch.where(self.done, torch.zeros_like(residual), residual).amax()
        summary = torch.stack((self.done.sum().to(open_worst.dtype), open_worst))
        num_done, worst = summary.tolist()  # the one host synchronisation per check
        self.any_done = num_done > 0
        return int(num_done) == self.done.numel(), float(worst)

    def result(self, fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        value = fz if self.value is None else self.value
        return value, self.final.detach(), self.converged
