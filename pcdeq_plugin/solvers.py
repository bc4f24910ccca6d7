"""Forward (and adjoint) fixed-point solvers: plain Picard iteration and safeguarded Anderson.

Every solver shares one call signature (see :class:`~pcdeq_plugin.registry.FixedPointSolver`)::

    solver(fn, z0, *, tol, max_iter, check_every=1) -> FixedPointResult(value, stats)

``check_every=None`` asks the solver for its own check schedule (plain iteration predicts
it from the observed geometric rate).

In the optimistix spirit a solver is a small object with a fixed protocol -- ``init`` its
state, take one ``step`` from an iterate and its image -- and one generic loop
(:meth:`IterativeSolver.__call__`) drives it, tests convergence and writes the statistics.

The loop itself (per-sample residuals, convergence checks and when they happen, the
statistics) lives in :mod:`pcdeq_plugin.iteration`. Solvers never raise on
non-convergence: the statistics say so, and the caller applies its failure policy
(:func:`pcdeq_plugin.implicit.enforce_failure_policy`). Solvers do not change the grad
mode: :func:`pcdeq_plugin.implicit.solve_implicit` calls them under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import ArgumentError, check_count, check_known_keys, is_finite_number
from .hookspecs import hookimpl
from .iteration import IterativeSolver
from .registry import SolverSpec
from .residuals import RESIDUAL_EPS, batch_where, per_sample_residual

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


class FixedPointIteration(IterativeSolver):
    """Plain (Picard) iteration ``z <- f(z)``.

    For a pcDEQ map started in the nonnegative orthant the iterates stay there and converge
    geometrically to the unique fixed point (monotonically from 0).
    """

    name = "fixed_point"
    predicts_checks = True
    starts_from_image_of_zero = True

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
        check_count("anderson: memory", memory)
        if not (is_finite_number(beta) and 0 < beta <= 1):
            raise ArgumentError(f"anderson: beta must be in (0, 1], got {beta!r}")
        if not (is_finite_number(lam) and lam >= 0):
            raise ArgumentError(f"anderson: lam must be a finite number >= 0, got {lam!r}")
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
            state.accepted_fz = batch_where(accept, fz, state.accepted_fz)
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
        return batch_where(use, candidate, plain), state


_FIXED_POINT_OPTIONS: tuple[str, ...] = ()
_ANDERSON_OPTIONS: tuple[str, ...] = ("memory", "beta", "lam")


def _check_options(solver: str, options: dict[str, Any], valid: tuple[str, ...]) -> None:
    check_known_keys(options, valid or ("(none)",), context=f" for solver {solver!r}")


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
