"""The concave activation catalogue for pcDEQ layers.

Every entry is continuous, nondecreasing and concave on ``[0, inf)`` -- the only part of its
domain a pcDEQ layer ever uses, because ``W >= 0``, ``z >= 0`` and the injection is
nonnegative, so the pre-activation ``W z + u`` is nonnegative. Two kinds:

* ``"nonnegative"`` (``sigma(0) = 0``, ``sigma(t) > 0`` for ``t > 0``): pcDEQ-1. The layer
  then needs a *strictly* positive injection, otherwise ``z = 0`` is a fixed point next to a
  positive one and uniqueness is lost.
* ``"positive"`` (``sigma(0) > 0``): pcDEQ-2; a nonnegative injection suffices.

``upper_bound`` is ``sup sigma`` on ``[0, inf)``. Bounded activations always give a fixed
point. ``log1p`` is unbounded but sublinear (slope 0 at infinity), so the asymptotic map is
zero and a fixed point still exists for every ``W >= 0``; an unbounded activation with a
positive slope ``s`` at infinity would need ``s * rho(W) < 1``.

The catalogue is registered through the same hook as any plugin
(:func:`pcdeq_register_activations`) and verified numerically by the registry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activation_checks import verify_activation
from .catalog import get_activation, list_activations
from .hookspecs import hookimpl
from .specs import ActivationSpec

__all__ = [
    "BUILTIN_ACTIVATIONS",
    "VARIANT_KINDS",
    "check_variant",
    "resolve_activation",
]

#: pcDEQ variant -> the activation kind it needs
VARIANT_KINDS: dict[int, str] = {1: "nonnegative", 2: "positive"}


def _one_minus_exp(t: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(-t)


def _log1p(t: torch.Tensor) -> torch.Tensor:
    # log(1 + t) on R+; extended oddly to R- so that it is finite everywhere (a negative
    # pre-activation only occurs when the pcDEQ conditions are already violated).
    return torch.where(t >= 0, torch.log1p(t.clamp_min(0)), -torch.log1p((-t).clamp_min(0)))


def _one_plus_tanh(t: torch.Tensor) -> torch.Tensor:
    return 1.0 + torch.tanh(t)


BUILTIN_ACTIVATIONS: dict[str, ActivationSpec] = {
    spec.name: spec
    for spec in (
        # the paper's four
        ActivationSpec("tanh", torch.tanh, "nonnegative", 1.0, "tanh(t); pcDEQ-1 (paper)"),
        ActivationSpec("softsign", F.softsign, "nonnegative", 1.0, "t/(1+t); pcDEQ-1 (paper)"),
        ActivationSpec("relu6", F.relu6, "nonnegative", 6.0, "min(t, 6); pcDEQ-1 (paper)"),
        ActivationSpec("sigmoid", torch.sigmoid, "positive", 1.0, "1/(1+exp(-t)); pcDEQ-2 (paper)"),
        # further functions meeting the same conditions (not in the paper)
        ActivationSpec("hardtanh01", F.hardtanh, "nonnegative", 1.0, "min(t, 1) on R+ (hardtanh)"),
        ActivationSpec("arctan", torch.atan, "nonnegative", math.pi / 2, "arctan(t)"),
        ActivationSpec("one_minus_exp", _one_minus_exp, "nonnegative", 1.0, "1 - exp(-t)"),
        ActivationSpec(
            "log1p",
            _log1p,
            "nonnegative",
            math.inf,
            "log(1+t); unbounded but sublinear, so a fixed point exists for every W >= 0",
        ),
        ActivationSpec(
            "hardsigmoid", F.hardsigmoid, "positive", 1.0, "min((t+3)/6, 1) on R+; sigma(0)=1/2"
        ),
        ActivationSpec("one_plus_tanh", _one_plus_tanh, "positive", 2.0, "1 + tanh(t); sigma(0)=1"),
    )
}


@hookimpl
def pcdeq_register_activations() -> dict[str, ActivationSpec]:
    """The built-in catalogue, registered through the plugin hook like any plugin's."""
    return dict(BUILTIN_ACTIVATIONS)


def _names_of_kind(kind: str) -> list[str]:
    try:
        names = [name for name in list_activations() if get_activation(name).kind == kind]
    except Exception:  # registry unavailable (e.g. a broken plugin): fall back to built-ins
        names = [name for name, spec in BUILTIN_ACTIVATIONS.items() if spec.kind == kind]
    return sorted(names)


def check_variant(spec: ActivationSpec, variant: int) -> None:
    """Raise ``ValueError`` if ``spec`` cannot be used in a pcDEQ-``variant`` layer.

    Args:
        spec: The activation.
        variant: ``1`` (needs ``sigma(0) = 0``) or ``2`` (needs ``sigma(0) > 0``).

    Raises:
        ValueError: unknown variant, or the activation's kind does not match the variant;
            the message says why and lists the activations that would fit.
    """
    if variant not in VARIANT_KINDS:
        raise ValueError(f"unknown pcDEQ variant {variant!r}; choose 1 or 2")
    needed = VARIANT_KINDS[variant]
    if spec.kind == needed:
        return
    sigma0 = float(spec.fn(torch.zeros((), dtype=torch.float64)))
    fitting = ", ".join(_names_of_kind(needed))
    other = 2 if variant == 1 else 1
    if variant == 1:
        reason = (
            "pcDEQ-1 needs sigma(0) = 0 (kind 'nonnegative', used with a strictly positive "
            f"softplus injection); {spec.name!r} has sigma(0) = {sigma0:g}"
        )
    else:
        reason = (
            "pcDEQ-2 needs sigma(0) > 0 (kind 'positive'; its ReLU injection may be zero, so "
            f"sigma(0) must keep the state positive); {spec.name!r} has sigma(0) = {sigma0:g}"
        )
    raise ValueError(f"{reason}; use variant {other} or one of: {fitting}")


def resolve_activation(activation: str | ActivationSpec, variant: int) -> ActivationSpec:
    """Look an activation up by name (or take a spec) and check it fits the variant.

    An :class:`ActivationSpec` that is not registered is verified numerically first (the
    same checks the registry applies to plugins).

    Raises:
        UnknownNameError: no activation of that name; the message lists the available ones.
        ValueError: the activation fails the numerical checks or does not fit the variant.
        TypeError: ``activation`` is neither a name nor an :class:`ActivationSpec`.
    """
    if isinstance(activation, str):
        spec = get_activation(activation)
    elif isinstance(activation, ActivationSpec):
        spec = activation
        registered = activation.name in list_activations() and (
            get_activation(activation.name) is activation
        )
        if not registered:
            verify_activation(spec)
    else:
        raise TypeError(
            f"activation must be a registered name or an ActivationSpec, got {activation!r}"
        )
    check_variant(spec, variant)
    return spec
