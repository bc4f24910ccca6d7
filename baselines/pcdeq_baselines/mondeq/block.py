"""The monDEQ equilibrium block: splitting solves, the Theorem-3 backward pass, alpha tuning.

:class:`MonDEQBlock` wraps a linear part from :mod:`.ops`. Forward: the splitting
solve (:func:`.splitting.solve_equilibrium`) under ``no_grad``, then one
differentiable application ``z = relu(W z* + U x + b)``, then :class:`_AdjointStep`, an
identity whose backward replaces the incoming gradient ``g`` by ``g + W^T u`` with ``u``
from the linear splitting problem (:func:`.splitting.solve_adjoint`). Both solves
write a :class:`~pcdeq_plugin.SolveStats` into ``last_stats`` (iterations, the true
per-sample residual, the stopping rule's per-sample verdict, seconds) and apply the
``on_failure`` policy, so a solve that hits its cap is always recorded and, unless told
to ignore it, announced.
"""

from __future__ import annotations

import time

import torch

from pcdeq_plugin import ImplicitBlock, SolveStats
from pcdeq_plugin.autocast import solve_without_autocast
from pcdeq_plugin.failure import enforce_failure_policy

from ..options import FAILURE_POLICIES, check_choice, check_count, check_flag, check_positive_number
from .ops import MonotoneOperator, Resolvent, State
from .splitting import (
    SplittingResult,
    check_stop_rule,
    get_splitting,
    per_sample_residual,
    relu_prox,
    solve_adjoint,
    solve_equilibrium,
)

__all__ = ["MonDEQBlock"]

#: Smallest alpha tried by the tuning (as in the paper).
_MIN_ALPHA = 1e-4


class MonDEQBlock(ImplicitBlock):
    """One monDEQ equilibrium layer: returns the state tuple ``z*`` (one tensor per tier).

    Args:
        operator: The linear part (:mod:`.ops`).
        splitting: ``"peaceman-rachford"`` (``"pr"``) or ``"forward-backward"`` (``"fb"``).
        alpha: Splitting step size; ``None`` picks 1.0 for Peaceman-Rachford (any
            ``alpha > 0`` converges) and 0.5 for forward-backward (which needs
            ``alpha < 2 m / ||I - W||^2``; 0.5 converges at initialisation, and the tuning
            lowers it as training grows ``||I - W||``).
        tol: Tolerance of the stopping rule, forward and backward (unless overridden).
        max_iter: Iteration cap, forward and backward (unless overridden).
        backward_tol: Tolerance of the backward solve (default ``tol``).
        backward_max_iter: Cap of the backward solve (default ``max_iter``).
        check_every: Test the stopping rule every this many iterations.
        stop_rule: ``"change"`` (paper) or ``"residual"`` (see :mod:`.splitting`).
        on_failure: ``"ignore"``, ``"warn"`` or ``"raise"`` for a solve that hits its cap.
        tune_alpha: Re-tune ``alpha`` during training at batch 30 and mid-epoch.
        steps_per_epoch: Training batches per epoch, to place the mid-epoch tuning
            (the dataset presets set it for batch 128; 469 = MNIST, the default).
        max_alpha: Largest ``alpha`` tried by the tuning.
        name: Block name in statistics and messages.
    """

    def __init__(
        self,
        operator: MonotoneOperator,
        *,
        splitting: str = "peaceman-rachford",
        alpha: float | None = None,
        tol: float = 1e-2,
        max_iter: int = 300,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        check_every: int = 1,
        stop_rule: str = "change",
        on_failure: str = "warn",
        tune_alpha: bool = True,
        steps_per_epoch: int = 469,
        max_alpha: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.operator = operator
        self.splitting = get_splitting(splitting)
        self.stop_rule = check_stop_rule(stop_rule)
        if alpha is None:
            alpha = 1.0 if self.splitting == "peaceman-rachford" else 0.5
        alpha = check_positive_number("alpha", alpha)
        self.tol = check_positive_number("tol", tol)
        self.max_iter = check_count("max_iter", max_iter)
        self.backward_tol = (
            check_positive_number("backward_tol", backward_tol)
            if backward_tol is not None
            else self.tol
        )
        self.backward_max_iter = (
            check_count("backward_max_iter", backward_max_iter)
            if backward_max_iter is not None
            else max_iter
        )
        self.check_every = check_count("check_every", check_every)
        self.on_failure = check_choice("on_failure", on_failure, FAILURE_POLICIES)
        self.tune_alpha_enabled = check_flag("tune_alpha", tune_alpha)
        self.steps_per_epoch = check_count("steps_per_epoch", steps_per_epoch)
        self.max_alpha = check_positive_number("max_alpha", max_alpha)
        # alpha and the training-batch counter are state: saved and restored with the weights
        self.register_buffer("_alpha", torch.tensor(float(alpha)))
        self.register_buffer("_train_batches", torch.tensor(0, dtype=torch.long))

    @property
    def alpha(self) -> float:
        return float(self._alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha.fill_(float(value))

    def after_optimizer_step(self) -> None:
        self.operator.project()

    # -- solves --------------------------------------------------------------------------
    def _solve(self, bias: State, alpha: float, resolvent: Resolvent | None):
        prox = relu_prox(self.operator.interior_masks(bias[0]))
        result = solve_equilibrium(
            self.operator,
            bias,
            prox,
            splitting=self.splitting,
            alpha=alpha,
            tol=self.tol,
            max_iter=self.max_iter,
            check_every=self.check_every,
            stop_rule=self.stop_rule,
            resolvent=resolvent,
        )
        return result, prox

    @torch.no_grad()
    def tune_alpha(self, x: torch.Tensor) -> float:
        """Re-tune ``alpha`` on the batch ``x`` as in the paper; returns the new ``alpha``.

        Starting at ``max_alpha``, ``alpha`` is halved while the forward iteration count
        does not grow; the last value before it grew is kept. If that value still hit the
        iteration cap, the previous ``alpha`` is restored.
        """
        bias = tuple(b.detach() for b in self.operator.injection(x))

        def iterations(alpha: float) -> int:
            result = self._solve(bias, alpha, None)[0]
            # a solve that failed (cap, or NaN stopping it early) counts as the full cap
            return result.iterations if bool(result.converged.all()) else self.max_iter

        alpha = self.max_alpha
        best_alpha, best = alpha, iterations(alpha)
        while alpha / 2 >= _MIN_ALPHA:
            alpha /= 2
            count = iterations(alpha)
            if count > best:
                break
            best_alpha, best = alpha, count
        if best < self.max_iter:
            self.alpha = best_alpha
        return self.alpha

    def _tuning_due(self) -> bool:
        if not (self.tune_alpha_enabled and self.training and torch.is_grad_enabled()):
            return False
        self._train_batches += 1
        batch_idx = (int(self._train_batches) - 1) % self.steps_per_epoch
        return batch_idx in (30, self.steps_per_epoch // 2) and batch_idx > 0

    def forward(self, x: torch.Tensor) -> State:
        # the FFTs, per-frequency inverses and a 1e-2 tolerance need float32: solve with
        # autocast off (the head outside the block still runs under autocast)
        return solve_without_autocast(self._forward, x)

    def _forward(self, x: torch.Tensor) -> State:
        if self._tuning_due():
            self.tune_alpha(x)
        start = time.perf_counter()
        bias = self.operator.injection(x)
        alpha = self.alpha
        with torch.no_grad():
            detached = tuple(b.detach() for b in bias)
            resolvent = (
                self.operator.resolvent(alpha) if self.splitting == "peaceman-rachford" else None
            )
            result, prox = self._solve(detached, alpha, resolvent)
        # the one differentiable application of the layer at the equilibrium
        z = prox(tuple(w + b for w, b in zip(self.operator.multiply(result.value), bias)))
        residual = per_sample_residual(tuple(t.detach() for t in z), result.value)
        stats = _record(self, result, residual, start, "forward")
        self.last_stats.forward, self.last_stats.backward = stats, None
        enforce_failure_policy(
            stats, self.on_failure, block=self.block_name, phase="forward", tol=self.tol
        )
        if any(t.requires_grad for t in z):
            z = _AdjointStep.apply(self, alpha, resolvent, *z)
        return z


def _record(
    block: MonDEQBlock, result: SplittingResult, residual: torch.Tensor, start: float, phase: str
) -> SolveStats:
    """The statistics of one splitting solve: its iterations, the true per-sample residual
    (non-finite counts as failed, whatever the stopping rule said) and its wall time."""
    return SolveStats(
        iterations=result.iterations,
        residual=residual,
        converged=result.converged & torch.isfinite(residual),
        seconds=time.perf_counter() - start,
        unit="iter",
        solver=block.splitting,
        max_iter=block.max_iter if phase == "forward" else block.backward_max_iter,
    )


class _AdjointStep(torch.autograd.Function):
    """Identity forward; backward replaces ``g`` by ``g + W^T u`` (Theorem 3)."""

    @staticmethod
    def forward(ctx, block: MonDEQBlock, alpha: float, resolvent: Resolvent | None, *z):
        ctx.block, ctx.alpha, ctx.resolvent = block, alpha, resolvent
        ctx.save_for_backward(*z)
        return tuple(t.view_as(t) for t in z)

    @staticmethod
    def backward(ctx, *grads):
        block: MonDEQBlock = ctx.block
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{block.block_name}: double backward (create_graph=True) through a monDEQ "
                "solve is not supported; the adjoint splitting is not itself differentiable"
            )
        start = time.perf_counter()
        z = ctx.saved_tensors
        op = block.operator
        active = tuple(t > 0 for t in z)  # relu' at the equilibrium (the border stays 0)
        result = solve_adjoint(
            op,
            active,
            grads,
            splitting=block.splitting,
            alpha=ctx.alpha,
            tol=block.backward_tol,
            max_iter=block.backward_max_iter,
            check_every=block.check_every,
            stop_rule=block.stop_rule,
            resolvent=ctx.resolvent,
        )
        u = result.value
        wtu = op.multiply_transpose(u)
        fu = tuple(
            torch.where(j, w + g, torch.zeros_like(w)) for j, w, g in zip(active, wtu, grads)
        )
        stats = _record(block, result, per_sample_residual(fu, u), start, "backward")
        block.last_stats.backward = stats
        enforce_failure_policy(
            stats,
            block.on_failure,
            block=block.block_name,
            phase="backward",
            tol=block.backward_tol,
        )
        return (None, None, None, *(g + w for g, w in zip(grads, wtu)))
