"""Numerical verification of pcDEQ activations (pcdeq_plugin.activation_checks)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from pcdeq_plugin import ActivationSpec
from pcdeq_plugin.activation_checks import (
    DEFAULT_GRIDS,
    ActivationCheckError,
    verify_activation,
)


def _builtin_specs() -> dict[str, ActivationSpec]:
    """The catalogue as the built-in module offers it through its hook (no plugin loading)."""
    module = importlib.import_module("pcdeq_plugin.activations")
    return module.pcdeq_register_activations()


BUILTINS = _builtin_specs()


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_activation_passes(name: str) -> None:
    spec = BUILTINS[name]
    assert verify_activation(spec) is spec


def test_paper_activations_are_in_the_catalogue() -> None:
    assert {"tanh", "softsign", "relu6", "sigmoid"} <= set(BUILTINS)
    assert BUILTINS["sigmoid"].kind == "positive"


@pytest.mark.parametrize(
    ("name", "fn", "kind", "bound"),
    [
        ("min_t_1", lambda t: torch.clamp(t, max=1.0), "nonnegative", 1.0),  # kink at 1
        ("relu6_again", F.relu6, "nonnegative", 6.0),  # kink at 6
        ("hard_sigmoid", F.hardsigmoid, "positive", 1.0),  # kink at 3
        ("sqrt1p", lambda t: torch.sqrt(1.0 + t) - 1.0, "nonnegative", math.inf),
        ("saturating", lambda t: t / (1.0 + t), "nonnegative", 1.0),
        ("log1p_again", torch.log1p, "nonnegative", math.inf),
        ("identity", lambda t: t.clone(), "nonnegative", math.inf),  # linear is concave
        ("constant_positive", lambda t: torch.ones_like(t) + 0 * t, "positive", 1.0),
        ("loose_bound", torch.tanh, "nonnegative", 10.0),  # bound need not be attained
    ],
)
def test_concave_functions_with_kinks_pass(name, fn, kind, bound) -> None:
    verify_activation(ActivationSpec(name, fn, kind, bound))


def _refusal(fn, kind: str = "nonnegative", bound: float = math.inf) -> ActivationCheckError:
    with pytest.raises(ActivationCheckError) as info:
        verify_activation(ActivationSpec("candidate", fn, kind, bound))
    assert "'candidate'" in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        (F.softplus, "positive"),
        (torch.exp, "positive"),
        (lambda t: t * t, "nonnegative"),
        (torch.expm1, "nonnegative"),
    ],
    ids=["softplus", "exp", "square", "expm1"],
)
def test_convex_functions_are_refused(fn, kind) -> None:
    error = _refusal(fn, kind)
    assert error.condition == "concave"
    assert "not concave on [0, inf): second difference" in str(error)
    assert error.t is not None and error.t >= 0


def test_convex_kink_is_found() -> None:
    # t + relu(t - 2): concave everywhere except the upward kink at 2
    error = _refusal(lambda t: t + F.relu(t - 2.0))
    assert error.condition == "concave"
    assert error.t == pytest.approx(2.0, abs=1e-3)


def test_decreasing_function_is_refused() -> None:
    error = _refusal(lambda t: -t)
    assert error.condition == "nondecreasing"
    assert "not nondecreasing" in str(error)


def test_bump_is_refused_as_not_nondecreasing() -> None:
    # rises then falls: concave, sigma(0) = 0, but decreasing after t = 1
    error = _refusal(lambda t: t - 0.5 * t * t)
    assert error.condition == "nondecreasing"
    assert error.t == pytest.approx(1.0, abs=1e-2)


def test_sigma0_nonzero_claimed_nonnegative_is_refused() -> None:
    error = _refusal(torch.sigmoid, "nonnegative", 1.0)
    assert error.condition == "class"
    assert "sigma(0) = 0.5" in str(error) and "'positive'" in str(error)
    assert error.t == 0.0


def test_sigma0_zero_claimed_positive_is_refused() -> None:
    error = _refusal(torch.tanh, "positive", 1.0)
    assert error.condition == "class"
    assert "sigma(0) = 0" in str(error)


def test_zero_on_an_interval_is_refused_for_nonnegative_kind() -> None:
    # min(t, 0): concave, nondecreasing, sigma(0) = 0, but not positive for t > 0
    error = _refusal(lambda t: torch.clamp(t, max=0.0))
    assert error.condition == "class"
    assert "sigma(t) > 0 for t > 0" in str(error)


def test_exceeded_bound_is_refused() -> None:
    error = _refusal(torch.tanh, "nonnegative", 0.9)
    assert error.condition == "bound"
    assert "exceeds its claimed upper bound 0.9" in str(error)
    assert math.tanh(error.t) > 0.9


def test_bound_exceeded_only_far_out_is_found() -> None:
    error = _refusal(torch.log1p, "nonnegative", 12.0)  # log1p passes 12 near t = 1.6e5
    assert error.condition == "bound"
    assert error.t > DEFAULT_GRIDS[-1].stop


def test_nan_producing_function_is_refused() -> None:
    error = _refusal(lambda t: torch.log(t - 1.0))  # NaN below 1, -inf at 1
    assert error.condition == "finite"
    assert "non-finite value nan at t = 0" in str(error)


def test_overflow_to_inf_is_refused() -> None:
    error = _refusal(lambda t: torch.where(t > 1e6, torch.full_like(t, math.inf), t / (1 + t)))
    assert error.condition == "finite"
    assert error.t > 1e6


@pytest.mark.parametrize(
    ("fn", "needle"),
    [
        (lambda t: t.sum(), "not shape-preserving"),
        (lambda t: t[:-1], "not shape-preserving"),
        (lambda t: t.unsqueeze(0), "not shape-preserving"),
        (lambda t: t / (1.0 + t.max()), "not elementwise"),
        (lambda t: torch.tanh(t.float()), "changes the dtype"),
        (lambda t: t.clamp_(max=1.0), "modifies its input in place"),
        (lambda t: t.tolist(), "must return a torch.Tensor"),
    ],
    ids=["sum", "drop", "unsqueeze", "normalise", "float32", "inplace", "list"],
)
def test_non_elementwise_functions_are_refused(fn, needle) -> None:
    error = _refusal(fn)
    assert error.condition == "elementwise"
    assert needle in str(error)


def test_function_that_raises_is_reported() -> None:
    def broken(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    error = _refusal(broken)
    assert error.condition == "callable"
    assert "RuntimeError: boom" in str(error)


def test_non_differentiable_function_is_refused() -> None:
    error = _refusal(lambda t: torch.tanh(t).detach())
    assert error.condition == "differentiable"


def test_error_is_a_value_error_and_public() -> None:
    import pcdeq_plugin

    assert issubclass(pcdeq_plugin.ActivationCheckError, ValueError)
    assert pcdeq_plugin.verify_activation is verify_activation


def test_non_spec_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ActivationSpec"):
        verify_activation(torch.tanh)  # type: ignore[arg-type]


@pytest.mark.parametrize("bound", [0.0, -1.0, -math.inf, math.nan])
def test_spec_refuses_a_nonpositive_bound(bound: float) -> None:
    with pytest.raises(ValueError, match="upper_bound"):
        ActivationSpec("x", torch.tanh, "nonnegative", bound)


def test_spec_refuses_unknown_kind() -> None:
    with pytest.raises(ValueError, match="choose one of nonnegative, positive"):
        ActivationSpec("x", torch.tanh, "concave", 1.0)  # type: ignore[arg-type]


def test_grid_is_fine_enough_for_kinks() -> None:
    """The first grid resolves kinks to 2.5e-4 and the coarse ones reach 1e4."""
    assert DEFAULT_GRIDS[0].stop / (DEFAULT_GRIDS[0].points - 1) <= 2.5e-4
    assert DEFAULT_GRIDS[-1].stop >= 1e4
    for grid in DEFAULT_GRIDS:
        t = grid.tensor()
        assert t.dtype == torch.float64 and t[0] == 0.0
