"""Named registries (pcdeq_plugin.registry): list, get and build by name; clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import pcdeq_plugin
from pcdeq_plugin import (
    ActivationSpec,
    DuplicateNameError,
    FixedPointResult,
    ImplicitModel,
    ModelSpec,
    SolverSpec,
    UnknownNameError,
    build_model,
    get_activation,
    get_solver,
    list_activations,
    list_datasets,
    list_models,
    list_solvers,
)
from pcdeq_plugin.activation_checks import ActivationCheckError, verify_activation
from pcdeq_plugin.plugins import plugin_report, reset_plugins
from pcdeq_plugin.registry import ACTIVATIONS, MODELS, SOLVERS, Registry

PAPER_ACTIVATIONS = {"tanh": "nonnegative", "softsign": "nonnegative", "relu6": "nonnegative"}
PAPER_MODELS = [
    f"pcdeq-{arch}-{variant}"
    for arch in ("linear", "single-conv", "multi-conv")
    for variant in (1, 2)
]


@pytest.fixture(autouse=True)
def fresh_registries():
    """Each test starts from, and leaves behind, an unloaded plugin state."""
    reset_plugins()
    yield
    reset_plugins()


def _registered(kind: str) -> list[str]:
    """Names registered when this module is collected (plugins included)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a broken third-party plugin is test_plugins' business
        names = {"activation": list_activations, "solver": list_solvers, "model": list_models}[
            kind
        ]()
    reset_plugins()
    return names


# -- listing and lookup ----------------------------------------------------------------------


def test_lists_hold_the_builtins_sorted() -> None:
    activations = list_activations()
    assert set(PAPER_ACTIVATIONS) | {"sigmoid"} <= set(activations)
    assert activations == sorted(activations)
    assert {"fixed_point", "anderson"} <= set(list_solvers())
    assert set(PAPER_MODELS) <= set(list_models())
    assert isinstance(list_datasets(), list)


@pytest.mark.parametrize(
    ("lookup", "kind", "known"),
    [
        (get_activation, "activation", "tanh"),
        (get_solver, "solver", "fixed_point"),
        (MODELS.get, "model", "pcdeq-linear-1"),
    ],
)
def test_unknown_name_lists_the_available_ones(lookup, kind, known) -> None:
    with pytest.raises(UnknownNameError) as info:
        lookup("no-such-thing")
    message = str(info.value)
    assert message.startswith(f"unknown {kind} 'no-such-thing'; available: ")
    assert known in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_unhashable_name_is_an_unknown_name() -> None:
    with pytest.raises(UnknownNameError, match="unknown activation"):
        get_activation(["tanh"])  # type: ignore[arg-type]


def test_build_model_errors() -> None:
    with pytest.raises(
        UnknownNameError, match="unknown model 'pcdeq3'; available: .*pcdeq-linear-1"
    ):
        build_model("pcdeq3")
    with pytest.raises(UnknownNameError, match="has no preset 'imagenet'; available: .*small"):
        build_model("pcdeq-linear-1", preset="imagenet")
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("pcdeq-linear-1", (28, 28))
    # not silently truncated or passed on to torch: each names the rule and the value
    for bad in (28, (1, 28.5, 28), (1, -28, 28), (1, 0, 28), (True, 28, 28), "1x28x28"):
        with pytest.raises(ValueError, match=r"three integers >= 1, e.g. \(1, 28, 28\), got"):
            build_model("pcdeq-linear-1", bad)  # type: ignore[arg-type]
    model = build_model("pcdeq-linear-1", torch.Size([1, 4, 4]), torch.tensor(3), width=3)
    assert model.input_shape == (1, 4, 4) and model.classifier.out_features == 3
    for bad_classes in (10.0, True, "10"):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
            build_model("pcdeq-linear-1", (1, 28, 28), bad_classes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        build_model("pcdeq-linear-1", (1, 28, 28), 1)


# -- every registered entry, plugins included --------------------------------------------------


@pytest.mark.parametrize("name", _registered("activation"))
def test_every_activation(name: str) -> None:
    spec = get_activation(name)
    assert isinstance(spec, ActivationSpec) and spec.name == name
    verify_activation(spec)
    assert spec.variant == (1 if spec.kind == "nonnegative" else 2)
    at_zero = float(spec(torch.zeros(1, dtype=torch.float64)))
    assert (at_zero == 0.0) == (spec.kind == "nonnegative")
    if name in PAPER_ACTIVATIONS:
        assert spec.kind == PAPER_ACTIVATIONS[name]


@pytest.mark.parametrize("name", _registered("solver"))
def test_every_solver_solves_a_contraction(name: str) -> None:
    spec = SOLVERS.get(name)
    assert isinstance(spec, SolverSpec)
    solver = get_solver(name)
    a = torch.rand(3, 4) + 0.1
    result = solver(lambda z: torch.tanh(0.5 * z + a), torch.zeros(3, 4), tol=1e-6, max_iter=200)
    assert isinstance(result, FixedPointResult)
    z = result.value
    assert z.shape == (3, 4)
    assert torch.allclose(z, torch.tanh(0.5 * z + a), atol=1e-5)
    assert result.stats.residual.shape == (3,) and bool(result.stats.converged.all())


@pytest.mark.parametrize("name", _registered("model"))
def test_every_model_builds_by_name_with_its_small_preset(name: str) -> None:
    spec = MODELS.get(name)
    assert isinstance(spec, ModelSpec)
    assert "small" in spec.presets, f"model {name!r} lacks the 'small' preset"
    model = build_model(name, (1, 28, 28), 10, preset="small")
    assert isinstance(model, ImplicitModel)
    assert model.family == spec.family


def test_pcdeq_models_build_and_run_tiny() -> None:
    model = build_model("pcdeq-linear-1", (1, 8, 8), 3, preset="small")
    logits = model(torch.rand(2, 1, 8, 8))
    assert logits.shape == (2, 3)
    assert model.solver_stats()[0].forward is not None


# -- the Registry class itself ------------------------------------------------------------------


def _spec(name: str, fn=torch.tanh, kind: str = "nonnegative", bound: float = 1.0):
    return ActivationSpec(name, fn, kind, bound)  # type: ignore[arg-type]


def test_duplicate_names_both_providers() -> None:
    ACTIVATIONS.register("mine", _spec("mine"), provider="pkg_a")
    with pytest.raises(DuplicateNameError, match="'mine' is provided by both 'pkg_a' and 'pkg_b'"):
        ACTIVATIONS.register("mine", _spec("mine"), provider="pkg_b")
    with pytest.raises(DuplicateNameError, match="'pcdeq_plugin.activations' and 'user'"):
        ACTIVATIONS.register("tanh", _spec("tanh"))
    ACTIVATIONS.register("mine", _spec("mine"), provider="pkg_b", overwrite=True)
    assert ACTIVATIONS.provider("mine") == "pkg_b"


def test_register_validates_activations() -> None:
    with pytest.raises(ActivationCheckError, match="not concave"):
        ACTIVATIONS.register("expo", _spec("expo", torch.exp, "positive", math.inf))
    assert "expo" not in ACTIVATIONS
    with pytest.raises(
        TypeError, match="must be an instance of ActivationSpec, got builtin_function"
    ):
        ACTIVATIONS.register("fn", torch.tanh)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered as 'a' but its spec is named 'b'"):
        ACTIVATIONS.register("a", _spec("b"))
    with pytest.raises(ValueError, match="non-empty strings"):
        ACTIVATIONS.register("", _spec(""))


def test_user_registration_before_first_lookup_keeps_builtins() -> None:
    """Registering first loads the plugins, so built-ins are not blocked by the new name."""
    ACTIVATIONS.register("early_sat", _spec("early_sat", lambda t: t / (1 + t)))
    names = list_activations()
    assert "early_sat" in names and "tanh" in names
    assert all(r.status == "loaded" for r in plugin_report() if r.source == "builtin")


def test_registry_mapping_helpers() -> None:
    registry: Registry[ActivationSpec] = Registry("gadget")
    registry.register("g1", _spec("g1"), provider="me")
    assert "g1" in registry and len(registry) == 1
    assert [name for name, _ in registry.items()] == ["g1"]
    assert registry.provider("g1") == "me"
    registry.unregister("g1")
    assert "g1" not in registry
    with pytest.raises(
        UnknownNameError, match=r"unknown gadget 'g1'; available: \(none registered\)"
    ):
        registry.get("g1")


def test_public_surface_is_lazy_and_complete() -> None:
    for name in pcdeq_plugin.__all__:
        assert getattr(pcdeq_plugin, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        pcdeq_plugin.nope  # noqa: B018
