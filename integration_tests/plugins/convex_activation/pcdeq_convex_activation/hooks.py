"""Offers ``shifted_softplus(t) = softplus(t) - log 2``.

It is zero at 0, positive and increasing after, so it *claims* to be a pcDEQ-1 activation,
but it is convex (second derivative ``sigmoid(t) * (1 - sigmoid(t)) > 0``): pcDEQ's
uniqueness and convergence guarantees do not hold for it, and pcdeq-plugin's activation
check refuses it when the plugin loads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pcdeq_plugin import ActivationSpec, hookimpl


def shifted_softplus(t: torch.Tensor) -> torch.Tensor:
    return F.softplus(t) - math.log(2.0)


@hookimpl
def pcdeq_register_activations() -> dict[str, ActivationSpec]:
    return {
        "shifted_softplus": ActivationSpec(
            "shifted_softplus", shifted_softplus, "nonnegative", math.inf, "convex: refused"
        )
    }
