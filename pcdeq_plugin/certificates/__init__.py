"""Runtime certificates for pcDEQ blocks (pcdeq.md sections 1.6-1.8).

:func:`certify` checks, for one block and one batch of pre-injections:

(a) the **conditions** of the theory: ``W >= 0``, an activation that passes the numerical
    checks and fits the variant, the injection sign (``u > 0`` for pcDEQ-1, ``u >= 0`` for
    pcDEQ-2), finite inputs, and that a fixed point exists at all (automatic for a bounded
    activation; for an unbounded one its slope at infinity times the Collatz-Wielandt bound
    of ``rho(W)`` must be below 1) -- naming where a condition fails;
(b) the **monotone sandwich**: iterates from ``0`` rise and iterates from ``M 1`` (``M`` the
    activation's bound) fall, so together they bracket the fixed point componentwise; for an
    unbounded activation the upper sequence is skipped;
(c) the **contraction** in Thompson's metric ``d_T(a, b) = max_i |log a_i - log b_i|``:
    ``kappa = min_i g(0)_i / z*_i`` gives the local rate ``1 - kappa``; the empirical ratio
    ``d_T(z_{k+1}, z*) / d_T(z_k, z*)`` along the iteration; the bound
    ``d_T(g a, g b) <= log(lambda - (lambda - 1) gamma)`` checked at every step; and, for a
    positive bounded activation, the weight-independent bound ``1 - sigma(0) / M``
    (``1/2`` for sigmoid).

(The package is named ``certificates`` so that it does not shadow the public function
``pcdeq_plugin.certify``.) Its modules, one concept each: :mod:`.record` (what a
certificate holds), :mod:`.conditions` (the conditions of the theory, the Thompson
metric and the ``rho(W)`` bounds) and :mod:`.certifier` (the sandwich and contraction
checks of one block, and of every block of a model).

Everything runs without gradients, in float64 by default, on copies of the block's tensors.
"""

from __future__ import annotations

from .certifier import certify, certify_model
from .conditions import spectral_radius_bounds, thompson_distance
from .record import Certificate, ConditionCheck

__all__ = [
    "Certificate",
    "ConditionCheck",
    "certify",
    "certify_model",
    "spectral_radius_bounds",
    "thompson_distance",
]
