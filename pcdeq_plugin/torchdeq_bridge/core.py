"""The optional ``pcdeq`` core: TorchDEQ's sliced core started in the nonnegative orthant."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ._common import LOCK, ORTHANT_LEAVING

__all__ = ["pcdeq_core_class"]

_CORE_CLASS: type | None = None


def _clamp_nonnegative(z: Any) -> Any:
    if isinstance(z, (tuple, list)):
        return type(z)(_clamp_nonnegative(t) for t in z)
    if not isinstance(z, torch.Tensor):
        raise TypeError(
            f"z_init must be a tensor or a tuple/list of tensors, got {type(z).__name__}"
        )
    return z.clamp_min(0.0)


def pcdeq_core_class() -> type:
    """The ``DEQSliced`` subclass registered as core ``'pcdeq'`` (built on first use)."""
    global _CORE_CLASS
    with LOCK:
        if _CORE_CLASS is not None:
            return _CORE_CLASS
        from torchdeq.core import DEQSliced

        class PcDEQCore(DEQSliced):
            """TorchDEQ's sliced core, started in the nonnegative orthant for pcDEQ maps.

            ``forward(func, z_init, ...)`` clamps ``z_init`` (a tensor, or a tuple/list of
            tensors) to ``>= 0`` and otherwise behaves exactly like ``DEQSliced``; the
            initial state may also be passed as ``z_star=`` (the parent's parameter name).
            """

            __pcdeq_bridge__ = True

            def __init__(self, args: Any = None, **kwargs: Any) -> None:
                super().__init__(args, **kwargs)
                solver = self.args.get("f_solver", "fixed_point_iter")
                if solver in ORTHANT_LEAVING:
                    warnings.warn(
                        f"core 'pcdeq' with f_solver={solver!r}: its extrapolation may leave "
                        "the nonnegative orthant, where pcDEQ's convergence guarantee does not "
                        "apply; prefer f_solver='pcdeq' (or 'fixed_point_iter')",
                        RuntimeWarning,
                        stacklevel=3,
                    )

            def forward(self, func: Any, z_init: Any = None, *args: Any, **kwargs: Any) -> Any:
                if z_init is None:
                    z_init = kwargs.pop("z_star", None)
                if z_init is None:
                    raise TypeError("core 'pcdeq' needs an initial state: deq(func, z_init)")
                return super().forward(func, _clamp_nonnegative(z_init), *args, **kwargs)

        _CORE_CLASS = PcDEQCore
        return PcDEQCore
