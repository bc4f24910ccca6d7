"""The plugin loader (pcdeq_plugin.plugins): lazy, isolated, switchable, strict on request.

Entry-point plugins are simulated by fake distributions (a module plus a ``*.dist-info``
directory with ``entry_points.txt``) on ``sys.path``, so discovery goes through the real
``importlib.metadata`` machinery.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import pcdeq_plugin
from pcdeq_plugin import plugins
from pcdeq_plugin.plugins import (
    PluginError,
    PluginWarning,
    add_plugin,
    get_plugin_manager,
    load_plugins,
    plugin_report,
    reset_plugins,
)
from pcdeq_plugin.registry import ACTIVATIONS, MODELS, SOLVERS

ENV_VARS = (
    "PCDEQ_DISABLE_PLUGIN_AUTOLOAD",
    "PCDEQ_PLUGINS",
    "PCDEQ_BLOCK_PLUGINS",
    "PCDEQ_STRICT_PLUGINS",
)
_counter = itertools.count()

GOOD_SOURCE = """
import torch
from pcdeq_plugin import ActivationSpec, hookimpl

@hookimpl
def pcdeq_register_activations():
    fn = lambda t: t / (1.0 + t)
    return {"{act}": ActivationSpec("{act}", fn, "nonnegative", 1.0, "t/(1+t)")}
"""


@pytest.fixture
def clean(monkeypatch):
    """No plugin switches set, the installed baselines blocked, fresh state before and after."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PCDEQ_BLOCK_PLUGINS", "pcdeq_baselines")
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch, clean):
    """``make_dist(dist, {entry point: source})`` writes a fake installed distribution.

    Each entry point gets its own uniquely named module; returns ``{entry point: module}``.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def factory(dist: str, entry_points: dict[str, str], *, ep_names: dict[str, str] | None = None):
        modules = {}
        lines = ["[pcdeq]"]
        for ep, source in entry_points.items():
            module = f"fake_pcdeq_plugin_{next(_counter)}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            modules[ep] = module
            created.append(module)
            lines.append(f"{(ep_names or {}).get(ep, ep)} = {module}")
        info = tmp_path / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        return modules

    yield factory
    for module in created:
        sys.modules.pop(module, None)


def _record(name: str):
    return next(r for r in plugin_report() if r.name == name)


def _good(act: str) -> str:
    return GOOD_SOURCE.replace("{act}", act)


# -- laziness and built-ins ------------------------------------------------------------------


def test_import_loads_no_plugin() -> None:
    code = (
        "import sys, pcdeq_plugin, pcdeq_plugin.plugins as p; "
        "print(p._state.loaded, 'pcdeq_plugin.models' in sys.modules, "
        "'pcdeq_baselines' in sys.modules, 'torchdeq' in sys.modules); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torchdeq', 'torchdiffeq', 'torchvision', 'matplotlib', 'pcdeq_baselines') "
        "or m.startswith('pcdeq_plugin.bench')); print(heavy or 'none'); "
        "pcdeq_plugin.list_solvers(); print(p._state.loaded)"
    )
    env = {**os.environ, "PCDEQ_BLOCK_PLUGINS": "pcdeq_baselines"}  # keep the child cheap
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False", "False", "none", "True"]


def test_builtins_register_through_the_hooks(clean) -> None:
    assert "tanh" in pcdeq_plugin.list_activations()
    manager = get_plugin_manager()
    for module in plugins.BUILTIN_MODULES:
        assert manager.has_plugin(module)
        record = _record(module)
        assert record.source == "builtin" and record.status == "loaded"
    results = manager.hook.pcdeq_register_activations()
    offered = {name for result in results for name in result}
    assert {"tanh", "softsign", "relu6", "sigmoid"} <= offered
    assert ACTIVATIONS.provider("tanh") == "pcdeq_plugin.activations"
    assert SOLVERS.provider("fixed_point") == "pcdeq_plugin.solvers"
    assert MODELS.provider("pcdeq-linear-1") == "pcdeq_plugin.models"


def test_loading_is_idempotent_and_thread_safe(clean) -> None:
    results: list[list[str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(pcdeq_plugin.list_activations()))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    load_plugins()
    names = [r.name for r in plugin_report()]
    assert len(names) == len(set(names))  # every plugin loaded exactly once


# -- entry-point plugins ---------------------------------------------------------------------


def test_good_plugin_is_loaded_and_named(make_dist) -> None:
    make_dist("good-dist", {"good": _good("good_sat")})
    assert "good_sat" in pcdeq_plugin.list_activations()
    assert ACTIVATIONS.provider("good_sat") == "good"
    record = _record("good")
    assert record.status == "loaded" and record.distribution == "good-dist"
    assert record.provides == {"activation": ["good_sat"]}


def test_import_failure_is_reported_and_others_load(make_dist) -> None:
    make_dist("broken-dist", {"broken": "raise ImportError('missing dependency xyz')\n"})
    make_dist("fine-dist", {"fine": _good("fine_sat")})
    with pytest.warns(PluginWarning) as caught:
        names = pcdeq_plugin.list_activations()
    assert "fine_sat" in names and "tanh" in names
    text = " ".join(str(w.message) for w in caught)
    assert "'broken'" in text and "broken-dist" in text and "missing dependency xyz" in text
    record = _record("broken")
    assert record.status == "failed" and "ImportError" in record.errors[0]


def test_hook_that_raises_is_reported_and_others_load(make_dist) -> None:
    make_dist(
        "raising-dist",
        {
            "raising": """
            from pcdeq_plugin import hookimpl

            @hookimpl
            def pcdeq_register_models():
                raise RuntimeError("model zoo offline")
            """
        },
    )
    make_dist("fine-dist", {"fine": _good("fine_sat2")})
    with pytest.warns(
        PluginWarning, match=r"pcdeq_register_models\(\) raised RuntimeError: model zoo"
    ):
        assert "fine_sat2" in pcdeq_plugin.list_activations()
    assert _record("raising").status == "failed"
    assert "pcdeq-linear-1" in pcdeq_plugin.list_models()


def test_bad_return_values_are_reported(make_dist) -> None:
    make_dist(
        "odd-dist",
        {
            "odd": """
            from pcdeq_plugin import hookimpl

            @hookimpl
            def pcdeq_register_solvers():
                return ["not", "a", "dict"]

            @hookimpl
            def pcdeq_register_models():
                return {"not-a-spec": object()}
            """
        },
    )
    with pytest.warns(PluginWarning) as caught:
        pcdeq_plugin.list_models()
    text = " ".join(str(w.message) for w in caught)
    assert "pcdeq_register_solvers() must return a dict {name: spec}, got list" in text
    assert (
        "model 'not-a-spec' refused: model 'not-a-spec' must be an instance of ModelSpec, got object"
        in text
    )
    assert "not-a-spec" not in pcdeq_plugin.list_models()


def test_convex_activation_from_a_plugin_is_refused(make_dist) -> None:
    make_dist(
        "convex-dist",
        {
            "convex": """
            import math, torch
            from pcdeq_plugin import ActivationSpec, hookimpl

            @hookimpl
            def pcdeq_register_activations():
                return {"softplus_bad": ActivationSpec(
                    "softplus_bad", torch.nn.functional.softplus, "positive", math.inf)}
            """
        },
    )
    with pytest.warns(
        PluginWarning, match=r"'convex'.*'softplus_bad'.*not concave on \[0, inf\)"
    ) as caught:
        names = pcdeq_plugin.list_activations()
    assert "softplus_bad" not in names and "tanh" in names
    texts = [str(w.message) for w in caught]
    # the refusal is said once, not "activation 'x' refused: activation 'x' refused: ..."
    assert all(t.count("'softplus_bad' refused") == 1 for t in texts if "softplus_bad" in t)


def test_duplicate_spec_name_names_both_providers(make_dist) -> None:
    make_dist("first-dist", {"first": _good("shared_sat")})
    make_dist("second-dist", {"second": _good("shared_sat")})
    with pytest.warns(PluginWarning, match="provided by both") as caught:
        pcdeq_plugin.list_activations()
    text = str(caught[0].message)
    assert "'first'" in text and "'second'" in text


def test_duplicate_builtin_name_is_refused(make_dist) -> None:
    make_dist("shadow-dist", {"shadow": _good("tanh")})
    with pytest.warns(PluginWarning, match="'pcdeq_plugin.activations' and 'shadow'"):
        pcdeq_plugin.list_activations()
    assert ACTIVATIONS.provider("tanh") == "pcdeq_plugin.activations"


def test_duplicate_entry_point_names_across_distributions(make_dist) -> None:
    make_dist("alpha-dist", {"acts": _good("alpha_sat")})
    make_dist("beta-dist", {"acts": _good("beta_sat")})
    with pytest.warns(PluginWarning, match="entry-point name 'acts' is also used by") as caught:
        names = pcdeq_plugin.list_activations()
    text = str(caught[0].message)
    assert "alpha-dist" in text and "beta-dist" in text
    assert ("alpha_sat" in names) != ("beta_sat" in names)  # exactly one loaded, and said so
    statuses = sorted(r.status for r in plugin_report() if r.name == "acts")
    assert statuses == ["loaded", "skipped"]


# -- switches ----------------------------------------------------------------------------------


def test_disable_autoload(make_dist, monkeypatch) -> None:
    make_dist("auto-dist", {"auto": "raise RuntimeError('must not be imported')\n"})
    monkeypatch.setenv("PCDEQ_DISABLE_PLUGIN_AUTOLOAD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = pcdeq_plugin.list_activations()
    assert "tanh" in names  # built-ins always load
    assert _record("auto").status == "blocked"


def test_allowlist_with_autoload_disabled(make_dist, monkeypatch) -> None:
    make_dist("wanted-dist", {"wanted": _good("wanted_sat")})
    make_dist("other-dist", {"other": _good("other_sat")})
    monkeypatch.setenv("PCDEQ_DISABLE_PLUGIN_AUTOLOAD", "true")
    monkeypatch.setenv("PCDEQ_PLUGINS", "wanted")
    names = pcdeq_plugin.list_activations()
    assert "wanted_sat" in names and "other_sat" not in names


def test_allowlist_alone_is_exclusive(make_dist, monkeypatch) -> None:
    make_dist("wanted-dist", {"wanted": _good("wanted_sat3")})
    make_dist("other-dist", {"other": _good("other_sat3")})
    monkeypatch.setenv("PCDEQ_PLUGINS", "wanted")
    names = pcdeq_plugin.list_activations()
    assert "wanted_sat3" in names and "other_sat3" not in names
    assert _record("other").status == "blocked"


def test_allowlist_naming_a_missing_plugin_warns(make_dist, monkeypatch) -> None:
    make_dist("wanted-dist", {"wanted": _good("wanted_sat2")})
    monkeypatch.setenv("PCDEQ_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PCDEQ_PLUGINS", "wanted,wantd")
    with pytest.warns(
        PluginWarning, match="PCDEQ_PLUGINS names plugin.s. wantd.*available.*wanted"
    ):
        assert "wanted_sat2" in pcdeq_plugin.list_activations()


def test_blocklist(make_dist, monkeypatch) -> None:
    make_dist("blocked-dist", {"blocked": "raise RuntimeError('must not be imported')\n"})
    make_dist("fine-dist", {"fine": _good("fine_sat3")})
    monkeypatch.setenv("PCDEQ_BLOCK_PLUGINS", "pcdeq_baselines, blocked")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "fine_sat3" in pcdeq_plugin.list_activations()
    assert _record("blocked").status == "blocked"


def test_strict_mode_raises_and_leaves_a_clean_state(make_dist, monkeypatch) -> None:
    make_dist("broken-dist", {"broken": "raise ImportError('missing dependency xyz')\n"})
    monkeypatch.setenv("PCDEQ_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'broken' .distribution broken-dist.*missing dependency"):
        pcdeq_plugin.list_activations()
    assert not plugins._state.loaded
    assert not plugins._state.records and len(ACTIVATIONS._items) == 0  # rolled back
    monkeypatch.setenv("PCDEQ_STRICT_PLUGINS", "0")
    with pytest.warns(PluginWarning):
        assert "tanh" in pcdeq_plugin.list_activations()  # a clean retry, no duplicate errors


def test_strict_argument_overrides_environment(make_dist) -> None:
    make_dist("raising-dist", {"raising": "raise ValueError('bad plugin')\n"})
    with pytest.raises(PluginError, match="bad plugin"):
        load_plugins(strict=True)


def test_check_pending_catches_a_misspelt_hook_in_strict_mode(make_dist, monkeypatch) -> None:
    misspelt = """
    import torch
    from pcdeq_plugin import ActivationSpec, hookimpl

    @hookimpl
    def pcdeq_register_activation():  # missing "s"
        return {}
    """
    make_dist("typo-dist", {"typo": misspelt})
    monkeypatch.setenv("PCDEQ_STRICT_PLUGINS", "yes")
    with pytest.raises(PluginError, match="unknown hook 'pcdeq_register_activation'.*did you mean"):
        pcdeq_plugin.list_activations()


def test_misspelt_hook_warns_once_when_not_strict(make_dist) -> None:
    make_dist(
        "typo-dist",
        {
            "typo": """
            from pcdeq_plugin import hookimpl

            @hookimpl
            def pcdeq_register_model():
                return {}
            """
        },
    )
    with pytest.warns(PluginWarning, match="'pcdeq_register_model'.*'pcdeq_register_models'"):
        pcdeq_plugin.list_models()
    assert _record("typo").status == "failed"

    class Extra:
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same typo is not reported again
        add_plugin(Extra(), "extra")


def test_hook_with_wrong_arguments_is_reported(make_dist) -> None:
    make_dist(
        "args-dist",
        {
            "args": """
            from pcdeq_plugin import hookimpl

            @hookimpl
            def pcdeq_register_models(config):
                return {}
            """
        },
    )
    with pytest.warns(PluginWarning, match="'args'.*could not be registered"):
        pcdeq_plugin.list_models()
    assert _record("args").status == "failed"


# -- add_plugin and reset ---------------------------------------------------------------------------


def test_add_plugin_is_idempotent_and_refuses_a_different_object(clean) -> None:
    import math

    import torch

    class Extra:
        @pcdeq_plugin.hookimpl
        def pcdeq_register_activations(self):
            return {
                "extra_sat": pcdeq_plugin.ActivationSpec(
                    "extra_sat", lambda t: t / (2.0 + t), "nonnegative", 1.0
                ),
                "extra_bad": pcdeq_plugin.ActivationSpec(
                    "extra_bad", torch.exp, "positive", math.inf
                ),
            }

    extra = Extra()
    with pytest.warns(PluginWarning, match="'extra_bad' refused.*not concave"):
        record = add_plugin(extra, "extra")
    assert record.provides == {"activation": ["extra_sat"]} and record.status == "failed"
    assert add_plugin(extra, "extra") is record
    with pytest.raises(PluginError, match="already registered as 'extra'"):
        add_plugin(Extra(), "extra")
    assert "extra_sat" in pcdeq_plugin.list_activations()


def test_reset_with_custom_loader(clean) -> None:
    seen = []

    def loader():
        seen.append(True)
        return []

    reset_plugins(loader=loader)
    pcdeq_plugin.list_solvers()
    assert seen == [True]
    assert all(r.source == "builtin" for r in plugin_report())
    reset_plugins()
    assert plugins._entry_points is plugins._default_entry_points
    assert not plugins._state.loaded and len(SOLVERS._items) == 0


def test_broken_builtin_is_a_plugin_error(clean, monkeypatch) -> None:
    monkeypatch.setattr(plugins, "BUILTIN_MODULES", ("pcdeq_plugin.no_such_module",))
    with pytest.raises(PluginError, match="built-in module 'pcdeq_plugin.no_such_module' failed"):
        load_plugins()
    assert not plugins._state.loaded


def test_entry_point_group_is_pcdeq() -> None:
    assert plugins.ENTRY_POINT_GROUP == "pcdeq"
    names = {ep.name for ep in metadata.entry_points(group="pcdeq")}
    assert "pcdeq_baselines" in names  # the baselines ride the same group as any plugin
