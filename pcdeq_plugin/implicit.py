"""Implicit differentiation of a fixed point: :func:`solve_implicit`.

Forward: solve ``z* = f(z*)`` with the configured solver under ``torch.no_grad()`` (no
graph over the iterations, so memory does not grow with their number), then take one
differentiable step ``z = f(z*)`` that connects the output to everything ``f`` closes over.

Backward (a tensor hook on ``z``, the recipe of the "Deep Implicit Layers" tutorial and of
the official pcDEQ code): when ``dL/dz`` arrives, solve the adjoint equation

    y = J^T y + dL/dz,        J = df/dz at z*,

by the configured backward solver, each ``J^T y`` being a vector-Jacobian product, and hand
``y`` to autograd, which pushes it through the differentiable step to the parameters and
the injection. For a pcDEQ map the spectral radius of ``J`` is below 1, so the adjoint
iteration converges (pcdeq.md section 1.7).

The graph for the vector-Jacobian products (``f0 = f(z_leaf)`` with ``z_leaf`` a detached
copy of ``z*``) is built *inside* the hook and dropped when the hook returns: between
forward and backward nothing but ``z*`` is kept, the graph is freed after backward, a
``retain_graph=True`` second backward works, and a block used twice in one graph gets two
independent hooks. Double backward (``create_graph=True``) is refused with a clear error:
the hook's result is not itself differentiable, so second derivatives would be silently
wrong.

Mixed precision: under ``torch.autocast`` the forward solve, the differentiable step and
the adjoint solve run with autocast disabled, in float32 (a half-precision start is cast
up). Tolerances around 1e-4 are below half-precision resolution (float16 spacing near 1 is
~1e-3, bfloat16 ~8e-3), so a half-precision solve would stall above its tolerance and
report failure, and its adjoint would be noise. The output is float32; later autocast
regions cast it as they need.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

from .interface import (
    FAILURE_POLICIES,
    BlockStats,
    ConvergenceError,
    ConvergenceWarning,
    SolverConfig,
    SolveStats,
)
from .registry import FixedPointSolver, UnknownNameError, get_solver

__all__ = ["enforce_failure_policy", "make_solvers", "solve_implicit"]

MapFn = Callable[[torch.Tensor], torch.Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
        raise ValueError(
            f"unknown on_failure {on_failure!r}; choose one of {', '.join(FAILURE_POLICIES)}"
        )
    if on_failure == "ignore":
        return  # not even a host synchronisation
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
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)


def make_solvers(config: SolverConfig) -> tuple[FixedPointSolver, FixedPointSolver]:
    """Build the forward and backward solvers named by ``config``.

    ``config.solver_options`` go to the forward solver, and to the backward solver only
    when it is the same solver (another solver would not know the options).
    """
    forward = _build_solver("solver", config.solver, config.solver_options)
    backward_name = config.effective_backward_solver
    backward_options = config.solver_options if backward_name == config.solver else {}
    field = "backward_solver" if config.backward_solver is not None else "solver"
    backward = _build_solver(field, backward_name, backward_options)
    return forward, backward


def _build_solver(field: str, name: str, options: dict) -> FixedPointSolver:
    """``get_solver(name, **options)``; errors say which SolverConfig field was wrong."""
    try:
        return get_solver(name, **options)
    except UnknownNameError as exc:
        raise UnknownNameError(f"SolverConfig.{field}: {exc}") from None
    except TypeError as exc:
        raise TypeError(f"SolverConfig.solver_options: {exc}") from None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[None]:
    """Disable autocast for the solve if it is on.

    Tolerances of 1e-4 are below the resolution of half precision (float16 spacing near 1
    is ~1e-3, bfloat16 ~8e-3): a half-precision solve would stall above the tolerance and
    give noisy adjoints. The solve therefore runs in float32 with autocast disabled.
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        enabled = False
    if enabled:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def solve_implicit(
    f: MapFn,
    z0: torch.Tensor,
    config: SolverConfig,
    stats: BlockStats | None = None,
) -> torch.Tensor:
    """Fixed point ``z* = f(z*)`` with implicit gradients.

    Args:
        f: The map ``[B, ...] -> [B, ...]``; gradients flow to every tensor it closes over
            (weights, injection). It is called again during backward to build the
            vector-Jacobian products, so it must be deterministic.
        z0: Starting point (pcDEQ: zeros shaped like the injection). Not differentiated.
        config: Solver names, tolerances, caps, ``check_every`` and the failure policy.
        stats: Optional record; ``stats.forward`` is written during forward and
            ``stats.backward`` during backward (it is reset to ``None`` on each forward).

    Returns:
        ``z*`` (float32 if the input was half precision or autocast was on). When grad mode
        is off or nothing ``f`` uses requires grad, no graph is built.

    Raises:
        ConvergenceError: a solve failed and ``config.on_failure == "raise"``.
        RuntimeError: double backward (``create_graph=True``) through the solve.
    """
    if not isinstance(config, SolverConfig):
        raise TypeError(f"config must be a SolverConfig, got {type(config).__name__}")
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        raise TypeError("z0 must be a floating-point torch.Tensor")
    block = stats.block if stats is not None else "solve_implicit"
    forward_solver, backward_solver = make_solvers(config)
    device_type = z0.device.type
    z0 = z0.detach()
    if z0.dtype in _LOW_PRECISION:
        z0 = z0.float()

    with _autocast_off(device_type):
        with torch.no_grad():
            result = forward_solver(
                f,
                z0,
                tol=config.tol,
                max_iter=config.max_iter,
                check_every=config.effective_check_every(z0.device),
            )
        if stats is not None:
            stats.forward = result.stats
            stats.backward = None
        enforce_failure_policy(
            result.stats, config.on_failure, block=block, phase="forward", tol=config.tol
        )
        z_star = result.value.detach()
        if not torch.is_grad_enabled():
            return z_star
        z = f(z_star)  # the one differentiable step
    if not z.requires_grad:
        return z  # nothing to differentiate (e.g. a fixed map): no hook needed

    def adjoint_hook(grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is None:  # an undefined incoming gradient stays undefined
            return None
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{block}: double backward (create_graph=True) through an implicit solve is "
                "not supported; the adjoint solve is not itself differentiable"
            )
        with _autocast_off(device_type), torch.enable_grad():
            z_leaf = z_star.detach().requires_grad_()
            f0 = f(z_leaf)
        if not f0.requires_grad:  # f does not depend on its state: J = 0
            return grad

        def adjoint_map(y: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(f0, z_leaf, y, retain_graph=True, allow_unused=True)
            return grad if vjp is None else vjp + grad

        result_b = backward_solver(
            adjoint_map,
            grad,
            tol=config.effective_backward_tol,
            max_iter=config.effective_backward_max_iter,
            check_every=config.effective_check_every(grad.device),
        )
        if stats is not None:
            stats.backward = result_b.stats
        enforce_failure_policy(
            result_b.stats,
            config.on_failure,
            block=block,
            phase="backward",
            tol=config.effective_backward_tol,
        )
        return result_b.value.to(grad.dtype)

    z.register_hook(adjoint_hook)
    return z
