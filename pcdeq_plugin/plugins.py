"""The plugin manager: built-ins and entry-point plugins, loaded lazily and in isolation.

* Built-in modules register through the same hooks as third-party plugins.
* Entry points of the group ``pcdeq`` are discovered on the first registry lookup, never at
  import. Each plugin is loaded in isolation: one that fails to import or to register is
  reported with its name, its distribution and the error, and the others still load.
* Switches (read when loading):

  ``PCDEQ_DISABLE_PLUGIN_AUTOLOAD=1``
      load no entry-point plugin except those named in ``PCDEQ_PLUGINS``;
  ``PCDEQ_PLUGINS=a,b``
      an allowlist: when set, only these entry-point plugins load (with or without
      autoload; a name no installed distribution provides is reported);
  ``PCDEQ_BLOCK_PLUGINS=a,b``
      entry-point plugins never to load;
  ``PCDEQ_STRICT_PLUGINS=1``
      any plugin error raises :class:`PluginError` instead of a :class:`PluginWarning`
      (including a hook implementation whose name matches no hook specification, e.g. a
      misspelt ``pcdeq_register_activation``).

A built-in module that fails is a bug of this package, not a plugin problem: it always
raises :class:`PluginError`. A load that raises leaves nothing half-registered behind, so
the next registry lookup tries again from a clean state.
"""

from __future__ import annotations

import difflib
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
ENV_DISABLE_AUTOLOAD = "PCDEQ_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "PCDEQ_PLUGINS"
ENV_BLOCK = "PCDEQ_BLOCK_PLUGINS"
ENV_STRICT = "PCDEQ_STRICT_PLUGINS"

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


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _name_list(value: str | None) -> set[str]:
    return {part.strip() for part in (value or "").split(",") if part.strip()}


def _strict(strict: bool | None) -> bool:
    return _truthy(os.environ.get(ENV_STRICT)) if strict is None else strict


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
    manager = get_plugin_manager()
    for hook_name, registry in _HOOK_TARGETS.items():
        impls = [
            impl
            for impl in getattr(manager.hook, hook_name).get_hookimpls()
            if impl.plugin is plugin
        ]
        for impl in impls:
            try:
                offered = impl.function()
            except Exception as exc:  # a plugin's own bug must not stop the others
                record.status = "failed"
                _report_problem(record, f"{hook_name}() raised {type(exc).__name__}: {exc}", strict)
                continue
            if offered is None:
                continue
            if not isinstance(offered, dict):
                record.status = "failed"
                _report_problem(
                    record,
                    f"{hook_name}() must return a dict {{name: spec}}, got {type(offered).__name__}",
                    strict,
                )
                continue
            for name, spec in offered.items():
                try:
                    registry.register(name, spec, provider=record.name)
                except Exception as exc:
                    record.status = "failed"
                    text = str(exc)
                    prefix = f"{registry.kind} {name!r} refused"
                    # activation checks already start with "activation 'x' refused: ..."
                    message = text if text.startswith(prefix) else f"{prefix}: {text}"
                    _report_problem(record, message, strict)
                else:
                    record.provides.setdefault(registry.kind, []).append(name)


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
    """Report hook implementations that match no specification (usually a misspelt name).

    Like ``PluginManager.check_pending()`` but reports every offender once, with the
    closest valid hook name, instead of raising on the first one.
    """
    manager = get_plugin_manager()
    for hook_name, caller in sorted(vars(manager.hook).items()):
        if hook_name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            key = (impl.plugin_name, hook_name)
            if impl.optionalhook or key in _state.reported_pending:
                continue
            _state.reported_pending.add(key)
            record = next((r for r in _state.records if r.name == impl.plugin_name), None)
            if record is None:  # pragma: no cover - every registered plugin has a record
                record = PluginRecord(impl.plugin_name, "added")
                _state.records.append(record)
            record.status = "failed"
            close = difflib.get_close_matches(hook_name, list(_HOOK_TARGETS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _report_problem(
                record,
                f"unknown hook {hook_name!r} (no such hook specification); {hint}"
                f"the hooks are: {', '.join(_HOOK_TARGETS)}",
                strict,
            )


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry_points(strict: bool) -> None:
    disabled = _truthy(os.environ.get(ENV_DISABLE_AUTOLOAD))
    allowed = _name_list(os.environ.get(ENV_ALLOW))
    blocked = _name_list(os.environ.get(ENV_BLOCK))
    seen: dict[str, str] = {}
    entry_points = list(_entry_points())
    missing = sorted(allowed - {ep.name for ep in entry_points})
    if missing:
        available = ", ".join(sorted({ep.name for ep in entry_points})) or "(none installed)"
        record = PluginRecord(",".join(missing), "entry point", status="skipped")
        _state.records.append(record)
        _report_problem(
            record,
            f"{ENV_ALLOW} names plugin(s) {', '.join(missing)} that no installed distribution "
            f"provides; available entry points: {available}",
            strict,
        )
    for ep in entry_points:
        dist = getattr(getattr(ep, "dist", None), "name", "") or ""
        record = PluginRecord(ep.name, "entry point", distribution=dist)
        if ep.name in seen:
            if seen[ep.name] == dist:  # the same distribution seen twice on sys.path
                continue
            record.status = "skipped"
            _state.records.append(record)
            _report_problem(
                record,
                f"entry-point name {ep.name!r} is also used by distribution {seen[ep.name]!r}; "
                "only the first was loaded (use the distribution name as entry-point name)",
                strict,
            )
            continue
        seen[ep.name] = dist
        # an allowlist, when given, is exclusive; without one, autoload decides
        if ep.name in blocked or (ep.name not in allowed if allowed else disabled):
            record.status = "blocked"
            _state.records.append(record)
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            record.status = "failed"
            _state.records.append(record)
            _report_problem(
                record, f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}", strict
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
