"""Failure policy: what a solve that left samples unconverged does besides recording it.

One helper announces a recorded failure (:func:`announce_failure`: ignore, warn or raise)
for every family; :func:`enforce_failure_policy` writes the message from a solve's
:class:`~pcdeq_plugin.SolveStats`.
"""

from __future__ import annotations

import warnings

import torch

from .checks import check_choice
from .interface import FAILURE_POLICIES, ConvergenceError, ConvergenceWarning, SolveStats

__all__ = ["announce_failure", "enforce_failure_policy"]


def announce_failure(
    message: str, on_failure: str, *, cause: BaseException | None = None, stacklevel: int = 3
) -> None:
    """Apply a failure policy to an already recorded failed solve.

    ``"ignore"`` does nothing, ``"warn"`` issues a :class:`~pcdeq_plugin.ConvergenceWarning`,
    ``"raise"`` raises :class:`~pcdeq_plugin.ConvergenceError` (chained to ``cause``).
    ``stacklevel`` counts from the caller of this function.

    Raises:
        ConvergenceError: ``on_failure == "raise"``.
        ValueError: unknown policy (the message lists the valid ones).
    """
    _check_policy(on_failure)
    if on_failure == "raise":
        raise ConvergenceError(message) from cause
    if on_failure == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)


def _check_policy(on_failure: object) -> None:
    check_choice("on_failure", on_failure, FAILURE_POLICIES)


def enforce_failure_policy(
    stats: SolveStats,
    on_failure: str,
    *,
    block: str = "solve_implicit",
    phase: str = "forward",
    tol: float | None = None,
) -> None:
    """Apply a failure policy to one solve's statistics.

    A solve that left some samples unconverged (cap reached, or NaN/Inf met) is always
    recorded in ``stats``; this decides whether it is also announced.

    Args:
        stats: The solve's statistics.
        on_failure: ``"ignore"``, ``"warn"`` (:class:`ConvergenceWarning`) or ``"raise"``
            (:class:`ConvergenceError`).
        block: Name of the block, used in the message.
        phase: ``"forward"`` or ``"backward"``, used in the message.
        tol: The tolerance, used in the message.

    Raises:
        ConvergenceError: some samples failed and ``on_failure == "raise"``.
        ValueError: unknown policy.
    """
    if on_failure not in FAILURE_POLICIES:
        _check_policy(on_failure)  # raises, naming the choices
    if on_failure == "ignore":
        return  # not even a host synchronisation
    converged = stats.converged
    on_host = converged.device.type == "cpu" and converged.dtype == torch.bool
    if on_host and converged.numpy().all():  # the common case, read without a torch op
        return
    failed = stats.num_failed
    if failed == 0:
        return
    nonfinite = int((~torch.isfinite(stats.residual)).sum().item())
    tol_text = f", tol={tol:g}" if tol is not None else ""
    message = (
        f"{block}: {phase} solve ({stats.solver or 'solver'}) did not converge for "
        f"{failed}/{stats.batch_size} samples after {stats.iterations} iterations "
        f"(max_iter={stats.max_iter}{tol_text}); worst residual {stats.max_residual:.3e}"
    )
    if nonfinite:
        message += (
            f"; {nonfinite} sample(s) hit non-finite values (NaN/Inf) in the state or the "
            "map's output and were stopped"
        )
    announce_failure(message, on_failure, stacklevel=3)
