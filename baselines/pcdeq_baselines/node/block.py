"""Integrating a neural ODE with torchdiffeq, with NFE statistics and non-fatal failures.

:class:`ODEBlock` integrates ``dh/dt = func(t, h)`` over ``[0, t_end]`` with any torchdiffeq
method, by ``odeint_adjoint`` (``adjoint=True``) or by backpropagating through the solver's
operations (``adjoint=False``), and records every solve in ``block.last_stats``
(unit ``"nfe"``):

* forward: evaluations of the dynamics during the forward solve;
* backward, adjoint mode: evaluations of the dynamics during the adjoint solve (each one is
  followed by one vector-Jacobian product);
* backward, direct mode: vector-Jacobian products through the dynamics, i.e. the number of
  recorded evaluations that backpropagation went through.

Failure handling (the original ANODE code lets torchdiffeq's ``AssertionError`` abort the run):

* **Forward.** If the solver raises (step limit ``max_num_steps`` exceeded, step-size
  underflow, non-finite state), the solve is recorded as failed: ``converged`` is all
  ``False`` and ``residual`` is the fraction of ``[0, t_end]`` left unintegrated. The block
  returns the **last accepted state** of the solver (reported to us through torchdiffeq's
  ``callback_step``), which is ``h(t_reached)`` with ``t_reached < t_end``; samples whose
  state is not finite fall back to ``h(0)``, so the logits stay finite. In direct mode that
  state keeps its autograd graph (the gradient is the gradient of the truncated flow); the
  backward record then counts the VJPs and says ``converged=True`` (backpropagation
  completed; the failure is reported once, by the forward record). In adjoint mode there is
  no valid adjoint, so the backward pass returns **zero** gradients for the ODE parameters
  and the input and records a backward solve with 0 NFE and ``converged=False`` (layers
  after the block still receive their ordinary gradient). The same record (0 NFE,
  ``converged=False``) is written at once when a direct-mode solve fails before its first
  step, because then no graph leads back into the block.
* **Backward (adjoint).** If the adjoint solve raises, it is recorded as a failed backward
  solve and the ODE parameters and the input receive **zero** gradients for this batch.
* Then the block applies ``on_failure``: ``"ignore"`` (only recorded), ``"warn"`` (recorded
  and a :class:`~pcdeq_plugin.ConvergenceWarning`) or ``"raise"``
  (:class:`~pcdeq_plugin.ConvergenceError`, the original behaviour).

Errors that are not solver failures (any other exception from the dynamics) propagate.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from pcdeq_plugin import BlockStats, ImplicitBlock, SolveStats

from ..options import (
    FAILURE_POLICIES,
    announce_failure,
    check_choice,
    check_count,
    check_flag,
    check_positive_number,
)
from .dynamics import (
    ADAPTIVE_METHODS,
    ODE_METHODS,
    SOLVE_FAILURES,
    CountVJP,
    Dynamics,
    SolveRecord,
    TrackingDynamics,
    is_solve_failure,
    ode_option_names,
    supports_step_callback,
)

__all__ = ["ADAPTIVE_METHODS", "FAILURE_POLICIES", "ODE_METHODS", "ODEBlock"]


class _AdjointSolve(torch.autograd.Function):
    """``odeint_adjoint`` wrapped so that a failing forward or adjoint solve never escapes.

    The forward pass builds the one-node graph of torchdiffeq's adjoint method inside
    ``enable_grad``; the backward pass differentiates through it with ``autograd.grad`` and
    catches the solver's errors there.
    """

    @staticmethod
    def forward(ctx: Any, block: ODEBlock, record: SolveRecord, h0: torch.Tensor, *params: Any):
        dyn = block._make_dynamics(record, count_vjps=False)
        ctx.block, ctx.record = block, record
        with torch.enable_grad():
            h0_leaf = h0.detach().requires_grad_(h0.requires_grad)
            ctx.h0_leaf, ctx.params = h0_leaf, params
            try:
                solution = odeint_adjoint(
                    dyn,
                    h0_leaf,
                    block._time_span(h0),
                    adjoint_params=params,
                    **block._solve_kwargs(),
                )
                ctx.h_end, ctx.failed = solution[-1], False
                return solution[-1].detach()
            except SOLVE_FAILURES as exc:
                if not is_solve_failure(exc):
                    raise
                ctx.h_end, ctx.failed = None, True
                return block._recover(record, dyn, h0, exc).detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        block: ODEBlock = ctx.block
        record: SolveRecord = ctx.record
        params: tuple[torch.Tensor, ...] = ctx.params
        batch = grad.shape[0]
        start = time.perf_counter()
        record.phase, record.backward_nfe = "backward", 0
        error: BaseException | None = None
        wrt = ((ctx.h0_leaf,) if ctx.h0_leaf.requires_grad else ()) + tuple(params)
        grads = [None] * len(wrt)
        if not ctx.failed and wrt:
            try:
                grads = torch.autograd.grad(ctx.h_end, wrt, grad, allow_unused=True)
            except SOLVE_FAILURES as exc:
                if not is_solve_failure(exc):
                    raise
                error = exc
        ok = not ctx.failed and error is None
        flags = torch.full((batch,), ok, dtype=torch.bool, device=grad.device)
        record.block_stats.backward = SolveStats(
            iterations=record.backward_nfe,
            residual=(~flags).to(torch.float32),
            converged=flags,
            seconds=time.perf_counter() - start,
            unit="nfe",
            solver=f"{block.method}/adjoint",
            max_iter=block._step_cap,
        )
        if error is not None:
            block._apply_failure_policy(f"adjoint solve failed ({error})", error)
        # Zero (not None) where nothing came back: a failed solve contributes no gradient.
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
        grad_h0 = grads.pop(0) if ctx.h0_leaf.requires_grad else None
        return (None, None, grad_h0, *grads)


class ODEBlock(ImplicitBlock):
    """Integrates ``dh/dt = func(t, h)`` over ``[0, t_end]`` with torchdiffeq.

    Args:
        func: The dynamics, ``func(t, h) -> dh/dt``.
        method: A torchdiffeq method name (see :data:`ODE_METHODS`).
        rtol: Relative tolerance (adaptive methods).
        atol: Absolute tolerance (adaptive methods).
        adjoint: Use ``odeint_adjoint`` (O(1) memory) instead of backpropagating through the
            solver's operations.
        max_num_steps: Step limit of adaptive methods; a solve that needs more is recorded
            as failed instead of aborting the run. Ignored by fixed-step methods.
        ode_options: Extra torchdiffeq options, e.g. ``{"step_size": 0.1}`` for ``rk4``.
        t_end: End of the integration interval.
        on_failure: ``"ignore"``, ``"warn"`` or ``"raise"`` after a failed solve.
        name: Block name in the statistics.
    """

    def __init__(
        self,
        func: nn.Module,
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        max_num_steps: int = 1000,
        ode_options: dict[str, Any] | None = None,
        t_end: float = 1.0,
        on_failure: str = "warn",
        name: str = "ode",
    ) -> None:
        super().__init__(name)
        self.method = check_choice("ODE method", method, ODE_METHODS)
        self.rtol = check_positive_number("rtol", rtol)
        self.atol = check_positive_number("atol", atol)
        self.t_end = check_positive_number("t_end", t_end)
        self.max_num_steps = check_count("max_num_steps", max_num_steps)
        self.adjoint = check_flag("adjoint", adjoint)
        self.on_failure = check_choice("on_failure", on_failure, FAILURE_POLICIES)
        if ode_options is not None and not isinstance(ode_options, dict):
            raise TypeError(f"ode_options must be a dict, got {ode_options!r}")
        options = dict(ode_options or {})  # never mutate the caller's dict
        if "max_num_steps" in options:
            raise ValueError("pass max_num_steps as its own argument, not inside ode_options")
        known = ode_option_names(method)
        unknown = sorted(set(options) - known) if known is not None else []
        if unknown:
            raise ValueError(
                f"ode_options {unknown} are not read by torchdiffeq's {method!r}; it reads: "
                f"{', '.join(sorted(known - {'max_num_steps'}))}"
            )
        self.func = func
        self.ode_options = options

    # -- helpers shared by both modes --------------------------------------------------
    @property
    def _step_cap(self) -> int:
        return self.max_num_steps if self.method in ADAPTIVE_METHODS else 0

    def _solve_kwargs(self) -> dict[str, Any]:
        options = dict(self.ode_options)
        if self.method in ADAPTIVE_METHODS:
            options["max_num_steps"] = self.max_num_steps
        return {"rtol": self.rtol, "atol": self.atol, "method": self.method, "options": options}

    def _time_span(self, h0: torch.Tensor) -> torch.Tensor:
        dtype = h0.dtype if h0.is_floating_point() else torch.get_default_dtype()
        return torch.tensor([0.0, self.t_end], dtype=dtype, device=h0.device)

    def _make_dynamics(self, record: SolveRecord, *, count_vjps: bool) -> Dynamics:
        cls = TrackingDynamics if supports_step_callback(self.method) else Dynamics
        return cls(self.func, record, count_vjps=count_vjps, solver=self.method)

    def _forward_stats(self, record: SolveRecord, batch: int, device: torch.device,
                       reached: torch.Tensor | None, seconds: float) -> SolveStats:  # fmt: skip
        if reached is None:  # success
            converged = torch.ones(batch, dtype=torch.bool, device=device)
            residual = torch.zeros(batch, device=device)
        else:
            converged = torch.zeros(batch, dtype=torch.bool, device=device)
            residual = (1.0 - reached / self.t_end).to(torch.float32)
        record.forward_converged = converged
        return SolveStats(
            iterations=record.forward_nfe,
            residual=residual,
            converged=converged,
            seconds=seconds,
            unit="nfe",
            solver=self.method,
            max_iter=self._step_cap,
        )

    def _recover(
        self, record: SolveRecord, dyn: Dynamics, h0: torch.Tensor, error: BaseException
    ) -> torch.Tensor:
        """The state to continue from after a failed forward solve (see the module docs)."""
        batch = h0.shape[0]
        state = dyn.last_y if dyn.last_y is not None else h0
        t_reached = float(dyn.last_t) if dyn.last_y is not None else 0.0
        finite = torch.isfinite(state.detach()).flatten(1).all(dim=1)
        shape = (batch,) + (1,) * (h0.dim() - 1)
        state = torch.where(finite.view(shape), state, h0)
        reached = torch.where(
            finite,
            torch.full((batch,), t_reached, device=h0.device),
            torch.zeros(batch, device=h0.device),
        )
        record.failure = error  # type: ignore[attr-defined]
        record.reached = reached  # type: ignore[attr-defined]
        return state

    def _apply_failure_policy(self, message: str, error: BaseException) -> None:
        announce_failure(f"{self.block_name}: {message}", self.on_failure, cause=error)

    # -- the solve ---------------------------------------------------------------------
    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        """Integrate from ``h0`` (shape ``[B, C, H, W]``) and return ``h(t_end)``."""
        stats = BlockStats(self.block_name)
        self.last_stats = stats
        record = SolveRecord(stats)
        start = time.perf_counter()
        params = tuple(p for p in self.func.parameters() if p.requires_grad)
        needs_graph = torch.is_grad_enabled() and (h0.requires_grad or bool(params))
        if self.adjoint and needs_graph:
            h_end = _AdjointSolve.apply(self, record, h0, *params)
        else:
            dyn = self._make_dynamics(record, count_vjps=needs_graph)
            try:
                h_end = odeint(dyn, h0, self._time_span(h0), **self._solve_kwargs())[-1]
            except SOLVE_FAILURES as exc:
                if not is_solve_failure(exc):
                    raise
                h_end = self._recover(record, dyn, h0, exc)
        error = getattr(record, "failure", None)
        reached = getattr(record, "reached", None)
        stats.forward = self._forward_stats(
            record, h0.shape[0], h0.device, reached, time.perf_counter() - start
        )
        if not self.adjoint and h_end.requires_grad:
            h_end = CountVJP.apply(h_end, record, self.method, True)
        elif needs_graph and not h_end.requires_grad:
            # A solve that failed before its first step returns h(0), which carries no graph
            # here: record now that no gradient flows through the block for this batch.
            stats.backward = SolveStats(
                iterations=0,
                residual=torch.ones(h0.shape[0], device=h0.device),
                converged=torch.zeros(h0.shape[0], dtype=torch.bool, device=h0.device),
                seconds=0.0,
                unit="nfe",
                solver=f"{self.method}/backprop",
            )
        if error is not None:
            self._apply_failure_policy(
                f"forward solve failed at t={float(reached.max()):.4g} after "
                f"{record.forward_nfe} evaluations ({error})",
                error,
            )
        return h_end
