"""Which layers ``pc_nonneg`` constrains, and the refusal to constrain nothing in silence.

TorchDEQ's ``apply_norm`` walks ``model.named_modules()`` and normalises a module when
``type(module) in Norm._target_modules``: an exact-type match, so a layer class it does
not know (a custom DEQ cell holding its own ``nn.Parameter``, or a subclass of
``nn.Linear``) is skipped without a word, and ``--norm_type pc_nonneg`` then trains an
unconstrained model. :class:`PcNonnegTargets` is that table for ``pc_nonneg``:

* a registered class also covers its subclasses (matched along the MRO);
* :func:`register_pc_nonneg_module` adds a custom layer type and its weight names;
* when ``apply_norm`` will constrain *nothing* in a model, or will leave signed a weight
  matrix of a layer class of the user's own (one defined outside ``torch``; filter it out
  to keep it signed on purpose), it warns (:class:`PcNonnegNotAppliedWarning`) or, with
  the config key ``pc_norm_missing='error'`` (``--pc_norm_missing error``), raises
  :class:`PcNonnegNotAppliedError`, naming those layers.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..checks import check_choice

__all__ = [
    "MISSING_POLICIES",
    "PC_NONNEG_TARGETS",
    "PcNonnegNotAppliedError",
    "PcNonnegNotAppliedWarning",
    "PcNonnegTargets",
    "register_pc_nonneg_module",
]

MISSING_POLICIES: tuple[str, ...] = ("warn", "error")


class PcNonnegNotAppliedWarning(UserWarning):
    """``apply_norm(..., 'pc_nonneg')`` constrains nothing, or skips a custom layer's weights."""


class PcNonnegNotAppliedError(TypeError):
    """As :class:`PcNonnegNotAppliedWarning`, raised under ``pc_norm_missing='error'``."""


class PcNonnegTargets(dict):
    """``{module class: (names, dims)}``; ``cls in table`` also holds for subclasses."""

    def lookup(self, module_type: type) -> tuple[Any, Any] | None:
        """``(names, dims)`` of the closest registered base of ``module_type``, or None."""
        for base in module_type.__mro__:
            if dict.__contains__(self, base):
                return self[base]
        return None

    def __contains__(self, module_type: object) -> bool:
        if not isinstance(module_type, type):
            return False
        _check_apply_norm_call(self, sys._getframe(1))
        return self.lookup(module_type) is not None


# The layers pc_nonneg constrains (``PcNonnegNorm._target_modules`` is this table): the
# recurrent weight of each, with its output dimension.
PC_NONNEG_TARGETS = PcNonnegTargets(
    {
        nn.Linear: ("weight", 0),
        nn.Conv1d: ("weight", 0),
        nn.Conv2d: ("weight", 0),
        nn.Conv3d: ("weight", 0),
        nn.ConvTranspose1d: ("weight", 1),
        nn.ConvTranspose2d: ("weight", 1),
        nn.ConvTranspose3d: ("weight", 1),
    }
)


def names_and_dims(names: Any, dims: Any) -> tuple[list[str], list[int]]:
    """Validated ``(names, dims)`` lists (a single name or dim applies to all)."""
    names_list = [names] if isinstance(names, str) else list(names)
    if not names_list or not all(isinstance(n, str) and n for n in names_list):
        raise ValueError(f"names must be a parameter name or a list of them, got {names!r}")
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims_list = [dims] * len(names_list)
    else:
        dims_list = list(dims)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims_list):
        raise ValueError(f"dims must be an int or a list of ints, got {dims!r}")
    if len(names_list) != len(dims_list):
        raise ValueError(f"names {names_list} and dims {dims_list} differ in length")
    return names_list, dims_list


def register_pc_nonneg_module(
    module_class: type[nn.Module],
    names: str | Sequence[str] = "weight",
    dims: int | Sequence[int] = 0,
) -> None:
    """Let ``apply_norm(model, 'pc_nonneg')`` constrain a layer type of your own.

    Equivalent to ``torchdeq.register_norm_module(module_class, 'pc_nonneg', names, dims)``
    but checked, and independent of the name ``pc_nonneg`` was registered under. The
    class's subclasses are covered too.

    Args:
        module_class: An ``nn.Module`` subclass whose instances own the parameters.
        names: Parameter name(s) to make nonnegative, e.g. ``"W"`` or ``["W1", "W2"]``.
        dims: Output dimension of each parameter (the per-unit norm of the ``projection``
            parametrization is taken over every other dimension); one int for all names.

    Raises:
        TypeError: ``module_class`` is not an ``nn.Module`` subclass.
        ValueError: malformed ``names``/``dims``.
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"module_class must be an nn.Module subclass, got {module_class!r}")
    names_list, dims_list = names_and_dims(names, dims)
    PC_NONNEG_TARGETS[module_class] = (
        names_list[0] if len(names_list) == 1 else names_list,
        dims_list[0] if len(dims_list) == 1 else dims_list,
    )


def _apply_norm_code() -> Any:
    module = sys.modules.get("torchdeq.norm.base_norm")
    function = getattr(module, "apply_norm", None)
    return getattr(function, "__code__", None)


def _own_parameters(module: nn.Module) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None]


def _describe(name: str, module: nn.Module, params: list[tuple[str, Any]]) -> str:
    return f"{name or '<root>'} ({type(module).__name__}: {', '.join(n for n, _ in params)})"


def _check_apply_norm_call(targets: PcNonnegTargets, frame: Any) -> None:
    """At the root of a TorchDEQ ``apply_norm`` walk, report what it will leave signed.

    ``apply_norm`` (TorchDEQ 0.1.0) tests ``type(module) in Norm._target_modules`` for
    each module it did not filter out, the root first; it never tells the norm class when
    the walk is over. So on the root's test this replays the walk (same filters) and
    reports when no module will match, or when a layer class of the user's own (defined
    outside ``torch``) holds a weight matrix the walk will not constrain. Anything else
    asking ``in`` is left alone.
    """
    code = _apply_norm_code()
    if code is None or frame.f_code is not code:
        return
    scope = frame.f_locals
    model = scope.get("model")
    if model is None or scope.get("module") is not model:
        return
    config = scope.get("args")
    policy = config.get("pc_norm_missing", "warn") if hasattr(config, "get") else "warn"
    check_choice("pc_norm_missing", policy, MISSING_POLICIES)
    base_norm = sys.modules["torchdeq.norm.base_norm"]
    prefixes, filters = scope.get("prefix_filter_out"), scope.get("filter_out")
    matched, holders, unknown, skipped = 0, [], [], []
    for name, module in model.named_modules():
        if (prefixes and base_norm._is_skip_prefix(name, prefixes)) or (
            filters and base_norm._is_skip_name(name, filters)
        ):
            skipped.append(name)
            continue
        if targets.lookup(type(module)) is not None:
            matched += 1
            continue
        params = _own_parameters(module)
        if params:
            holders.append(_describe(name, module, params))
        custom = not type(module).__module__.startswith("torch.")
        if custom and any(p.dim() >= 2 for _, p in params):
            unknown.append(_describe(name, module, params))
    if matched and not unknown:
        return
    register_hint = (
        "Register your layer type with pcdeq_plugin.torchdeq_bridge."
        "register_pc_nonneg_module(MyLayer, names='W', dims=0) before apply_norm"
    )
    if not matched:
        known = ", ".join(sorted(t.__name__ for t in targets))
        message = (
            f"apply_norm with 'pc_nonneg' found nothing to constrain in "
            f"{type(model).__name__}: no module is of a known type ({known}) or a subclass "
            f"of one. Layers holding parameters: {'; '.join(holders) or 'none'}"
            + (
                f"; skipped by filter_out/prefix_filter_out: {', '.join(skipped)}"
                if skipped
                else ""
            )
            + f". {register_hint}; training would otherwise run with unconstrained (signed) "
            "weights"
        )
    else:
        message = (
            f"apply_norm with 'pc_nonneg' constrains {matched} layer(s) of "
            f"{type(model).__name__} but leaves the weights of layer types it does not know "
            f"signed: {'; '.join(unknown)}. {register_hint}, or exclude them with "
            "filter_out= to keep them signed on purpose"
        )
    if policy == "error":
        raise PcNonnegNotAppliedError(message)
    warnings.warn(message, PcNonnegNotAppliedWarning, stacklevel=4)
