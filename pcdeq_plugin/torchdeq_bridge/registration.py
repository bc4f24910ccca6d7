"""``register()``: idempotent, thread-safe, refusing to clobber foreign or built-in entries."""

from __future__ import annotations

from typing import Any

from ._common import (
    BRIDGE_MARK,
    DEFAULT_NORM_NAME,
    DEFAULT_SOLVER_NAME,
    LOCK,
    TORCHDEQ_BUILTINS,
    import_torchdeq,
)
from .core import pcdeq_core_class
from .norm import PcNonnegNorm
from .solver import pcdeq_solver

__all__ = ["TorchDEQRegistrationError", "register"]


class TorchDEQRegistrationError(ValueError):
    """A TorchDEQ registry entry is taken by something that is not pcdeq-plugin's."""


def _describe(obj: object) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qualname}"


def _claim(kind: str, table: dict[str, Any], key: str, ours: object, overwrite: bool) -> None:
    """Check that ``table[key]`` may hold ``ours``; raise otherwise (nothing is written)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a TorchDEQ {kind} name must be a non-empty string, got {key!r}")
    if key in TORCHDEQ_BUILTINS[kind]:
        raise TorchDEQRegistrationError(
            f"{key!r} is TorchDEQ's built-in {kind}; pcdeq-plugin never replaces it; "
            f"choose another name (built-in {kind}s: {', '.join(sorted(TORCHDEQ_BUILTINS[kind]))})"
        )
    existing = table.get(key)
    if existing is None or existing is ours or getattr(existing, BRIDGE_MARK, False):
        return  # free, or ours (possibly from before a module reload): idempotent
    if not overwrite:
        raise TorchDEQRegistrationError(
            f"TorchDEQ {kind} {key!r} is already registered to {_describe(existing)}, which is "
            f"not pcdeq-plugin's; pick another name or pass overwrite=True to replace it"
        )


def register(
    name: str = DEFAULT_SOLVER_NAME,
    *,
    norm_name: str = DEFAULT_NORM_NAME,
    overwrite: bool = False,
) -> dict[str, str]:
    """Register the pcDEQ solver, the nonnegativity norm and the pcDEQ core into TorchDEQ.

    Idempotent and thread-safe; call it in every process (at import of your model code).

    Args:
        name: TorchDEQ solver name for :func:`pcdeq_solver` (``f_solver``/``b_solver``) and
            core name for :func:`pcdeq_core_class` (``core``).
        norm_name: TorchDEQ norm name for :class:`PcNonnegNorm` (``apply_norm``).
        overwrite: Replace an entry of that name registered by someone else. TorchDEQ's
            built-in names are never replaced.

    Returns:
        The names registered, ``{"solver": name, "norm": norm_name, "core": name}``.

    Raises:
        ImportError: TorchDEQ is not importable (the message says how to install it).
        TorchDEQRegistrationError: a name is a TorchDEQ built-in, or is taken by another
            object and ``overwrite`` is false. Nothing is registered then.
    """
    torchdeq = import_torchdeq()
    solvers = torchdeq.solver._solvers
    norms = torchdeq.norm.base_norm._norm_class
    cores = torchdeq.core._core
    with LOCK:
        core = pcdeq_core_class()
        _claim("solver", solvers, name, pcdeq_solver, overwrite)
        _claim("norm", norms, norm_name, PcNonnegNorm, overwrite)
        _claim("core", cores, name, core, overwrite)
        torchdeq.solver.register_solver(name, pcdeq_solver)
        torchdeq.norm.base_norm.register_norm(norm_name, PcNonnegNorm)
        torchdeq.core.register_deq(name, core)
    return {"solver": name, "norm": norm_name, "core": name}
