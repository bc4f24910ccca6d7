"""The wiring: passive registries handed their loader and validator by the catalog."""

from __future__ import annotations

import pytest

from pcdeq_plugin import catalog, plugins
from pcdeq_plugin.activation_checks import verify_activation
from pcdeq_plugin.spec_registry import Registry
from pcdeq_plugin.specs import DuplicateNameError, UnknownNameError


class Spec:
    def __init__(self, name: str, ok: bool = True) -> None:
        self.name, self.ok = name, ok


def _refuse_bad(spec: Spec) -> None:
    if not spec.ok:
        raise ValueError(f"spec {spec.name!r} refused")


def test_a_registry_asks_its_loader_before_every_lookup_and_registration() -> None:
    calls: list[str] = []
    registry: Registry[Spec] = Registry("gadget", loader=lambda: calls.append("load"))
    registry.register("a", Spec("a"))
    assert calls == ["load"]
    assert registry.names() == ["a"] and "a" in registry and len(registry) == 1
    registry.get("a")
    assert len(calls) == 5


def test_the_validator_it_is_handed_refuses_specs_and_reset_forgets_everything() -> None:
    registry: Registry[Spec] = Registry("gadget", validator=_refuse_bad, spec_type=Spec)
    with pytest.raises(ValueError, match="spec 'b' refused"):
        registry.register("b", Spec("b", ok=False))
    assert "b" not in registry
    registry.register("a", Spec("a"), provider="me")
    with pytest.raises(DuplicateNameError, match="'me' and 'you'"):
        registry.register("a", Spec("a"), provider="you")
    registry.reset()
    assert registry.names() == []
    with pytest.raises(UnknownNameError, match=r"unknown gadget 'a'; available: \(none"):
        registry.get("a")


def test_the_catalog_wires_every_registry_to_the_plugin_manager() -> None:
    registries = {
        "pcdeq_register_activations": catalog.ACTIVATIONS,
        "pcdeq_register_solvers": catalog.SOLVERS,
        "pcdeq_register_models": catalog.MODELS,
        "pcdeq_register_datasets": catalog.DATASETS,
    }
    for hook, registry in registries.items():
        assert plugins._HOOK_TARGETS[hook] is registry
        assert registry.loader is plugins.load_plugins
    assert catalog.ACTIVATIONS.validator is verify_activation


def test_the_plugin_reset_empties_the_connected_registries_through_their_public_reset(
    monkeypatch,
) -> None:
    reset: list[str] = []
    for registry in plugins._HOOK_TARGETS.values():
        monkeypatch.setattr(registry, "reset", lambda kind=registry.kind: reset.append(kind))
    plugins.reset_plugins()
    monkeypatch.undo()
    plugins.reset_plugins()  # the real reset, so the next lookup loads afresh
    assert sorted(reset) == sorted(r.kind for r in plugins._HOOK_TARGETS.values())


def test_connecting_a_hook_that_has_no_specification_is_refused() -> None:
    with pytest.raises(ValueError, match="no hook specification for pcdeq_register_gadgets"):
        plugins.connect_registries({"pcdeq_register_gadgets": Registry("gadget")})
    assert "pcdeq_register_models" in plugins._HOOK_TARGETS  # the wiring is untouched
