"""Implicit differentiation of a fixed point: :func:`solve_implicit`.

Forward: solve ``z* = f(z*)`` with the configured solver under ``torch.no_grad()`` (no
graph over the iterations, so memory does not grow with their number), optionally after a
low-precision warm phase (:mod:`pcdeq_plugin.warm_start`), then take one differentiable
step ``z = f(z*)`` that connects the output to everything ``f`` closes over. In
``torch.no_grad()`` (evaluation) there is no step: the solve's evaluations are all.

Backward (a tensor hook on ``z``, the recipe of the "Deep Implicit Layers" tutorial and of
the official pcDEQ code): when ``dL/dz`` arrives, solve the adjoint equation

    y = J^T y + dL/dz,        J = df/dz at z*,

by the configured backward solver and hand ``y`` to autograd, which pushes it through the
differentiable step to the parameters and the injection. For a pcDEQ map the spectral
radius of ``J`` is below 1, so the adjoint iteration converges (pcdeq.md section 1.7).

``J^T y`` comes from one of three places (``SolverConfig.adjoint``, ``reuse_step_graph``):

* **analytic** (pcDEQ cells, the default for them): ``W^T (sigma'(a) * y)`` with the
  pre-activation ``a = W z* + u`` kept from the differentiable step -- one transposed
  linear map or convolution per backward iteration, no autograd round trip;
* **autograd on the step's graph** (default for other maps): the differentiable step is
  evaluated at a leaf copy of ``z*`` and its graph also serves the vector-Jacobian
  products -- one evaluation per training step instead of the paper's two;
* **autograd on a rebuilt graph** (``reuse_step_graph=False``, the paper's recipe): the
  graph ``f(z_leaf)`` is built inside the hook and dropped when it returns.

In every case nothing but ``z*`` and one evaluation's graph is kept between forward and
backward, the graph is freed after backward, a ``retain_graph=True`` second backward
works, and a block used twice in one graph gets two independent hooks. Double backward
(``create_graph=True``) is refused with a clear error: the hook's result is not itself
differentiable, so second derivatives would be silently wrong.

Mixed precision: under ``torch.autocast`` the forward solve, the differentiable step and
the adjoint solve run with autocast disabled, in float32 (a half-precision start is cast
up). Tolerances around 1e-4 are below half-precision resolution (float16 spacing near 1 is
~1e-3, bfloat16 ~8e-3), so a half-precision solve would stall above its tolerance and
report failure, and its adjoint would be noise. Low precision is used only where it is
safe: the warm phase, whose result the float32 solve then takes to ``tol``. The output is
float32; later autocast regions cast it as they need.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .adjoint import differentiable_step
from .autocast import autocast_off
from .failure import enforce_failure_policy
from .interface import BlockStats, FixedPointResult, SolverConfig, SolveStats
from .maps import FixedPointMap, MapFn, RefinementFn
from .registry import FixedPointSolver, UnknownNameError, get_solver
from .warm_start import RefinedStart, refine_iterate, resolve_warm_start, warm_iterate

__all__ = ["enforce_failure_policy", "make_solvers", "solve_implicit"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def solve_implicit(
    f: MapFn | FixedPointMap,
    z0: torch.Tensor,
    config: SolverConfig,
    stats: BlockStats | None = None,
    *,
    solvers: tuple[FixedPointSolver, FixedPointSolver] | None = None,
    zero_start: bool | None = None,
) -> torch.Tensor:
    """Fixed point ``z* = f(z*)`` with implicit gradients.

    Args:
        f: The map ``[B, ...] -> [B, ...]``; gradients flow to every tensor it closes over
            (weights, injection). A :class:`~pcdeq_plugin.maps.FixedPointMap` may also
            offer the pcDEQ guarantee (warm start by default), a low-precision version and
            an analytic adjoint. With the autograd adjoint ``f`` is differentiated at
            ``z*``, so it must be deterministic.
        z0: Starting point (pcDEQ: zeros shaped like the injection). Not differentiated.
        config: Solver names, tolerances, caps, ``check_every``, warm start, adjoint and
            the failure policy.
        stats: Optional record; ``stats.forward`` is written during forward and
            ``stats.backward`` during backward (it is reset to ``None`` on each forward).
        solvers: The ``(forward, backward)`` solvers of ``config`` if the caller built
            them already (:func:`make_solvers`); saves the registry lookups per call.
        zero_start: ``True``: the solve starts from zeros (the pcDEQ start) and ``z0`` is
            only a template (shape, dtype, device, layout; its values are not read), so the
            caller need not fill a state-sized tensor with zeros; ``False``: it starts from
            ``z0``; ``None`` tests whether ``z0`` is all zeros. From zero, a map that knows
            ``f(0)`` (:meth:`~pcdeq_plugin.maps.FixedPointMap.image_of_zero`) starts from
            there: the first iteration costs no evaluation (it is still counted).

    Returns:
        ``z*`` (float32 if the input was half precision or autocast was on). Under
        ``torch.no_grad()`` no graph is built and ``f`` is evaluated exactly the solve's
        number of times (one fewer from zero where ``f(0)`` is known); with grad enabled
        it is evaluated once more, for the one differentiable step (whose graph is dropped
        if nothing ``f`` uses requires grad).

    Raises:
        ConvergenceError: a solve failed and ``config.on_failure == "raise"``.
        ValueError: ``config.adjoint == "analytic"`` for a map without one.
        RuntimeError: double backward (``create_graph=True``) through the solve.
    """
    if not isinstance(config, SolverConfig):
        raise TypeError(f"config must be a SolverConfig, got {type(config).__name__}")
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        raise TypeError("z0 must be a floating-point torch.Tensor")
    block = stats.block if stats is not None else "solve_implicit"
    forward_solver, backward_solver = solvers if solvers is not None else make_solvers(config)
    device_type = z0.device.type
    z0 = z0.detach()
    if z0.dtype in _LOW_PRECISION:
        z0 = z0.float()
    warm_dtype = resolve_warm_start(config.warm_start, z0, f)
    if zero_start is None:  # a pass over z0 (a synchronisation on a GPU) only where used
        knows_image = isinstance(f, FixedPointMap) and (
            type(f).image_of_zero is not FixedPointMap.image_of_zero
        )
        zero_start = (warm_dtype is not None or knows_image) and not bool(z0.any())

    with autocast_off(device_type):
        with torch.no_grad():
            result = _solve(
                forward_solver,
                f,
                z0,
                config.tol,
                config.max_iter,
                config,
                _warm_map(f, warm_dtype),
                project=True,
                zero_start=zero_start,
                refinement=_offered_refinement(f),
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
        step = differentiable_step(f, z_star, config, block)
    if step is None:
        return z_star  # nothing f uses requires grad: no graph, no hook
    # The hook must not reference z (nor anything holding it, such as `step`): a tensor
    # whose own hook keeps it alive forms a cycle through autograd's C++ graph that
    # Python's garbage collector cannot see, and every training step would leak it.
    z, adjoint, adjoint_in = step.output, step.adjoint, step.adjoint_in
    adjoint_refinement = step.adjoint_refinement
    del step
    reentrant = [False]  # a VJP through the step's graph must not re-enter this hook

    def adjoint_hook(grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is None or reentrant[0]:  # an undefined gradient stays undefined
            return None
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{block}: double backward (create_graph=True) through an implicit solve is "
                "not supported; the adjoint solve is not itself differentiable"
            )
        reentrant[0] = True
        try:
            with autocast_off(device_type):
                adjoint_map = adjoint(grad)
                warm = refinement = None
                if adjoint_in is not None and warm_dtype is not None:
                    warm = (warm_dtype, adjoint_in(warm_dtype, grad))
                    if adjoint_refinement is not None:
                        refinement = adjoint_refinement(grad)
                result_b = _solve(
                    backward_solver,
                    adjoint_map,
                    grad,
                    config.effective_backward_tol,
                    config.effective_backward_max_iter,
                    config,
                    warm,
                    project=False,
                    refinement=refinement,
                )
        finally:
            reentrant[0] = False
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


def _warm_map(
    f: MapFn | FixedPointMap, dtype: torch.dtype | None
) -> tuple[torch.dtype, MapFn] | None:
    if dtype is None:
        return None
    structured = f if isinstance(f, FixedPointMap) else _CallableMap(f)
    return dtype, structured.in_precision(dtype)


class _CallableMap(FixedPointMap):
    """A plain callable seen as a :class:`FixedPointMap` (for the autocast warm map)."""

    def __init__(self, f: MapFn) -> None:
        self.f = f

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.f(z)


def _offered_refinement(f: MapFn | FixedPointMap) -> RefinementFn | None:
    """``f.refinement`` where ``f`` offers one (:meth:`FixedPointMap.refinement`)."""
    if isinstance(f, FixedPointMap) and type(f).refinement is not FixedPointMap.refinement:
        return f.refinement
    return None


def _refine(
    refinement: RefinementFn, z0: torch.Tensor, dtype: torch.dtype, *, tol: float, budget: int
) -> RefinedStart | None:
    """The refinement after a warm phase (:func:`~pcdeq_plugin.warm_start.refine_iterate`)
    where the budget leaves room for its float32 evaluation, a correction and the float32
    solve's check.

    Returns:
        The float32 solve's start (or, certified, its answer), or ``None``.
    """
    if budget < 3:
        return None
    return refine_iterate(
        lambda rows: refinement(z0, dtype, rows),
        z0.shape[0],
        tol=tol,
        max_iter=budget - 2,
        device=z0.device,
    )


def _certified_result(
    solver: FixedPointSolver, value: torch.Tensor, bound: torch.Tensor, tol: float, max_iter: int
) -> FixedPointResult | None:
    """The solve's answer where every sample's certified residual bound meets ``tol``.

    Its record counts no iteration: the caller adds the warm phase's, the float32
    evaluation's and the corrections'. ``None`` if any sample misses (the solver then
    continues from ``value``, a better start than the last iterate).
    """
    converged = bound < tol  # a NaN bound never passes
    if not bool(converged.all()):
        return None
    stats = SolveStats(
        iterations=0,
        residual=bound,
        converged=converged,
        seconds=0.0,
        unit="iter",
        solver=getattr(solver, "name", type(solver).__name__),
        max_iter=max_iter,
    )
    return FixedPointResult(value=value, stats=stats)


def _solve(
    solver: FixedPointSolver,
    f: MapFn,
    z0: torch.Tensor,
    tol: float,
    max_iter: int,
    config: SolverConfig,
    warm: tuple[torch.dtype, MapFn] | None,
    *,
    project: bool,
    zero_start: bool = False,
    refinement: RefinementFn | None = None,
) -> FixedPointResult:
    """One solve: an optional low-precision warm phase, then the solver in ``z0``'s dtype.

    From zero, a map that knows ``f(0)`` starts there (one iteration, no evaluation).
    After a warm phase, a ``refinement`` (the forward map's own, or the adjoint's from the
    linearized step; ``config.warm_refine``) takes one float32 evaluation and
    low-precision corrections around it
    (:func:`~pcdeq_plugin.warm_start.refine_iterate`) before the solver. All of these
    iterations count against ``max_iter`` and are recorded in ``stats.iterations``; the
    warm phase's also in ``stats.warm_iterations``, the corrections' in
    ``stats.refine_iterations``. At
    ``max_iter = 1`` none applies: the solver alone decides the one iteration.
    """
    start = time.perf_counter()
    check_every = config.check_every
    if check_every is None and not getattr(solver, "predicts_checks", False):
        check_every = config.effective_check_every(z0.device)
    # f(0) without an evaluation: for a warm phase, or for a solver whose checks can
    # start from it (plain iteration); never at max_iter = 1
    takes_image = warm is not None or getattr(solver, "starts_from_image_of_zero", False)
    image = None
    if zero_start and isinstance(f, FixedPointMap) and max_iter > 1 and takes_image:
        image = f.image_of_zero()
    done = 0 if image is None else 1  # iterations before the warm phase
    warm_iterations = corrections = 0
    if warm is not None and max_iter - done > 1:
        dtype, warm_fn = warm
        if image is not None:
            start_low = image.to(dtype)
        else:
            start_low = torch.zeros_like(z0, dtype=dtype) if zero_start else z0.to(dtype)
        state, warm_iterations = warm_iterate(
            warm_fn,
            start_low,
            tol=config.warm_tol,
            max_iter=max_iter - done - 1,
            zero_start=zero_start,
            done=done,
        )
        z0 = state.to(z0.dtype)
        if project:  # rounding must not leave the orthant the guarantee lives in
            z0 = z0.clamp_min_(0)
        before = done + warm_iterations
        refined = None
        if config.warm_refine and refinement is not None:
            refined = _refine(refinement, z0, dtype, tol=tol, budget=max_iter - before)
        result = None
        if refined is not None:
            z0, corrections = refined.state, refined.corrections
            if project:  # towards f(z) >= 0: the certified bound still holds
                z0 = z0.clamp_min_(0)
            before += 1 + corrections  # the float32 evaluation at the warm state, and these
            if refined.residual is not None:
                result = _certified_result(solver, z0, refined.residual, tol, max_iter)
            # the refinement predicts that the next evaluation meets tol: check it
            check_every = 1 if config.check_every is None else check_every
        if result is None:
            result = solver(f, z0, tol=tol, max_iter=max_iter - before, check_every=check_every)
    elif image is not None and getattr(solver, "starts_from_image_of_zero", False):
        # the solver counts iteration 1 and places its checks as from zero
        result = solver(
            f,
            image.to(z0.dtype),
            tol=tol,
            max_iter=max_iter,
            check_every=check_every,
            from_image_of_zero=True,
        )
        before = 0
    else:
        start_at = torch.zeros_like(z0) if zero_start else z0  # z0: a template from zero
        result = solver(f, start_at, tol=tol, max_iter=max_iter, check_every=check_every)
        before = 0
    if before:
        result.stats = dataclasses.replace(
            result.stats,
            iterations=result.stats.iterations + before,
            warm_iterations=warm_iterations,
            refine_iterations=corrections,
            warm_dtype=str(warm[0]).replace("torch.", "") if warm_iterations else "",
            max_iter=max_iter,
            seconds=time.perf_counter() - start,
        )
    return result
