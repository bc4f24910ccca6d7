"""Convergence checks of the solver loop: when they happen, and their per-sample bookkeeping.

* :class:`CheckSchedule` -- every ``k``-th iteration, or predicted from the observed rate.
* :class:`HostChecks` -- the per-sample tests in NumPy, for devices the host reads without
  a synchronisation (the CPU).
* :class:`DeviceChecks` -- the same tests as device masks, one synchronisation per check.

A sample is *done* once its residual is below ``tol`` or non-finite; done samples keep
the value they had at that check, and a NaN residual never counts as converged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .residuals import LOW_PRECISION, RESIDUAL_EPS, batch_where, stacked_norms, work_buffer

__all__ = ["HOST_CHECK_DEVICES", "CheckSchedule", "DeviceChecks", "HostChecks"]

#: Devices whose tensors the host reads without a synchronisation: their checks run in
#: NumPy. Every other device keeps its masks on the device (the tests also run that path
#: on the CPU by emptying this tuple).
HOST_CHECK_DEVICES: tuple[str, ...] = ("cpu",)

#: An early check (at the floor of the predicted iterations) is placed only where it
#: could pass with a residual at most this many times below the observed rate's
#: prediction; where it would need more, the rate would have to improve far beyond what
#: was observed, and the check would almost surely be wasted.
EARLY_CHECK_GAIN = 2.0


class CheckSchedule:
    """Which iterations test convergence: every ``k``-th, or predicted from the rate.

    The prediction places the next check where the worst open sample meets ``tol`` at the
    rate observed between the last two checks. It rounds down (check early, never iterate
    past the prediction) where a check is cheaper than an evaluation of the map, as for
    large states on the CPU, unless the early check could pass only with a residual more
    than :data:`EARLY_CHECK_GAIN` times below the prediction (a fast rate ``q`` and a
    prediction ``n + f``, ``0 < f < 1``, iterations away: ``(1/q)^f > 2``; for ``q = 0.07``
    and ``f = 0.45``, 3.3 times); it rounds up (risk one extra evaluation to save a check)
    where a check costs more: small states, whose cost is per-operation overhead, and
    accelerators, where a check is a host synchronisation. The choice depends only on the
    state's size and device and on the observed residuals, never on timings, so a solve
    is reproducible. A skip is at most half the iterations done so far (at least two),
    so a rate measured too early costs at most a few extra iterations.
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
                    early = math.floor(needed)
                    # rate ** (early - needed): how far below the prediction the residual
                    # must fall for a check at the floor to pass
                    if round_up or rate ** (early - needed) > EARLY_CHECK_GAIN:
                        early = math.ceil(needed)
                    step = max(1, early)
        # Before the iteration reaches its geometric regime (a state still growing from
        # zero keeps its relative residual near 1) a rate can predict far too long a
        # skip: never skip more than half the iterations done so far (or two, which
        # risks one extra iteration at most: the skip of a check that could not pass).
        self.next = k + min(step, max(2, k // 2))


class HostChecks:
    """Per-sample bookkeeping in NumPy (CPU tensors: reading them costs no synchronisation)."""

    def __init__(self, z0: torch.Tensor, tol: float) -> None:
        self.tol = tol
        self.batch = z0.shape[0]
        self.float_dtype = np.float64 if z0.dtype == torch.float64 else np.float32
        self.value: torch.Tensor | None = None  # set once some samples are done
        self.current: np.ndarray | None = None
        self.done = self.converged = self.final = None  # per-sample arrays, made lazily
        self.work = work_buffer(z0)  # f(z) - z of every check, in one buffer

    def residual(self, fz: torch.Tensor, z: torch.Tensor, check: bool) -> torch.Tensor:
        if not check:  # a solver that needs the residual on every step: stay in torch
            diff, image = stacked_norms(fz, z, self.work)
            return diff / (image + RESIDUAL_EPS)
        diff, image = stacked_norms(fz, z, self.work).numpy()  # one read
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
            self.value = batch_where(torch.from_numpy(still_open), fz, self.value)
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


class DeviceChecks:
    """Per-sample bookkeeping on the device; one host synchronisation per check."""

    def __init__(self, z0: torch.Tensor, tol: float) -> None:
        self.tol = tol
        batch, device = z0.shape[0], z0.device
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.converged = torch.zeros_like(self.done)
        dtype = torch.float32 if z0.dtype in LOW_PRECISION else z0.dtype
        self.final = torch.full((batch,), math.inf, dtype=dtype, device=device)
        self.value: torch.Tensor | None = None
        self.current: torch.Tensor | None = None
        self.any_done = False
        self.work = work_buffer(z0)  # f(z) - z of every check, in one buffer

    def residual(self, fz: torch.Tensor, z: torch.Tensor, check: bool) -> torch.Tensor:
        diff, image = stacked_norms(fz, z, self.work)
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
            self.value = batch_where(still_open, fz, self.value)
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
