"""The ``pcdeq`` solver: plain fixed-point iteration on TorchDEQ's exact solver contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..checks import ArgumentError, check_choice, check_positive, is_finite_number
from ._common import BRIDGE_MARK, STOP_MODES, import_torchdeq

__all__ = ["SOLVER_OPTIONS", "pcdeq_solver"]

# Every option pcdeq_solver acts on; anything else is refused rather than silently ignored.
SOLVER_OPTIONS: tuple[str, ...] = (
    "max_iter",
    "tol",
    "stop_mode",
    "indexing",
    "tau",
    "return_final",
)


def _batch_flatten(x: torch.Tensor) -> torch.Tensor:
    # TorchDEQ's batch rule: dim 0 is the batch; a 0-d or 1-d state is one sample per element
    return x.flatten(start_dim=1) if x.dim() >= 2 else x.reshape(-1, 1)


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[B]`` mask against a state shaped like ``like``."""
    if like.dim() >= 2:
        return mask.view(-1, *([1] * (like.dim() - 1)))
    return mask.view(like.shape)


def _check_state(x0: Any) -> None:
    if isinstance(x0, torch.Tensor):
        return
    if isinstance(x0, (tuple, list)):
        raise TypeError(
            f"x0 must be a torch.Tensor (one state), got a {type(x0).__name__} of {len(x0)} "
            "states. "
            "TorchDEQ flattens a tuple/list state into one [B, sum D] tensor for a custom "
            "solver only when the DEQ keeps statistics (no_stat=False: get_deq's default for "
            "every f_solver except 'simple_fixed_point_iter'); a DEQ built with no_stat=True "
            "(e.g. DEQSliced(no_stat=True)) hands the solver the state itself. Build it "
            "with no_stat=False to use the pcdeq solver on a multi-tensor state"
        )
    raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")


def _check_options(max_iter: Any, tol: Any, stop_mode: Any, tau: Any, extra: dict) -> None:
    if extra:
        raise TypeError(
            f"the pcdeq solver does not support the option(s) {', '.join(map(repr, sorted(extra)))}"
            f" (it would ignore them); it honours: {', '.join(SOLVER_OPTIONS)}. Options of "
            "other solvers (Anderson's m, beta, lam; Broyden's ls) have no meaning for plain "
            "fixed-point iteration"
        )
    check_choice("stop_mode", stop_mode, STOP_MODES)
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    check_positive("tol", tol)  # NaN or <= 0 would never stop early
    if not (is_finite_number(tau) and 0 < tau <= 1):
        raise ArgumentError(
            f"tau must be a damping factor in (0, 1], got {tau!r}: the damped map "
            "(1 - tau) z + tau f(z) stays positive concave only for 0 < tau <= 1 (tau > 1 "
            "over-relaxes and may leave the nonnegative orthant)"
        )


def pcdeq_solver(
    func: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    indexing: list[int] | None = None,
    tau: float = 1.0,
    return_final: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """Plain (optionally damped) fixed-point iteration on TorchDEQ's solver contract.

    The iteration is ``z <- (1 - tau) z + tau func(z)``. Damping keeps pcDEQ's guarantee:
    for ``0 < tau <= 1`` the damped map is again positive concave on the nonnegative
    orthant (a nonnegative combination of the identity, which is linear, and a positive
    concave map), so it is a standard interference mapping with the *same* unique fixed
    point, reached from any nonnegative start. The same holds for the backward (adjoint)
    problem: damping turns ``J^T`` into ``(1 - tau) I + tau J^T``, whose spectral radius
    stays below one. TorchDEQ passes ``tau`` only through ``solver_kwargs``
    (``deq(f, z0, solver_kwargs={"tau": 0.5})``, forward solve); its config key ``tau``
    damps the phantom-gradient unroll, not the solver.

    Args:
        func: The map; called with one positional tensor shaped like ``x0``.
        x0: Initial state ``[B, ...]`` (a 0-d or 1-d tensor counts each element as a sample).
            It is *not* projected onto the nonnegative orthant: as a ``b_solver`` this solves
            the signed adjoint problem from ``x0 = 0``.
        max_iter: Iteration cap (0 returns ``x0``).
        tol: Stop when the largest per-sample residual of ``stop_mode`` is below it.
        stop_mode: ``'abs'`` (``||f(z) - z||``) or ``'rel'`` (divided by ``||f(z)|| + 1e-9``).
            Residuals are those of the fixed-point equation, whatever ``tau`` (TorchDEQ's
            ``fixed_point_iter`` measures the damped step, ``tau`` times smaller).
        indexing: Steps whose (best-so-far) state goes into the trajectory. On early stop the
            missing entries are the final state, so ``len(trajectory) == len(indexing)``.
        tau: Damping factor in ``(0, 1]``; 1 is undamped iteration.
        return_final: Run all ``max_iter`` steps and return the last iterate instead of the
            per-sample best.
        **kwargs: Refused: any other option raises ``TypeError`` naming what is honoured
            (:data:`SOLVER_OPTIONS`) instead of being silently ignored.

    Returns:
        ``(z_best, trajectory, info)``: ``z_best`` detached, shaped like ``x0``;
        ``trajectory`` a list of ``len(indexing or [])`` states; ``info`` a TorchDEQ
        ``SolverStat`` with ``abs_lowest``, ``rel_lowest`` ``(B,)``, ``abs_trace``,
        ``rel_trace`` ``(B, max_iter + 1)`` (padded after an early stop, as TorchDEQ's own
        ``fixed_point_iter``), ``nstep`` ``(B,)`` (1-based step of the best iterate) and
        ``pc_min`` ``(B,)``, the smallest entry of each sample's state (negative values
        flag a violated pcDEQ assumption in the forward solve).

    Raises:
        TypeError: ``x0`` is not a single tensor (the message explains TorchDEQ's
            ``no_stat`` list states), or an option this solver does not honour.
        ValueError: unknown ``stop_mode``, negative ``max_iter``, ``tol`` not positive,
            ``tau`` outside ``(0, 1]``, or ``func`` changed the shape.
    """
    _check_state(x0)
    _check_options(max_iter, tol, stop_mode, tau, kwargs)
    solver_stat = import_torchdeq().solver.stat.SolverStat
    max_iter = int(max_iter)
    wanted = [int(i) for i in indexing] if indexing else []

    x = x0.detach()
    bsz = _batch_flatten(x).shape[0]
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    big = torch.full((bsz,), 1e8, dtype=dtype, device=x.device)
    lowest = {mode: big.clone() for mode in STOP_MODES}
    lowest_step = {mode: torch.zeros(bsz, dtype=dtype, device=x.device) for mode in STOP_MODES}
    trace: dict[str, list[torch.Tensor]] = {mode: [big.clone()] for mode in STOP_MODES}
    best = x.clone()
    snapshots: dict[int, torch.Tensor] = {}

    for k in range(max_iter):
        fx = func(x)
        if fx.shape != x.shape:
            raise ValueError(
                f"func changed the state shape from {tuple(x.shape)} to {tuple(fx.shape)}"
            )
        fx = fx.detach()
        abs_res = _batch_flatten(fx - x).norm(dim=1).to(dtype)  # residual of z = f(z) at x
        rel_res = abs_res / (_batch_flatten(fx).norm(dim=1).to(dtype) + 1e-9)
        residual = {"abs": abs_res, "rel": rel_res}
        step = fx if tau == 1 else x + tau * (fx - x)
        for mode in STOP_MODES:
            trace[mode].append(residual[mode])
            improved = residual[mode] < lowest[mode]
            if return_final:
                improved = torch.ones_like(improved)
            if mode == stop_mode:
                best = torch.where(_per_sample(improved, best), step, best)
            lowest[mode] = torch.where(improved, residual[mode], lowest[mode])
            lowest_step[mode] = torch.where(
                improved, torch.full_like(lowest_step[mode], k + 1), lowest_step[mode]
            )
        if k + 1 in wanted:
            snapshots[k + 1] = best.clone()
        x = step
        # NaN residuals compare False: a diverged sample never counts as converged
        if not return_final and bool(residual[stop_mode].max() < tol):
            break

    for mode in STOP_MODES:  # fixed-shape logs: pad the trace to max_iter + 1 entries
        trace[mode].extend([lowest[mode]] * (max_iter + 1 - len(trace[mode])))
    trajectory = [snapshots.get(i, best) for i in wanted]
    info = solver_stat(
        abs_lowest=lowest["abs"],
        rel_lowest=lowest["rel"],
        abs_trace=torch.stack(trace["abs"], dim=1),
        rel_trace=torch.stack(trace["rel"], dim=1),
        nstep=lowest_step[stop_mode],
    )
    info["pc_min"] = _batch_flatten(best).min(dim=1).values
    return best, trajectory, info


setattr(pcdeq_solver, BRIDGE_MARK, True)
