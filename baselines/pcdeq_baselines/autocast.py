"""Running an implicit solve in float32 when the caller has autocast on.

A fixed-point or splitting solve to a 1e-2..1e-4 tolerance is not meaningful in bfloat16
or float16, and a backward pass re-evaluating the layer runs *without* the caller's
autocast, so low-precision states would meet float32 weights there. Blocks that solve
their own equilibrium therefore switch autocast off and solve in float32; the layers
around them still run under autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["autocast_enabled", "solve_without_autocast"]

T = TypeVar("T")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``False`` for a type autocast does not know)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):
        return False


def solve_without_autocast(forward: Callable[[torch.Tensor], T], x: torch.Tensor) -> T:
    """``forward(x)``; if autocast is on for ``x``'s device, ``forward(x.float())`` with it off."""
    device_type = x.device.type
    if not autocast_enabled(device_type):
        return forward(x)
    with torch.autocast(device_type=device_type, enabled=False):
        return forward(x.float())
