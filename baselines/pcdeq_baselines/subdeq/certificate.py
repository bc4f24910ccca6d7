"""The SubDEQ certificate: the subhomogeneity coefficients the theory needs.

A map ``F`` on the positive cone is mu-subhomogeneous when ``|F'(z)| z <= mu F(z)``
entrywise; then it is a mu-contraction of the Thompson metric ``||log x - log y||_inf``
(reference baselines.md section 5.1). For the SubDEQ layer
``F(z) = tanh(W z) + y + c`` (``y >= 0``) this module provides the activation's
coefficient, the closed-form slope bound used by :meth:`.block.SubDEQBlock.certificate`,
and the record it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SubhomogeneityCertificate", "activation_coefficient", "tanh_slope_bound"]


def activation_coefficient(shift: float) -> float:
    """Subhomogeneity coefficient ``sup_t |t s'(t)| / s(t)`` of ``s(t) = tanh(t) + shift``.

    Computed by a golden-section search on each half-line (the ratio is unimodal there)
    to about 1e-12; e.g. 0.999 for shift 1.2 and 0.499 for shift 1.603.

    Raises:
        ValueError: ``shift <= 1`` (then ``s`` is not positive and the ratio is unbounded).
    """
    if not (isinstance(shift, (int, float)) and shift > 1 and math.isfinite(shift)):
        raise ValueError(f"shift must be a finite number > 1 (tanh + shift > 0), got {shift!r}")

    def ratio(t: float) -> float:
        return abs(t) * (1.0 - math.tanh(t) ** 2) / (math.tanh(t) + shift)

    best = 0.0
    for lo, hi in ((-40.0, 0.0), (0.0, 40.0)):
        a, b = lo, hi
        inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
        for _ in range(200):
            c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
            if ratio(c) >= ratio(d):
                b = d
            else:
                a = c
        best = max(best, ratio(0.5 * (a + b)))
    return best


def tanh_slope_bound(a: torch.Tensor) -> torch.Tensor:
    """``sup_t tanh'(t) / (tanh(t) + a)`` for ``a > 1``, in closed form: ``2 (a - sqrt(a^2 - 1))``.

    With ``u = tanh t`` the ratio is ``(1 - u^2) / (u + a)``, maximal at
    ``u = sqrt(a^2 - 1) - a``.
    """
    return 2.0 * (a - torch.sqrt(a * a - 1.0))


@dataclass(frozen=True)
class SubhomogeneityCertificate:
    """What the SubDEQ theory needs, evaluated for the current weights.

    Attributes:
        activation_coefficient: ``sup_t |t s'(t)| / s(t)`` of ``s = tanh + shift`` -- the
            layer's coefficient when ``W >= 0``.
        layer_coefficient: A rigorous upper bound on the Thompson-metric Lipschitz constant
            of ``F`` (``sup max_i (|F'(z)| z)_i / F_i(z)``) over the box ``F`` maps the cone
            into, for the given inputs (worst sample). It equals
            ``activation_coefficient + 2 max_i slope_i * min((W+ z_hi)_i, (W- z_hi)_i)``,
            where ``W+``/``W-`` are the positive/negative parts of ``W``, ``z_hi`` the top
            of the box and ``slope_i`` the largest ``tanh'(t) / F_i``: the second term is
            the price of sign cancellations in ``W z`` and vanishes for ``W >= 0``.
        threshold: 1 for the plain layer, 1/2 for the normalised one.
        guaranteed: ``layer_coefficient < threshold``: unique positive fixed point, reached
            by iteration from any positive start, linearly in the Thompson metric.
        local_coefficient: The same ratio evaluated at the last computed fixed point
            (worst sample): a *lower* bound on the layer's coefficient (``z*`` lies in the
            box), so ``local_coefficient <= layer_coefficient`` brackets it, and a local
            coefficient above the threshold shows the guarantee certainly fails; ``nan``
            before the first forward pass.
        nonnegative_weights: Whether ``W >= 0`` currently holds.
    """

    activation_coefficient: float
    layer_coefficient: float
    threshold: float
    guaranteed: bool
    local_coefficient: float
    nonnegative_weights: bool

    def summary(self) -> str:
        verdict = "guaranteed" if self.guaranteed else "NOT guaranteed"
        return (
            f"SubDEQ certificate: layer coefficient {self.layer_coefficient:.4g} vs threshold "
            f"{self.threshold:g} -> uniqueness/convergence {verdict} "
            f"(activation coefficient {self.activation_coefficient:.4g}, local coefficient at "
            f"the last fixed point {self.local_coefficient:.4g}, W >= 0: "
            f"{self.nonnegative_weights})"
        )
