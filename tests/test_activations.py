"""The activation catalogue: honest entries, registration through the hook, variant pairing."""

from __future__ import annotations

import math

import pytest
import torch

import pcdeq_plugin as P
from pcdeq_plugin.activation_checks import ActivationCheckError, verify_activation
from pcdeq_plugin.activations import (
    BUILTIN_ACTIVATIONS,
    check_variant,
    pcdeq_register_activations,
    resolve_activation,
)

NAMES = sorted(BUILTIN_ACTIVATIONS)
PAPER = {
    "tanh": "nonnegative",
    "softsign": "nonnegative",
    "relu6": "nonnegative",
    "sigmoid": "positive",
}
T = torch.linspace(0, 50, 20001, dtype=torch.float64)


def test_paper_activations_present_with_their_kind() -> None:
    for name, kind in PAPER.items():
        assert BUILTIN_ACTIVATIONS[name].kind == kind
    assert {
        "hardtanh01",
        "arctan",
        "one_minus_exp",
        "log1p",
        "hardsigmoid",
        "one_plus_tanh",
    } <= set(NAMES)


def test_catalogue_is_registered_through_the_hook() -> None:
    offered = pcdeq_register_activations()
    assert set(offered) == set(NAMES)
    assert set(NAMES) <= set(P.list_activations())
    for name in NAMES:
        assert P.get_activation(name) is BUILTIN_ACTIVATIONS[name]
    providers = {P.registry.ACTIVATIONS.provider(name) for name in NAMES}
    assert providers == {"pcdeq_plugin.activations"}


@pytest.mark.parametrize("name", NAMES)
def test_entry_is_honest(name: str) -> None:
    spec = BUILTIN_ACTIVATIONS[name]
    y = spec.fn(T)
    assert y.shape == T.shape and torch.isfinite(y).all()
    # nondecreasing and concave on the grid
    assert (y.diff() >= -1e-15).all()
    assert (y.diff().diff() <= 1e-12).all()
    sigma0 = float(y[0])
    if spec.kind == "nonnegative":
        assert sigma0 == 0.0 and (y[1:] > 0).all()
        assert spec.variant == 1
    else:
        assert sigma0 > 0
        assert spec.variant == 2
    if math.isinf(spec.upper_bound):
        assert name == "log1p"
        # unbounded but sublinear: slope -> 0, so a fixed point exists for every W >= 0
        assert float(spec.fn(torch.tensor(1e6, dtype=torch.float64))) > 10
        assert float(spec.fn(torch.tensor(1e6, dtype=torch.float64))) < 1e-3 * 1e6
    else:
        assert float(y.max()) <= spec.upper_bound + 1e-12
        # the bound is the supremum, not just any bound: approached far out
        far = float(spec.fn(torch.tensor(1e7, dtype=torch.float64)))
        assert far >= spec.upper_bound * (1 - 1e-6)
    verify_activation(spec)  # the registry's own check (Task F) accepts it


@pytest.mark.parametrize("name", NAMES)
def test_variant_pairing(name: str) -> None:
    spec = BUILTIN_ACTIVATIONS[name]
    check_variant(spec, spec.variant)
    assert resolve_activation(name, spec.variant) is spec
    wrong = 2 if spec.variant == 1 else 1
    with pytest.raises(ValueError) as info:
        check_variant(spec, wrong)
    message = str(info.value)
    assert f"pcDEQ-{wrong} needs sigma(0)" in message
    assert repr(name) in message and f"use variant {spec.variant}" in message
    # the message lists activations that would fit the requested variant
    fitting = [n for n, s in BUILTIN_ACTIVATIONS.items() if s.variant == wrong]
    assert all(n in message for n in fitting)


def test_sigmoid_in_variant_1_message() -> None:
    with pytest.raises(
        ValueError, match=r"'sigmoid' has sigma\(0\) = 0.5; use variant 2 or one of: .*tanh"
    ):
        resolve_activation("sigmoid", 1)


def test_unknown_activation_lists_available() -> None:
    with pytest.raises(
        P.UnknownNameError, match=r"unknown activation 'foo'; available: .*sigmoid.*tanh"
    ):
        resolve_activation("foo", 1)


def test_unknown_variant_and_bad_type() -> None:
    with pytest.raises(ValueError, match="choose 1 or 2"):
        check_variant(BUILTIN_ACTIVATIONS["tanh"], 3)
    with pytest.raises(TypeError, match="registered name or an ActivationSpec"):
        resolve_activation(torch.tanh, 1)  # type: ignore[arg-type]


def test_unregistered_spec_is_verified() -> None:
    good = P.ActivationSpec("my_softsign", lambda t: t / (1 + t.abs()), "nonnegative", 1.0)
    assert resolve_activation(good, 1) is good
    convex = P.ActivationSpec("softplus", torch.nn.functional.softplus, "positive", math.inf)
    with pytest.raises(ActivationCheckError, match="concave"):
        resolve_activation(convex, 2)
    decreasing = P.ActivationSpec("neg", lambda t: -t, "nonnegative", 1.0)
    with pytest.raises(ActivationCheckError, match="nondecreasing|decreas"):
        resolve_activation(decreasing, 1)
