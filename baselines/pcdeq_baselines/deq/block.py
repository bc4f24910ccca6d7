"""The unconstrained DEQ cell ``z = act(W z + b + u)`` solved through TorchDEQ.

Solving goes through ``torchdeq.get_deq``: core ``"sliced"``, implicit differentiation with
``ift=True`` (the ``autograd.Function`` variant, not ``hook_ift``), relative stopping in
both directions, Anderson by default (``solver="broyden"`` or ``"fixed_point_iter"`` by
option), one ``get_deq`` instance per block, built from keyword arguments only so no caller
object is mutated.

Initialisation (``recurrent_init``): ``"pcdeq"`` (default) draws ``W`` uniformly from
``+-sqrt(1e-4) / sqrt(n_out + n_in)``, the signed counterpart of the official pcDEQ
initialisation (same magnitude, any sign), with ``b = 0``, so both families start from
the same easy, strongly contractive cell and only training can make the unconstrained one
hard to solve. ``"torch"`` keeps PyTorch's default initialisation, whose recurrent map is
already close to non-contractive (slow solves from the first batch).

Statistics (``block.last_stats``, unit ``"iter"``):

* forward: ``iterations`` counts the block's function evaluations inside the forward
  solver (the extra differentiable step TorchDEQ appends in training is not counted);
  ``residual`` is TorchDEQ's ``info["rel_lowest"]`` per sample,
  ``||f(z) - z|| / ||f(z)||`` of the returned iterate; ``converged = residual <= tol``.
* backward: recorded from inside the backward pass. ``iterations`` counts the
  vector-Jacobian products the backward solver performed (measured by an identity
  ``autograd.Function`` inside the cell); ``residual`` is the backward solver's
  ``info["rel_lowest"]`` (relative residual of the adjoint equation ``g = J^T g + dL/dz``),
  delivered by TorchDEQ's ``backward_writer``; ``converged = residual <= backward_tol``.

A missed tolerance never stops training unless ``on_failure="raise"``.
Known TorchDEQ limit kept visible: solver options (``solver_options``, e.g. Anderson's
``m``) reach the forward solver only. TorchDEQ's inference path (``eval()`` mode) returns a
detached state; the block takes it only when no graph is wanted (``no_grad``, or nothing
upstream requires a gradient), so gradients flow in ``eval()`` mode too.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchdeq import get_deq
from torchdeq.solver import get_solver as _torchdeq_solver

from pcdeq_plugin import BlockStats, ImplicitBlock, SolveStats
from pcdeq_plugin.autocast import solve_without_autocast

from ..options import (
    FAILURE_POLICIES,
    announce_failure,
    check_choice,
    check_count,
    check_positive_number,
)

__all__ = ["ACTIVATIONS", "FAILURE_POLICIES", "RECURRENT_INITS", "SOLVERS", "UnconstrainedDEQBlock"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "relu6": F.relu6,
    "softsign": F.softsign,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "gelu": F.gelu,
}
#: TorchDEQ solvers usable in both directions. ``simple_fixed_point_iter`` is left out: it
#: records no statistics and crashes as the backward solver under IFT.
SOLVERS: tuple[str, ...] = ("anderson", "broyden", "fixed_point_iter")
RECURRENT_INITS: tuple[str, ...] = ("pcdeq", "torch")
#: Keyword options of the solvers the block sets itself (``solver_options`` may not).
_RESERVED_OPTIONS = ("tol", "max_iter", "stop_mode", "indexing")


def _solver_option_names(solver: str) -> set[str]:
    """The keyword options TorchDEQ's ``solver`` reads (it silently ignores any other)."""
    params = inspect.signature(_torchdeq_solver(solver)).parameters.values()
    named = {p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}
    return named - {"func", "x0", "return_final"}


class _Record:
    """Counts of one forward call and of the backward pass that follows it."""

    def __init__(self, stats: BlockStats) -> None:
        self.stats = stats
        self.calls = 0
        self.vjps = 0
        self.backward_start: float | None = None


class _CountVJP(torch.autograd.Function):
    """Identity on the state; its backward counts one vector-Jacobian product of the cell."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, record: _Record) -> torch.Tensor:
        ctx.record = record
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        record: _Record = ctx.record
        if record.backward_start is None:
            record.backward_start = time.perf_counter()
        record.vjps += 1
        return grad, None


def _pcdeq_magnitude_init(layer: nn.Module) -> None:
    """``W ~ U(-a, a)``, ``a = sqrt(1e-4) / sqrt(n_out + n_in)``; ``b = 0`` (see module docs)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(
            f"recurrent_init='pcdeq' needs a layer with a weight of >= 2 dims, got {type(layer).__name__}"
        )
    bound = math.sqrt(1e-4) / math.sqrt(weight.shape[0] + weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


class UnconstrainedDEQBlock(ImplicitBlock):
    """``z* = act(layer(z*) + u)`` solved by TorchDEQ, with implicit differentiation.

    Args:
        layer: The recurrent map ``W z + b`` (an ``nn.Linear`` or a shape-preserving
            ``nn.Conv2d``); its weight is unconstrained.
        activation: Name in :data:`ACTIVATIONS`.
        solver: Forward TorchDEQ solver (:data:`SOLVERS`).
        backward_solver: Backward solver; ``None`` reuses ``solver``.
        tol: Relative residual tolerance of the forward solve.
        max_iter: Iteration cap of the forward solve.
        backward_tol: Relative tolerance of the backward solve; ``None`` reuses ``tol``.
        backward_max_iter: Cap of the backward solve; ``None`` reuses ``max_iter``.
        solver_options: Extra keyword options of the forward solver (e.g. ``{"m": 5}``).
        on_failure: ``"ignore"``, ``"warn"`` or ``"raise"`` when a solve misses its tolerance.
        recurrent_init: ``"pcdeq"`` (re-initialise ``layer`` with the signed pcDEQ magnitude
            and a zero bias) or ``"torch"`` (leave ``layer`` as it is); see the module docs.
        name: Block name in the statistics.
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        activation: str = "tanh",
        solver: str = "anderson",
        backward_solver: str | None = None,
        tol: float = 1e-4,
        max_iter: int = 50,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        solver_options: dict[str, Any] | None = None,
        on_failure: str = "warn",
        recurrent_init: str = "pcdeq",
        name: str = "deq",
    ) -> None:
        super().__init__(name)
        self.recurrent_init = check_choice("recurrent_init", recurrent_init, RECURRENT_INITS)
        self.activation_name = check_choice("activation", activation, ACTIVATIONS)
        self.activation = ACTIVATIONS[activation]
        self.solver = check_choice("solver", solver, SOLVERS)
        self.backward_solver = check_choice("backward solver", backward_solver or solver, SOLVERS)
        self.tol = check_positive_number("tol", tol)
        self.backward_tol = check_positive_number(
            "backward_tol", tol if backward_tol is None else backward_tol
        )
        self.max_iter = max_iter
        self.backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
        for label, value, method in (
            ("max_iter", self.max_iter, self.solver),
            ("backward_max_iter", self.backward_max_iter, self.backward_solver),
        ):
            # TorchDEQ's Anderson returns its start point unchanged below 3 iterations.
            check_count(label, value, 3 if method == "anderson" else 1, context=f" for {method!r}")
        self.on_failure = check_choice("on_failure", on_failure, FAILURE_POLICIES)
        if solver_options is not None and not isinstance(solver_options, dict):
            raise TypeError(f"solver_options must be a dict, got {solver_options!r}")
        options = dict(solver_options or {})  # never keep (or mutate) the caller's dict
        reserved = sorted(set(_RESERVED_OPTIONS) & set(options))
        if reserved:
            raise ValueError(
                f"solver_options may not set {reserved}: use the block's own tol/max_iter arguments"
            )
        known = _solver_option_names(self.solver) - set(_RESERVED_OPTIONS)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"solver_options {unknown} are not read by TorchDEQ's {self.solver!r}; "
                f"it reads: {', '.join(sorted(known))}"
            )
        self.solver_options = options
        self.layer = layer
        if recurrent_init == "pcdeq":
            _pcdeq_magnitude_init(layer)
        self.deq = self._make_deq()

    def _make_deq(self) -> nn.Module:
        # One TorchDEQ instance per block, from keyword arguments only (a fresh config).
        return get_deq(
            core="sliced",
            ift=True,
            hook_ift=False,
            f_solver=self.solver,
            b_solver=self.backward_solver,
            f_max_iter=self.max_iter,
            b_max_iter=self.backward_max_iter,
            f_tol=self.tol,
            b_tol=self.backward_tol,
            f_stop_mode="rel",
            b_stop_mode="rel",
        )

    def __getstate__(self) -> dict[str, Any]:
        # The TorchDEQ instance holds closures pickle cannot store (torch.save(model),
        # multiprocessing); it has no tensors and is rebuilt from the block's settings.
        state = super().__getstate__()
        state["_modules"] = {k: v for k, v in state["_modules"].items() if k != "deq"}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.deq = self._make_deq()
        self.deq.train(self.training)

    def _record(self, phase: str, info: dict, iterations: int, start: float) -> SolveStats:
        """The statistics of one TorchDEQ solve (``info`` is its statistics dict); a missed
        tolerance is announced by the failure policy."""
        forward = phase == "forward"
        solver = self.solver if forward else self.backward_solver
        tol = self.tol if forward else self.backward_tol
        residual = info["rel_lowest"].detach().float()
        converged = residual <= tol  # NaN counts as not converged
        stats = SolveStats(
            iterations=iterations,
            residual=residual,
            converged=converged,
            seconds=time.perf_counter() - start,
            unit="iter",
            solver=solver,
            max_iter=self.max_iter if forward else self.backward_max_iter,
        )
        if not bool(converged.all()):
            announce_failure(
                f"{self.block_name}: {phase} solve ({solver}) missed tol {tol:g} on "
                f"{int((~converged).sum())} of {converged.numel()} samples after {iterations} "
                f"iterations (max residual {float(residual.max()):.3g})",
                self.on_failure,
                stacklevel=4,
            )
        return stats

    def _backward_writer(self, record: _Record) -> Callable[[dict], None]:
        def write(info: dict) -> None:
            start = (
                record.backward_start if record.backward_start is not None else time.perf_counter()
            )
            record.stats.backward = self._record("backward", info, record.vjps, start)
            record.vjps = 0  # a second backward through the same graph starts afresh
            record.backward_start = None

        return write

    def forward(self, injection: torch.Tensor) -> torch.Tensor:
        """Solve ``z = act(layer(z) + injection)`` from ``z = 0`` and return the fixed point.

        Under autocast the solve runs in float32 with autocast off: TorchDEQ's implicit
        backward re-evaluates the cell outside the caller's autocast, where a bfloat16 state
        would meet the float32 weights.
        """
        return solve_without_autocast(self._solve, injection)

    def _solve(self, injection: torch.Tensor) -> torch.Tensor:
        stats = BlockStats(self.block_name)
        self.last_stats = stats
        record = _Record(stats)

        def cell(z: torch.Tensor) -> torch.Tensor:
            record.calls += 1
            if z.requires_grad:  # only the IFT backward differentiates w.r.t. the state
                z = _CountVJP.apply(z, record)
            return self.activation(self.layer(z) + injection)

        # TorchDEQ's inference path returns a *detached* state, which in eval() mode would
        # silently cut every gradient through the block (input gradients, fine-tuning with
        # frozen BatchNorm). Whenever a graph is wanted, take its training path (solve, then
        # one differentiable step with the implicit backward) whatever the module's mode.
        wants_graph = torch.is_grad_enabled() and (
            injection.requires_grad or any(p.requires_grad for p in self.layer.parameters())
        )
        graph_path = self.training or wants_graph
        start = time.perf_counter()
        self.deq.train(graph_path)
        try:
            z_out, info = self.deq(
                cell,
                torch.zeros_like(injection),  # positional: DEQSliced names this argument z_star
                solver_kwargs=dict(self.solver_options),
                backward_writer=self._backward_writer(record),
            )
        finally:
            self.deq.train(self.training)
        # On that path TorchDEQ appends one differentiable step z = f(z*) after the solve.
        iterations = record.calls - (1 if graph_path else 0)
        stats.forward = self._record("forward", info, iterations, start)
        return z_out[-1]
