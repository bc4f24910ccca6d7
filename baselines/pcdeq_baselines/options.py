"""Option checks shared by the baseline blocks, models and factories.

Every baseline factory takes its architecture and solver settings as one flat
``**overrides`` (from Python, a JSON config or ``--model-option KEY=VALUE``); these helpers
turn a bad value into an error that names the option, the model and the valid choices, the
same way in every family, and announce failed solves the same way.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch

from pcdeq_plugin.checks import all_finite
from pcdeq_plugin.failure import announce_failure
from pcdeq_plugin.interface import FAILURE_POLICIES

__all__ = [
    "FAILURE_POLICIES",
    "announce_failure",
    "check_choice",
    "check_count",
    "check_counts",
    "check_flag",
    "check_input_shape",
    "check_overrides",
    "check_positive_number",
    "is_mnist_like",
]


def check_choice(kind: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; else ``ValueError: unknown <kind> ...; available: ...``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; available: {', '.join(choices)}")
    return value


def check_positive_number(label: str, value: Any) -> float:
    """``float(value)`` for a positive finite real number (a bool is refused: ``True`` is not 1.0)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and value > 0 and math.isfinite(value)):
        raise ValueError(f"{label} must be a positive finite number, got {value!r}")
    return float(value)


def check_count(label: str, value: Any, minimum: int = 1, *, context: str = "") -> int:
    """``value`` for an integer ``>= minimum`` (a bool is refused); ``context`` ends the message."""
    if isinstance(value, bool) or not (isinstance(value, int) and value >= minimum):
        raise ValueError(f"{label} must be an integer >= {minimum}{context}, got {value!r}")
    return value


def check_counts(label: str, values: Any, count: int | None = None) -> tuple[int, ...]:
    """A tuple of integers ``>= 1`` (``count`` of them, if given), e.g. per-tier widths."""
    items = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items)
    if not (ok and items and (count is None or len(items) == count)):
        how_many = f"{count}" if count is not None else "one or more"
        raise ValueError(f"{label} must be {how_many} integer(s) >= 1, got {values!r}")
    return items


def check_flag(label: str, value: Any) -> bool:
    """``value`` for a real bool: ``bool("False")`` is ``True``, so strings are refused."""
    if not isinstance(value, bool):
        raise ValueError(
            f"{label} must be True or False, got {value!r} ({type(value).__name__}); "
            "in JSON and on the command line write true or false"
        )
    return value


def check_overrides(model: str, overrides: Mapping[str, Any], valid: Collection[str]) -> None:
    """Refuse keyword options a factory does not know, listing the ones it does."""
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(
            f"{model}: unknown option(s) {unknown}; valid options: {', '.join(sorted(valid))}"
        )


def is_mnist_like(input_shape: tuple[int, int, int]) -> bool:
    """One channel, at most 28x28: the default sizes of the papers' MNIST models apply."""
    return input_shape[0] == 1 and max(input_shape[1:]) <= 28


def check_input_shape(x: torch.Tensor, input_shape: tuple[int, ...], model: str) -> None:
    """Refuse a batch whose per-sample shape is not the one the model was built for, or that
    holds NaN/Inf values.

    Called at the model's entry, before any module runs: a NaN reaching a training-mode
    BatchNorm would already have poisoned its running statistics.
    """
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"{model}: expected inputs of shape [B, {', '.join(map(str, input_shape))}], "
            f"got {list(x.shape)}"
        )
    if not all_finite(x):
        finite = torch.isfinite(x)
        sample = int(torch.nonzero(~finite.flatten(1).all(dim=1))[0, 0])
        raise ValueError(
            f"{model}: the input batch contains {int((~finite).sum())} NaN/Inf value(s) "
            f"(first in sample {sample}); nothing was updated -- clean or drop those inputs"
        )
