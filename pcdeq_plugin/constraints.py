"""Nonnegativity of the recurrent weight ``W`` of a pcDEQ layer.

Each scheme is a ``torch.nn.utils.parametrize`` parametrization of the recurrent module's
``weight`` (so ``parametrize.cached()`` really computes ``W`` once per solve), plus a
``project`` step the training loop applies after every optimizer step:

``"weight_norm"``
    The paper's scheme: ``W = g * v / ||v||`` per output unit/channel, with ``g`` and ``v``
    clamped to ``>= 0`` after each step. As in the official code there is no epsilon: if a
    whole row of ``v`` is clamped to zero that row of ``W`` is ``0/0 = NaN``.
``"guarded_weight_norm"``
    The same with ``||v||`` floored at ``eps``; a zero row of ``v`` gives a zero row of ``W``.
``"softplus"``
    ``W = softplus(V)`` (smooth, always ``> 0``, nothing to project). Changes the
    optimisation geometry: with the paper's tiny initial ``W`` the entries of ``V`` start
    strongly negative, where updates are close to multiplicative.
``"clamp"``
    ``W`` itself is the parameter and is clamped to ``>= 0`` (Euclidean projection).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .checks import check_positive

__all__ = [
    "CONSTRAINTS",
    "NonNegativeClamp",
    "NonNegativeConstraint",
    "NonNegativeSoftplus",
    "NonNegativeWeightNorm",
    "apply_constraint",
    "get_constraint",
    "initialize_nonnegative_",
    "project_nonnegative_",
]


class NonNegativeConstraint(nn.Module):
    """Base class: a parametrization whose value is ``>= 0`` once :meth:`project` has run."""

    #: registry name of the scheme
    scheme: str = ""

    @torch.no_grad()
    def project(self, originals: list[torch.Tensor]) -> None:
        """Project the unconstrained tensors in place after an optimizer step."""


def _row_norm(v: torch.Tensor) -> torch.Tensor:
    """Norm over every dim but the first, shaped to broadcast against ``v``."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


class NonNegativeWeightNorm(NonNegativeConstraint):
    """``W = g * v / ||v||`` per output unit/channel, with ``g, v`` projected onto ``>= 0``.

    Args:
        eps: Floor of ``||v||``. ``0`` reproduces the paper's weight normalisation exactly,
            including its NaN when a whole row of ``v`` is zero; ``eps > 0`` is the guarded
            scheme whose zero rows stay zero.
    """

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.scheme = "guarded_weight_norm" if eps > 0 else "weight_norm"

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        norm = _row_norm(v)
        if self.eps > 0:
            norm = norm.clamp_min(self.eps)
        return g * (v / norm)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # g = ||v|| so that W equals the initial weight (as legacy weight_norm does)
        return _row_norm(weight).clone(), weight.clone()

    @torch.no_grad()
    def project(self, originals: list[torch.Tensor]) -> None:
        for tensor in originals:
            tensor.clamp_(min=0)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class NonNegativeSoftplus(NonNegativeConstraint):
    """``W = softplus(V) = log(1 + exp(beta V)) / beta``: always ``> 0``, no projection needed.

    Args:
        beta: Sharpness of the softplus.
    """

    scheme = "softplus"

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw, beta=self.beta)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # inverse softplus; entries <= 0 map to the smallest representable positive weight
        tiny = torch.finfo(weight.dtype).tiny
        w = (self.beta * weight).clamp_min(tiny)
        return (w + torch.log(-torch.expm1(-w))) / self.beta

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class NonNegativeClamp(NonNegativeConstraint):
    """``W`` is its own parameter, clamped to ``>= 0`` after each optimizer step."""

    scheme = "clamp"

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.clamp_min(0)

    @torch.no_grad()
    def project(self, originals: list[torch.Tensor]) -> None:
        for tensor in originals:
            tensor.clamp_(min=0)


#: scheme name -> factory of a fresh parametrization
CONSTRAINTS: dict[str, Callable[[], NonNegativeConstraint]] = {
    "weight_norm": lambda: NonNegativeWeightNorm(eps=0.0),
    "guarded_weight_norm": lambda: NonNegativeWeightNorm(eps=1e-12),
    "softplus": lambda: NonNegativeSoftplus(beta=1.0),
    "clamp": NonNegativeClamp,
}


def get_constraint(constraint: str | NonNegativeConstraint) -> NonNegativeConstraint:
    """A fresh parametrization by scheme name (or the given instance).

    Raises:
        ValueError: unknown scheme name; the message lists the available ones.
    """
    if isinstance(constraint, NonNegativeConstraint):
        return constraint
    if isinstance(constraint, str) and constraint in CONSTRAINTS:
        return CONSTRAINTS[constraint]()
    raise ValueError(
        f"unknown constraint {constraint!r}; available: {', '.join(sorted(CONSTRAINTS))}"
    )


@torch.no_grad()
def initialize_nonnegative_(weight: torch.Tensor, scale: float = 1e-4) -> torch.Tensor:
    """The official initialisation ``U[0, 1) * sqrt(scale) / sqrt(n0 + n1)`` (in place).

    ``n0, n1`` are the first two dimensions (output and input units/channels); the kernel
    size is ignored, as in the official code.
    """
    check_positive("init scale", scale)
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims, got shape {tuple(weight.shape)}")
    return weight.uniform_().mul_(math.sqrt(scale) / math.sqrt(weight.shape[0] + weight.shape[1]))


def apply_constraint(
    module: nn.Module,
    constraint: str | NonNegativeConstraint = "weight_norm",
    *,
    name: str = "weight",
) -> NonNegativeConstraint:
    """Parametrize ``module.<name>`` so that it is nonnegative (after :func:`project_nonnegative_`).

    The current value of the weight becomes the initial ``W`` (negative entries are
    clamped first, so the constraint holds from the start).

    Returns:
        The registered parametrization.
    """
    parametrization = get_constraint(constraint)
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized")
    with torch.no_grad():
        getattr(module, name).clamp_(min=0)
    parametrize.register_parametrization(module, name, parametrization)
    return parametrization


def project_nonnegative_(module: nn.Module, *, name: str = "weight") -> None:
    """Apply the constraint's projection after an optimizer step (no-op for ``softplus``).

    Raises:
        ValueError: ``module.<name>`` carries no nonnegativity constraint.
    """
    if not parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} has no nonnegativity constraint")
    plist = module.parametrizations[name]
    constraint = next((p for p in plist if isinstance(p, NonNegativeConstraint)), None)
    if constraint is None:
        raise ValueError(f"{type(module).__name__}.{name} has no nonnegativity constraint")
    if hasattr(plist, "original"):
        originals = [plist.original]
    else:
        originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
    constraint.project(originals)
