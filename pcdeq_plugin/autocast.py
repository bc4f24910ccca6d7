"""Running an implicit solve in float32 when the caller has autocast on.

A fixed-point or splitting solve to a 1e-2..1e-4 tolerance is not meaningful in bfloat16
or float16 (bfloat16 spacing near 1 is ~8e-3), and a backward pass re-evaluating a layer
runs *without* the caller's autocast, so low-precision states would meet float32 weights
there. Blocks that solve their own equilibrium therefore switch autocast off and solve in
float32; the layers around them still run under autocast. (Low precision is used only
where it is safe: the warm start of :mod:`pcdeq_plugin.warm_start`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["autocast_enabled", "autocast_off", "solve_without_autocast"]

T = TypeVar("T")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``False`` for a type autocast does not know)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):
        return False


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[None]:
    """A context with autocast disabled for ``device_type`` (a no-op when it is off)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def solve_without_autocast(forward: Callable[[torch.Tensor], T], x: torch.Tensor) -> T:
    """``forward(x)``; if autocast is on for ``x``'s device, ``forward(x.float())`` with it off."""
    device_type = x.device.type
    if not autocast_enabled(device_type):
        return forward(x)
    with torch.autocast(device_type=device_type, enabled=False):
        return forward(x.float())
