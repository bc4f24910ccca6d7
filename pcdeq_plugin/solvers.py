"""Forward (and adjoint) fixed-point solvers: plain Picard iteration and safeguarded Anderson.

Every solver shares one call signature (see :class:`~pcdeq_plugin.registry.FixedPointSolver`)::

    solver(fn, z0, *, tol, max_iter, check_every=1) -> FixedPointResult(value, stats)

In the optimistix spirit a solver is a small object with a fixed protocol -- ``init`` its
state, take one ``step`` from an iterate and its image -- and one generic loop
(:meth:`IterativeSolver.__call__`) drives it, tests convergence and writes the statistics.

Design points:

* The residual is **per sample**: ``||f(z) - z|| / (||f(z)|| + 1e-8)`` over all non-batch
  dimensions (the official pcDEQ code uses one residual for the whole batch, so one slow
  sample can hide behind the others).
* Convergence is tested only every ``check_every`` iterations (and at the cap); the
  per-sample mask stays on the device, so the host synchronises once per check, not once
  per step.
* A sample is *done* once its residual is below ``tol`` or becomes non-finite (NaN/Inf in
  the state or the map's output). Done samples keep the value they had at that check; a
  NaN residual never counts as converged. The loop stops when every sample is done.
* Solvers never raise on non-convergence: the statistics say so, and the caller applies
  its failure policy (:func:`pcdeq_plugin.implicit.enforce_failure_policy`).
* Solvers do not change the grad mode: :func:`pcdeq_plugin.implicit.solve_implicit` calls
  them under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .hookspecs import hookimpl
from .interface import FixedPointResult, SolveStats
from .registry import SolverSpec

__all__ = [
    "AndersonAcceleration",
    "FixedPointIteration",
    "IterativeSolver",
    "RESIDUAL_EPS",
    "make_anderson",
    "make_fixed_point",
    "pcdeq_register_solvers",
    "per_sample_residual",
]

#: Added to the denominator of the relative residual so that a zero image does not divide by 0.
RESIDUAL_EPS = 1e-8

MapFn = Callable[[torch.Tensor], torch.Tensor]


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
    if fz.shape != z.shape:
        raise ValueError(
            f"the map changed the state's shape: got {tuple(fz.shape)} from {tuple(z.shape)}"
        )
    if z.dim() == 0:
        raise ValueError("the state must have a batch dimension, got a 0-d tensor")
    diff = (fz - z).flatten(1).norm(dim=1)
    return diff / (fz.flatten(1).norm(dim=1) + eps)


def _check_call_args(z0: torch.Tensor, tol: float, max_iter: int, check_every: int) -> None:
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
    if isinstance(check_every, bool) or not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")


def _batch_where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where the per-sample ``mask`` holds, else ``b`` (mask broadcast over non-batch dims)."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


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
        check_every: int = 1,
    ) -> FixedPointResult:
        """Iterate towards ``z = fn(z)`` from ``z0``.

        Args:
            fn: The map, ``[B, ...] -> [B, ...]``.
            z0: Starting point (pcDEQ starts from zeros).
            tol: Per-sample relative residual tolerance.
            max_iter: Iteration cap (number of evaluations of ``fn``).
            check_every: Test convergence every this many iterations (and at the cap).

        Returns:
            :class:`FixedPointResult` with the per-sample solution (each sample's image
            ``fn(z)`` at the check where it finished, or at the cap) and its statistics.
        """
        _check_call_args(z0, tol, max_iter, check_every)
        start = time.perf_counter()
        batch = z0.shape[0]
        z = z0.detach()
        state = self.init(z)
        done = torch.zeros(batch, dtype=torch.bool, device=z.device)
        converged = torch.zeros_like(done)
        final_residual = torch.full((batch,), math.inf, dtype=z.dtype, device=z.device)
        value = z
        any_done = False
        iterations = 0
        for k in range(1, max_iter + 1):
            fz = fn(z)
            if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
                got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
                raise ValueError(
                    f"{self.name}: the map must return a tensor shaped like its input "
                    f"{tuple(z.shape)}, got {got}"
                )
            iterations = k
            check = k % check_every == 0 or k == max_iter
            residual = per_sample_residual(fz, z) if (check or self.needs_residual) else None
            if check:
                assert residual is not None
                ok = residual < tol  # False for NaN
                finished = ok | ~torch.isfinite(residual)
                if not any_done:  # common case: nothing to keep from earlier checks
                    value, final_residual, converged, done = fz, residual, ok, finished
                else:
                    # Samples finishing now (or still running) take this check's image and
                    # residual; samples finished earlier keep theirs.
                    still_open = ~done
                    value = _batch_where(still_open, fz, value)
                    final_residual = torch.where(still_open, residual, final_residual)
                    converged = converged | (still_open & ok)
                    done = done | finished
                num_done = int(done.sum().item())  # the one host synchronisation per check
                if num_done == batch:
                    break
                any_done = num_done > 0
            if k < max_iter:
                z, state = self.step(state, z, fz, residual)
        stats = SolveStats(
            iterations=iterations,
            residual=final_residual.detach(),
            converged=converged,
            seconds=time.perf_counter() - start,
            unit="iter",
            solver=self.name,
            max_iter=max_iter,
        )
        return FixedPointResult(value=value, stats=stats)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedPointIteration(IterativeSolver):
    """Plain (Picard) iteration ``z <- f(z)``.

    For a pcDEQ map started in the nonnegative orthant the iterates stay there and converge
    geometrically to the unique fixed point (monotonically from 0).
    """

    name = "fixed_point"

    def step(
        self, state: Any, z: torch.Tensor, fz: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        return fz, state


class _AndersonState:
    """History and safeguard bookkeeping of :class:`AndersonAcceleration` (all per sample)."""

    def __init__(self, z0: torch.Tensor, memory: int) -> None:
        batch, n = z0.shape[0], z0[0].numel()
        # images f(z_i) of past iterates and their residuals f(z_i) - z_i; only the slots
        # filled so far are ever read, so no zero fill of these large buffers
        self.fs = z0.new_empty(batch, memory, n)
        self.gs = z0.new_empty(batch, memory, n)
        # Gram matrix of the residuals, updated one row per step (O(m n) instead of
        # O(m^2 n)); kept in float64 because the small solve needs it (MPS: float32).
        solve_dtype = torch.float32 if z0.device.type == "mps" else torch.float64
        self.gram = torch.zeros(batch, memory, memory, dtype=solve_dtype, device=z0.device)
        self.count = 0  # pairs stored so far (same for every sample)
        # last accepted point's image and residual; whether the current iterate is an
        # Anderson candidate (to be judged by its residual)
        self.accepted_fz: torch.Tensor | None = None
        self.accepted_residual: torch.Tensor | None = None
        self.was_candidate = torch.zeros(batch, dtype=torch.bool, device=z0.device)

    def push(self, z: torch.Tensor, fz: torch.Tensor, memory: int) -> None:
        """Store the pair ``(z, f(z))`` in the circular buffer and update the Gram matrix."""
        slot = self.count % memory
        g_new = (fz - z).flatten(1)
        self.fs[:, slot] = fz.flatten(1)
        self.gs[:, slot] = g_new
        self.count += 1
        k = min(self.count, memory)
        row = torch.bmm(self.gs[:, :k], g_new.unsqueeze(2)).squeeze(2).to(self.gram.dtype)
        self.gram[:, slot, :k] = row
        self.gram[:, :k, slot] = row


class AndersonAcceleration(IterativeSolver):
    """Safeguarded Anderson acceleration (type II, regularised least squares, per sample).

    At each step the next iterate extrapolates the last ``memory`` pairs ``(z_i, f(z_i))``:
    ``z+ = sum_i a_i (beta f(z_i) + (1 - beta) z_i)`` with ``sum a_i = 1`` minimising
    ``||sum a_i (f(z_i) - z_i)||^2 + lam * s * ||a||^2`` (``s`` is the mean squared residual
    norm of the history, so the ridge term is scale-free).

    Safeguard (per sample), which keeps plain iteration's convergence guarantee:

    * if the plain step ``f(z)`` lies in the nonnegative orthant but the extrapolated point
      leaves it, the plain step is taken instead (where the plain step itself has negative
      entries, as in the signed adjoint problem, the orthant test does not apply);
    * an extrapolated point whose residual exceeds the residual of the last accepted point
      is rejected: the solver returns to that point and takes the plain step from it;
    * a singular or non-finite least-squares solution falls back to the plain step.

    Hence iterates stay nonnegative on pcDEQ maps and, at worst, the solver performs plain
    iteration at half speed.

    Args:
        memory: Number of past pairs used (>= 1); ``max_iter < memory`` is fine.
        beta: Mixing parameter in ``(0, 1]``; ``1`` extrapolates the images only.
        lam: Relative ridge regularisation (>= 0) of the least-squares problem.
    """

    name = "anderson"
    needs_residual = True

    def __init__(self, memory: int = 5, beta: float = 1.0, lam: float = 1e-4) -> None:
        if isinstance(memory, bool) or not (isinstance(memory, int) and memory >= 1):
            raise ValueError(f"anderson: memory must be an integer >= 1, got {memory!r}")
        if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
            raise ValueError(f"anderson: beta must be in (0, 1], got {beta!r}")
        if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"anderson: lam must be a finite number >= 0, got {lam!r}")
        self.memory = memory
        self.beta = float(beta)
        self.lam = float(lam)

    def __repr__(self) -> str:
        return f"AndersonAcceleration(memory={self.memory}, beta={self.beta}, lam={self.lam})"

    def init(self, z0: torch.Tensor) -> _AndersonState:
        return _AndersonState(z0, self.memory)

    def _extrapolate(self, state: _AndersonState) -> tuple[torch.Tensor, torch.Tensor]:
        """Anderson point of every sample (flat) and a per-sample validity mask."""
        k = min(state.count, self.memory)
        gram = state.gram[:, :k, :k]
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(gram.dtype).tiny)
        batch = gram.shape[0]
        # bordered system [[0, 1^T], [1, G G^T + lam s I]] [c; a] = [1; 0]
        h = gram.new_zeros(batch, k + 1, k + 1)
        h[:, 0, 1:] = 1.0
        h[:, 1:, 0] = 1.0
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        h[:, 1:, 1:] = gram + (self.lam * scale).view(-1, 1, 1) * eye
        rhs = gram.new_zeros(batch, k + 1)
        rhs[:, 0] = 1.0
        sol, info = torch.linalg.solve_ex(h, rhs)  # never raises: failures are per sample
        alpha = sol[:, 1:]
        valid = (info == 0) & torch.isfinite(alpha).all(dim=1)
        alpha = torch.where(valid.unsqueeze(1), alpha, torch.zeros_like(alpha))
        alpha = alpha.to(state.fs.dtype).unsqueeze(1)
        # beta f + (1 - beta) z = f - (1 - beta) g
        point = torch.bmm(alpha, state.fs[:, :k]).squeeze(1)
        if self.beta != 1.0:
            point = point - (1.0 - self.beta) * torch.bmm(alpha, state.gs[:, :k]).squeeze(1)
        return point, valid

    def step(
        self,
        state: _AndersonState,
        z: torch.Tensor,
        fz: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, _AndersonState]:
        assert residual is not None
        # 1. Judge the current iterate: a candidate that raised the residual is rejected.
        if state.accepted_residual is None:
            accept = torch.ones_like(state.was_candidate)
            state.accepted_fz, state.accepted_residual = fz, residual
        else:
            accept = ~state.was_candidate | (residual <= state.accepted_residual)
            state.accepted_fz = _batch_where(accept, fz, state.accepted_fz)
            state.accepted_residual = torch.where(accept, residual, state.accepted_residual)
        plain = state.accepted_fz  # plain step from the last accepted point
        # 2. Remember the (genuine) pair (z, f(z)) in a circular buffer.
        state.push(z, fz, self.memory)
        # 3. Extrapolate, then apply the orthant safeguard.
        candidate, valid = self._extrapolate(state)
        candidate = candidate.view_as(z)
        # one pass over the candidate: its min and max give both tests (NaN propagates)
        low, high = torch.aminmax(candidate.flatten(1), dim=1)
        finite = torch.isfinite(low) & torch.isfinite(high)
        leaves_orthant = (plain.flatten(1).amin(dim=1) >= 0) & (low < 0)
        use = accept & valid & finite & ~leaves_orthant
        state.was_candidate = use
        return _batch_where(use, candidate, plain), state


_FIXED_POINT_OPTIONS: tuple[str, ...] = ()
_ANDERSON_OPTIONS: tuple[str, ...] = ("memory", "beta", "lam")


def _check_options(solver: str, options: dict[str, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        choices = ", ".join(valid) if valid else "(none)"
        raise TypeError(
            f"unknown option(s) {unknown} for solver {solver!r}; valid options: {choices}"
        )


def make_fixed_point(**options: Any) -> FixedPointIteration:
    """Factory of the ``fixed_point`` solver (it takes no options)."""
    _check_options("fixed_point", options, _FIXED_POINT_OPTIONS)
    return FixedPointIteration()


def make_anderson(**options: Any) -> AndersonAcceleration:
    """Factory of the ``anderson`` solver: options ``memory``, ``beta``, ``lam``."""
    _check_options("anderson", options, _ANDERSON_OPTIONS)
    return AndersonAcceleration(**options)


@hookimpl
def pcdeq_register_solvers() -> dict[str, SolverSpec]:
    """The built-in solvers, registered through the same hook as any plugin's."""
    return {
        "fixed_point": SolverSpec(
            "fixed_point",
            make_fixed_point,
            description="plain fixed-point (Picard) iteration with per-sample residuals",
            keeps_nonnegative=True,
        ),
        "anderson": SolverSpec(
            "anderson",
            make_anderson,
            description="safeguarded Anderson acceleration (options: memory, beta, lam)",
            keeps_nonnegative=True,
        ),
    }
