"""The torchdiffeq side of :class:`~pcdeq_baselines.node.block.ODEBlock`: method tables,
which exceptions are solver failures, and the dynamics wrappers that count function
evaluations and vector-Jacobian products into a solve record.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
from torch import nn

from pcdeq_plugin import BlockStats, SolveStats

__all__ = [
    "ADAPTIVE_METHODS",
    "ODE_METHODS",
    "CountVJP",
    "Dynamics",
    "SOLVE_FAILURES",
    "SolveRecord",
    "TrackingDynamics",
    "is_solve_failure",
    "ode_option_names",
    "supports_step_callback",
]

try:  # torchdiffeq keeps its method table private; 0.2.5 is pinned in pyproject.toml
    from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver as _Adaptive
except ImportError:  # pragma: no cover - only if torchdiffeq reorganises its internals
    _TORCHDIFFEQ_SOLVERS = {}
    _Adaptive = None

#: Every method name torchdiffeq accepts.
ODE_METHODS: tuple[str, ...] = tuple(_TORCHDIFFEQ_SOLVERS) or (
    "dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2",
    "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver",
)  # fmt: skip
#: Adaptive Runge-Kutta methods: the only ones that take ``max_num_steps``.
ADAPTIVE_METHODS: tuple[str, ...] = tuple(
    n for n, cls in _TORCHDIFFEQ_SOLVERS.items() if _Adaptive and issubclass(cls, _Adaptive)
) or ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")


# torchdiffeq reports failed solves with bare asserts (step limit, dt underflow, non-finite
# state) and a fixed-step iteration cap with RuntimeError("Reached maximum number of
# iterations ..."); any other RuntimeError is a real bug and propagates.
SOLVE_FAILURES = (AssertionError, RuntimeError)


def is_solve_failure(exc: BaseException) -> bool:
    return isinstance(exc, AssertionError) or "maximum number of iterations" in str(exc)


def ode_option_names(method: str) -> set[str] | None:
    """The ``options`` keys torchdiffeq's ``method`` reads; ``None`` if it cannot be told.

    torchdiffeq only *warns* about keys it does not know (and then ignores them), so a typo
    such as ``{"step-size": 0.1}`` would silently change nothing: collect the keyword
    parameters of the solver class and of the base classes its ``**kwargs`` reach.
    """
    cls = _TORCHDIFFEQ_SOLVERS.get(method)
    if cls is None:
        return None
    names = {"norm"}  # read by odeint itself for every method
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names - {"self", "func", "y0", "rtol", "atol", "dtype"}


def supports_step_callback(method: str) -> bool:
    cls = _TORCHDIFFEQ_SOLVERS.get(method)
    return cls is not None and "callback_step" in cls.valid_callbacks()


class SolveRecord:
    """Book-keeping of one forward call and its backward pass."""

    def __init__(self, block_stats: BlockStats) -> None:
        self.block_stats = block_stats
        self.phase = "forward"
        self.forward_nfe = 0
        self.backward_nfe = 0
        self.backward_start: float | None = None
        self.forward_converged: torch.Tensor | None = None


class CountVJP(torch.autograd.Function):
    """Identity whose backward counts one vector-Jacobian product through the dynamics.

    With ``opens=True`` it marks the block's output instead: its backward runs first (it is
    the node closest to the loss) and opens a fresh backward record.
    """

    @staticmethod
    def forward(
        ctx: Any, out: torch.Tensor, record: SolveRecord, solver: str, opens: bool
    ) -> torch.Tensor:
        ctx.record, ctx.solver, ctx.opens = record, solver, opens
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        record: SolveRecord = ctx.record
        now = time.perf_counter()
        if ctx.opens or record.backward_start is None:
            record.backward_start, record.backward_nfe = now, 0
            forward = record.forward_converged
            assert forward is not None  # the forward record exists before any backward
            # Backpropagation through the recorded evaluations always completes; a failed
            # forward solve is reported once, by the forward record.
            record.block_stats.backward = SolveStats(
                iterations=0,
                residual=torch.zeros(forward.shape, device=forward.device),
                converged=torch.ones_like(forward),
                seconds=0.0,
                unit="nfe",
                solver=f"{ctx.solver}/backprop",
            )
        if not ctx.opens:
            record.backward_nfe += 1
        stats = record.block_stats.backward
        if stats is not None:
            stats.iterations = record.backward_nfe
            stats.seconds = now - record.backward_start
        return grad, None, None, None


class Dynamics:
    """The callable handed to torchdiffeq: counts evaluations, remembers the last accepted state."""

    def __init__(self, func: nn.Module, record: SolveRecord, *, count_vjps: bool, solver: str):
        self.func = func
        self.record = record
        self.count_vjps = count_vjps
        self.solver = solver
        self.last_t: torch.Tensor | float = 0.0
        self.last_y: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.record.phase == "forward":
            self.record.forward_nfe += 1
        else:
            self.record.backward_nfe += 1
        out = self.func(t, y)
        if self.count_vjps and self.record.phase == "forward" and out.requires_grad:
            out = CountVJP.apply(out, self.record, self.solver, False)
        return out


class TrackingDynamics(Dynamics):
    """Adds torchdiffeq's ``callback_step``: called with the accepted state before each step."""

    def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.last_t = t0.detach()  # a tensor: converting here would sync a GPU every step
        self.last_y = y0
