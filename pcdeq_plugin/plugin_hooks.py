"""Calling one plugin's registration hooks, and finding hooks that match no specification.

The plugin manager (:mod:`pcdeq_plugin.plugins`) keeps the records and decides whether a
problem warns or raises; these functions only report through the callbacks they are given.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pluggy

from .spec_registry import Registry

__all__ = ["merge_registrations", "unknown_hooks"]


def merge_registrations(
    manager: pluggy.PluginManager,
    plugin: object,
    targets: Mapping[str, Registry[Any]],
    provider: str,
    *,
    problem: Callable[[str], None],
    registered: Callable[[str, str], None],
) -> None:
    """Call ``plugin``'s implementation of every registration hook; register what it offers.

    Args:
        manager: The manager ``plugin`` is registered with.
        plugin: The plugin module or object.
        targets: Hook name -> the registry its results go to.
        provider: The plugin's name, recorded as the provider of what it registers.
        problem: Called with the message of each problem (a hook that raised, a bad return
            value, a refused spec); the other hooks and specs still go through.
        registered: Called with ``(registry kind, name)`` of each accepted spec.
    """
    for hook_name, registry in targets.items():
        impls = [
            impl
            for impl in getattr(manager.hook, hook_name).get_hookimpls()
            if impl.plugin is plugin
        ]
        for impl in impls:
            try:
                offered = impl.function()
            except Exception as exc:  # a plugin's own bug must not stop the others
                problem(f"{hook_name}() raised {type(exc).__name__}: {exc}")
                continue
            if offered is None:
                continue
            if not isinstance(offered, dict):
                problem(
                    f"{hook_name}() must return a dict {{name: spec}}, got {type(offered).__name__}"
                )
                continue
            for name, spec in offered.items():
                try:
                    registry.register(name, spec, provider=provider)
                except Exception as exc:
                    text = str(exc)
                    prefix = f"{registry.kind} {name!r} refused"
                    # activation checks already start with "activation 'x' refused: ..."
                    problem(text if text.startswith(prefix) else f"{prefix}: {text}")
                else:
                    registered(registry.kind, name)


def unknown_hooks(
    manager: pluggy.PluginManager, known: list[str], reported: set[tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    """``(plugin name, message)`` for each hook implementation that matches no specification.

    Like ``PluginManager.check_pending()``, but every offender once (``reported`` collects
    what was already said), with the closest valid hook name, instead of raising on the first.
    """
    for hook_name, caller in sorted(vars(manager.hook).items()):
        if hook_name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            key = (impl.plugin_name, hook_name)
            if impl.optionalhook or key in reported:
                continue
            reported.add(key)
            close = difflib.get_close_matches(hook_name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            yield (
                impl.plugin_name,
                f"unknown hook {hook_name!r} (no such hook specification); {hint}"
                f"the hooks are: {', '.join(known)}",
            )
