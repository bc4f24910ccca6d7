"""Option checks shared by the baseline blocks, models and factories.

Every baseline factory takes its architecture and solver settings as one flat
``**overrides`` (from Python, a JSON config or ``--model-option KEY=VALUE``); these helpers
turn a bad value into an error that names the option, the model and the valid choices, the
same way in every family, and announce failed solves the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

# The shared checks, under the names the baseline families import: one message per
# mistake in the core, the bridge, the harness and the baselines alike.
from pcdeq_plugin.checks import (
    all_finite,
    check_choice,
    check_count,
    check_counts,
    check_flag,
    check_known_keys,
)
from pcdeq_plugin.checks import check_positive as check_positive_number
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
    "check_pool",
    "check_overrides",
    "check_positive_number",
    "is_mnist_like",
]


def check_overrides(model: str, overrides: Mapping[str, Any], valid: Collection[str]) -> None:
    """Refuse keyword options a factory does not know, listing the ones it does."""
    check_known_keys(overrides, sorted(valid), owner=model)


def is_mnist_like(input_shape: tuple[int, int, int]) -> bool:
    """One channel, at most 28x28: the default sizes of the papers' MNIST models apply."""
    return input_shape[0] == 1 and max(input_shape[1:]) <= 28


def check_pool(pool: Any, size: int) -> int:
    """``pool`` for an average-pool window of 1 to ``size`` pixels (a bool is refused)."""
    if isinstance(pool, bool) or not (isinstance(pool, int) and 1 <= pool <= size):
        raise ValueError(f"pool must be an integer between 1 and {size}, got {pool!r}")
    return pool


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
