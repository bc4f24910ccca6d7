"""The plugin manager: built-ins and entry-point plugins, loaded lazily and in isolation.

* Built-in modules register through the same hooks as third-party plugins.
* Entry points of the group ``pcdeq`` are discovered on the first registry lookup, never at
  import. Each plugin is loaded in isolation: one that fails to import or to register is
  reported with its name, its distribution and the error, and the others still load.
* Switches (``PCDEQ_DISABLE_PLUGIN_AUTOLOAD``, ``PCDEQ_PLUGINS``, ``PCDEQ_BLOCK_PLUGINS``,
  ``PCDEQ_STRICT_PLUGINS``) are read when loading; :mod:`pcdeq_plugin.plugin_switches`
  says what each does and decides which entry points load.
* The manager imports no registry: the wiring module (:mod:`pcdeq_plugin.catalog`) hands
  it one registry per registration hook (:func:`connect_registries`).

A built-in module that fails is a bug of this package, not a plugin problem: it always
raises :class:`PluginError`. A load that raises leaves nothing half-registered behind, so
the next registry lookup tries again from a clean state.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .plugin_hooks import merge_registrations, unknown_hooks
from .plugin_switches import select_entry_points, strict_from_env
from .spec_registry import Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginError",
    "PluginRecord",
    "PluginWarning",
    "add_plugin",
    "connect_registries",
    "get_plugin_manager",
    "load_plugins",
    "plugin_report",
    "reset_plugins",
]

ENTRY_POINT_GROUP = "pcdeq"

BUILTIN_MODULES: tuple[str, ...] = (
    "pcdeq_plugin.activations",
    "pcdeq_plugin.solvers",
    "pcdeq_plugin.models",
    "pcdeq_plugin.cell_models",
)

# hook name -> the registry its results go to; filled by the wiring module (catalog.py)
_HOOK_TARGETS: dict[str, Registry[Any]] = {}


class PluginError(RuntimeError):
    """A plugin failed to load or to register (raised in strict mode)."""


class PluginWarning(UserWarning):
    """A plugin failed to load or to register; the others were loaded."""


@dataclass
class PluginRecord:
    """What happened to one plugin."""

    name: str
    source: str  # "builtin" | "entry point" | "added"
    distribution: str = ""
    status: str = "loaded"  # "loaded" | "failed" | "blocked" | "skipped"
    errors: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.manager: pluggy.PluginManager | None = None
        self.loaded = False
        self.loading = False
        self.records: list[PluginRecord] = []
        # (plugin name, hook name) of unknown hooks already reported
        self.reported_pending: set[tuple[str, str]] = set()


_state = _State()


def _strict(strict: bool | None) -> bool:
    return strict_from_env(strict, os.environ)


def connect_registries(targets: Mapping[str, Registry[Any]]) -> None:
    """Send what each registration hook returns to its registry (replaces earlier targets).

    Called once by :mod:`pcdeq_plugin.catalog`, which creates the registries; the plugin
    manager itself imports none of them.

    Raises:
        ValueError: a hook name that no hook specification declares.
    """
    declared = sorted(n for n in vars(hookspecs) if n.startswith(f"{hookspecs.PROJECT_NAME}_"))
    unknown = sorted(set(targets) - set(declared))
    if unknown:
        raise ValueError(
            f"no hook specification for {', '.join(unknown)}; the hooks are: {', '.join(declared)}"
        )
    with _state.lock:
        _HOOK_TARGETS.clear()
        _HOOK_TARGETS.update(targets)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide ``pluggy.PluginManager("pcdeq")`` (created on first call)."""
    with _state.lock:
        if _state.manager is None:
            manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            manager.add_hookspecs(hookspecs)
            _state.manager = manager
        return _state.manager


def _report_problem(record: PluginRecord, message: str, strict: bool) -> None:
    record.errors.append(message)
    where = f" (distribution {record.distribution})" if record.distribution else ""
    text = f"pcdeq plugin {record.name!r}{where}: {message}"
    if strict:
        raise PluginError(text)
    warnings.warn(text, PluginWarning, stacklevel=3)


def _merge(plugin: object, record: PluginRecord, strict: bool) -> None:
    """Call the registration hooks of one plugin and add what they return."""

    def problem(message: str) -> None:
        record.status = "failed"
        _report_problem(record, message, strict)

    def registered(kind: str, name: str) -> None:
        record.provides.setdefault(kind, []).append(name)

    merge_registrations(
        get_plugin_manager(),
        plugin,
        _HOOK_TARGETS,
        record.name,
        problem=problem,
        registered=registered,
    )


def _register(plugin: object, record: PluginRecord, strict: bool) -> None:
    manager = get_plugin_manager()
    _state.records.append(record)
    try:
        manager.register(plugin, name=record.name)
    except Exception as exc:
        record.status = "failed"
        _report_problem(record, f"could not be registered: {type(exc).__name__}: {exc}", strict)
        return
    _merge(plugin, record, strict)


def _check_pending(strict: bool) -> None:
    """Report hook implementations that match no specification (usually a misspelt name)."""
    known = list(_HOOK_TARGETS)
    for plugin_name, message in unknown_hooks(get_plugin_manager(), known, _state.reported_pending):
        record = next((r for r in _state.records if r.name == plugin_name), None)
        if record is None:  # pragma: no cover - every registered plugin has a record
            record = PluginRecord(plugin_name, "added")
            _state.records.append(record)
        record.status = "failed"
        _report_problem(record, message, strict)


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry_points(strict: bool) -> None:
    selection = select_entry_points(_entry_points(), os.environ)
    if selection.missing:
        record = PluginRecord(",".join(selection.missing), "entry point", status="skipped")
        _state.records.append(record)
        _report_problem(record, selection.missing_reason, strict)
    for choice in selection.choices:
        record = PluginRecord(choice.name, "entry point", distribution=choice.distribution)
        if choice.action != "load":
            record.status = "skipped" if choice.action == "duplicate" else "blocked"
            _state.records.append(record)
            if choice.reason:
                _report_problem(record, choice.reason, strict)
            continue
        try:
            plugin = choice.entry_point.load()
        except Exception as exc:
            record.status = "failed"
            _state.records.append(record)
            value = choice.entry_point.value
            _report_problem(
                record, f"failed to import {value!r}: {type(exc).__name__}: {exc}", strict
            )
            continue
        _register(plugin, record, strict)


def load_plugins(*, strict: bool | None = None) -> None:
    """Load built-ins and entry-point plugins once per process (idempotent, thread-safe).

    Args:
        strict: Raise :class:`PluginError` on any plugin problem. Defaults to the
            ``PCDEQ_STRICT_PLUGINS`` environment variable.
    """
    with _state.lock:
        if _state.loaded or _state.loading:
            return
        _state.loading = True
        strict_mode = _strict(strict)
        try:
            for module_name in BUILTIN_MODULES:
                try:
                    module = importlib.import_module(module_name)
                except Exception as exc:
                    raise PluginError(
                        f"built-in module {module_name!r} failed to import: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                _register(module, PluginRecord(module_name, "builtin"), strict=True)
            _load_entry_points(strict_mode)
            _check_pending(strict_mode)
            _state.loaded = True
        except BaseException:
            # leave no half-filled registry behind: the next lookup starts from scratch
            _forget_everything()
            raise
        finally:
            _state.loading = False


def add_plugin(
    plugin: object, name: str | None = None, *, strict: bool | None = None
) -> PluginRecord:
    """Register a plugin module or object by hand (after loading the others).

    Returns:
        The :class:`PluginRecord` describing what it provided or why it failed.
    """
    load_plugins()
    with _state.lock:
        plugin_name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        record = PluginRecord(plugin_name, "added")
        if get_plugin_manager().has_plugin(plugin_name):
            existing = next((r for r in _state.records if r.name == plugin_name), None)
            if existing is not None and get_plugin_manager().get_plugin(plugin_name) is plugin:
                return existing  # idempotent
            raise PluginError(f"a different plugin is already registered as {plugin_name!r}")
        strict_mode = _strict(strict)
        _register(plugin, record, strict_mode)
        _check_pending(strict_mode)
        return record


def plugin_report() -> list[PluginRecord]:
    """What happened to every plugin: loaded, failed (with errors), blocked or skipped."""
    load_plugins()
    return list(_state.records)


def reset_plugins(*, loader: Callable[[], Iterable[metadata.EntryPoint]] | None = None) -> None:
    """Forget every plugin and registry entry (tests; a fresh load happens on next use).

    Args:
        loader: Optional replacement for entry-point discovery (tests).
    """
    global _entry_points
    with _state.lock:
        _forget_everything()
        _entry_points = loader if loader is not None else _default_entry_points  # type: ignore[assignment]


def _forget_everything() -> None:
    manager = _state.manager
    if manager is not None:
        for plugin_name, plugin in list(manager.list_name_plugin()):
            manager.unregister(plugin, name=plugin_name)
    _state.manager = None
    _state.loaded = False
    _state.records = []
    _state.reported_pending = set()
    for registry in _HOOK_TARGETS.values():
        registry.reset()


_default_entry_points = _entry_points
