"""Operator-splitting solvers of monDEQ: forward-backward and Peaceman-Rachford.

Forward problem (Winston & Kolter 2020, Theorem 1): ``z* = relu(W z* + U x + b)`` is a
zero of ``F + G`` with ``F(z) = (I - W) z - (U x + b)`` and ``G`` the normal cone of the
nonnegative orthant (plus the zero border of convolutional states), whose resolvent is
the nonlinearity itself (``prox``):

* forward-backward: ``z <- prox((1 - alpha) z + alpha (W z + U x + b))``, converges for
  ``alpha < 2 m / ||I - W||^2``;
* Peaceman-Rachford: ``u_half = 2 z - u``; ``z_half = V (u_half + alpha (U x + b))``;
  ``u = 2 z_half - u_half``; ``z = prox(u)`` with ``V = (I + alpha (I - W))^-1``;
  converges for every ``alpha > 0``.

Backward problem (Theorem 3): the gradient fed to the one differentiable application of
the layer is ``g + W^T u`` with ``u = J (W^T u + g)``, ``J = diag(relu'(.))`` in {0, 1}.
That is the *linear* monotone inclusion ``0 in (I - W^T) u + D u - g`` with
``D = (1 - J) / J``, solved by the same splitting with ``W^T``, ``V^T`` and the diagonal
prox ``u -> u + alpha g`` where ``J = 1`` and ``u -> 0`` where ``J = 0``.

Stopping (per sample, every ``check_every`` iterations):

* ``"change"`` (the paper's rule, default): ``||z_new - z|| / (||z_new|| + 1e-6)``, summed
  over the tiers of a multi-tier state as in the released code;
* ``"residual"``: the fixed-point residual of the common interface,
  ``||f(z) - z|| / (||f(z)|| + 1e-8)`` over the whole state (one extra product per check
  for Peaceman-Rachford, free for forward-backward).

The solvers return the iterate, the number of iterations, the per-sample criterion and
whether each sample met it; the caller records the true residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import MonotoneOperator, Resolvent, State

__all__ = [
    "SPLITTINGS",
    "STOP_RULES",
    "SplittingResult",
    "backward_prox",
    "get_splitting",
    "per_sample_change",
    "per_sample_residual",
    "relu_prox",
    "solve_adjoint",
    "solve_equilibrium",
]

#: Splitting names (aliases "fb" and "pr" are accepted too).
SPLITTINGS: tuple[str, ...] = ("forward-backward", "peaceman-rachford")
_ALIASES = {"fb": "forward-backward", "pr": "peaceman-rachford"}
STOP_RULES: tuple[str, ...] = ("change", "residual")

Prox = Callable[[State], State]


def get_splitting(name: str) -> str:
    """The canonical splitting name for ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in SPLITTINGS:
        raise ValueError(
            f"unknown monDEQ splitting {name!r}; available: {', '.join(SPLITTINGS)} "
            "(aliases: fb, pr)"
        )
    return canonical


def check_stop_rule(rule: str) -> str:
    if rule not in STOP_RULES:
        raise ValueError(f"unknown stop_rule {rule!r}; available: {', '.join(STOP_RULES)}")
    return rule


def _sq_norms(z: State) -> torch.Tensor:
    return sum(t.flatten(1).pow(2).sum(dim=1) for t in z)


def per_sample_residual(fz: State, z: State, eps: float = 1e-8) -> torch.Tensor:
    """``||f(z) - z|| / (||f(z)|| + eps)`` per sample over all tiers."""
    diff = _sq_norms(tuple(a - b for a, b in zip(fz, z))).sqrt()
    return diff / (_sq_norms(fz).sqrt() + eps)


def per_sample_change(new: State, old: State, eps: float = 1e-6) -> torch.Tensor:
    """The paper's stopping criterion, per sample: sum over tiers of relative changes."""
    total = 0
    for a, b in zip(new, old):
        total = total + (a - b).flatten(1).norm(dim=1) / (a.flatten(1).norm(dim=1) + eps)
    return total


def relu_prox(masks: tuple[torch.Tensor | None, ...]) -> Prox:
    """ReLU, with the border of convolutional states forced to zero."""

    def prox(v: State) -> State:
        return tuple(torch.relu(t) if m is None else torch.relu(t) * m for t, m in zip(v, masks))

    return prox


def backward_prox(active: State, g: State, alpha: float) -> Prox:
    """The prox of the backward problem for a {0, 1} Jacobian ``J`` (``active``)."""

    def prox(v: State) -> State:
        return tuple(
            torch.where(j, t + alpha * gi, torch.zeros_like(t)) for t, j, gi in zip(v, active, g)
        )

    return prox


@dataclass
class SplittingResult:
    """The last iterate, iterations done, final per-sample criterion, and its verdict."""

    value: State
    iterations: int
    criterion: torch.Tensor
    converged: torch.Tensor


def _zeros(shapes: list[tuple[int, ...]], like: torch.Tensor) -> State:
    return tuple(like.new_zeros(s) for s in shapes)


def _run(
    step: Callable[[State, State], tuple[State, State, Callable[[], torch.Tensor] | None]],
    z0: State,
    *,
    tol: float,
    max_iter: int,
    check_every: int,
    stop_rule: str,
) -> SplittingResult:
    """Generic loop: ``step(z, aux) -> (z_next, aux_next, residual_of_z or None)``."""
    z, aux = z0, z0
    crit = torch.full((z0[0].shape[0],), float("inf"), device=z0[0].device, dtype=z0[0].dtype)
    it = 0
    while it < max_iter:
        z_next, aux, residual = step(z, aux)
        it += 1
        if it % check_every == 0 or it == max_iter:
            if stop_rule == "change":
                crit = per_sample_change(z_next, z)
            else:
                crit = residual() if residual is not None else crit
            # a NaN/Inf sample can never meet the tolerance: stop rather than iterate on
            done = (crit <= tol) | ~torch.isfinite(crit)
            if bool(done.all()):
                z = z_next
                break
        z = z_next
    return SplittingResult(z, it, crit, crit <= tol)


def solve_equilibrium(
    op: MonotoneOperator,
    bias: State,
    prox: Prox,
    *,
    splitting: str,
    alpha: float,
    tol: float,
    max_iter: int,
    check_every: int = 1,
    stop_rule: str = "change",
    resolvent: Resolvent | None = None,
) -> SplittingResult:
    """Solve ``z = prox(W z + bias)`` from ``z = 0`` (call under ``torch.no_grad()``)."""
    splitting = get_splitting(splitting)
    z0 = _zeros([tuple(t.shape) for t in bias], bias[0])
    if splitting == "forward-backward":

        def fb_step(z: State, aux: State):
            wz_b = tuple(w + b for w, b in zip(op.multiply(z), bias))
            z_next = prox(tuple((1 - alpha) * zi + alpha * wi for zi, wi in zip(z, wz_b)))
            return z_next, aux, lambda: per_sample_residual(prox(wz_b), z)

        return _run(
            fb_step, z0, tol=tol, max_iter=max_iter, check_every=check_every, stop_rule=stop_rule
        )

    inverse = resolvent if resolvent is not None else op.resolvent(alpha)

    def pr_step(z: State, u: State):
        u_half = tuple(2 * zi - ui for zi, ui in zip(z, u))
        z_half = inverse.apply(tuple(uh + alpha * b for uh, b in zip(u_half, bias)))
        u_next = tuple(2 * zh - uh for zh, uh in zip(z_half, u_half))
        z_next = prox(u_next)

        def residual() -> torch.Tensor:
            fz = prox(tuple(w + b for w, b in zip(op.multiply(z_next), bias)))
            return per_sample_residual(fz, z_next)

        return z_next, u_next, residual

    result = _run(
        pr_step, z0, tol=tol, max_iter=max_iter, check_every=check_every, stop_rule=stop_rule
    )
    return result


def solve_adjoint(
    op: MonotoneOperator,
    active: State,
    grad: State,
    *,
    splitting: str,
    alpha: float,
    tol: float,
    max_iter: int,
    check_every: int = 1,
    stop_rule: str = "change",
    resolvent: Resolvent | None = None,
) -> SplittingResult:
    """Solve ``u = J (W^T u + grad)`` (``J = active``, a {0, 1} mask) from ``u = 0``."""
    splitting = get_splitting(splitting)
    v = tuple(torch.where(j, gi, torch.zeros_like(gi)) for j, gi in zip(active, grad))
    prox = backward_prox(active, v, alpha)
    u0 = _zeros([tuple(t.shape) for t in grad], grad[0])

    def adjoint_residual(u: State, wtu: State) -> torch.Tensor:
        fu = tuple(
            torch.where(j, w + gi, torch.zeros_like(w)) for j, w, gi in zip(active, wtu, grad)
        )
        return per_sample_residual(fu, u)

    if splitting == "forward-backward":

        def fb_step(u: State, aux: State):
            wtu = op.multiply_transpose(u)
            u_next = prox(tuple((1 - alpha) * ui + alpha * wi for ui, wi in zip(u, wtu)))
            return u_next, aux, lambda: adjoint_residual(u, wtu)

        return _run(
            fb_step, u0, tol=tol, max_iter=max_iter, check_every=check_every, stop_rule=stop_rule
        )

    inverse = resolvent if resolvent is not None else op.resolvent(alpha)

    def pr_step(z: State, u: State):
        u_half = tuple(2 * zi - ui for zi, ui in zip(z, u))
        z_half = inverse.apply_transpose(u_half)
        u_next = tuple(2 * zh - uh for zh, uh in zip(z_half, u_half))
        z_next = prox(u_next)
        return z_next, u_next, lambda: adjoint_residual(z_next, op.multiply_transpose(z_next))

    return _run(
        pr_step, u0, tol=tol, max_iter=max_iter, check_every=check_every, stop_rule=stop_rule
    )
