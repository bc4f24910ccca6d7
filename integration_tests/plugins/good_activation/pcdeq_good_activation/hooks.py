"""Hook module named by the ``pcdeq`` entry point.

``sqrt1pm1(t) = sqrt(1 + t) - 1`` on ``[0, inf)``: zero at 0, positive after, increasing
and concave (second derivative ``-(1 + t)^(-3/2) / 4 < 0``), unbounded. It is a pcDEQ-1
activation (kind ``"nonnegative"``); being unbounded, a fixed point needs the recurrent
weights small enough (its slope tends to 0, so any W >= 0 works far out).
"""

from __future__ import annotations

import math

import torch

from pcdeq_plugin import ActivationSpec, hookimpl


def sqrt1pm1(t: torch.Tensor) -> torch.Tensor:
    # t / (sqrt(1 + t) + 1) equals sqrt(1 + t) - 1 without cancellation near 0
    return t / (torch.sqrt(1.0 + t) + 1.0)


@hookimpl
def pcdeq_register_activations() -> dict[str, ActivationSpec]:
    return {
        "sqrt1pm1": ActivationSpec(
            "sqrt1pm1", sqrt1pm1, "nonnegative", math.inf, "sqrt(1 + t) - 1 (example plugin)"
        )
    }
