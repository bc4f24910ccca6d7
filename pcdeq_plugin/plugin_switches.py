"""Which entry-point plugins load: the environment switches, decided before anything loads.

Switches (read when the plugins load):

``PCDEQ_DISABLE_PLUGIN_AUTOLOAD=1``
    load no entry-point plugin except those named in ``PCDEQ_PLUGINS``;
``PCDEQ_PLUGINS=a,b``
    an allowlist: when set, only these entry-point plugins load (with or without
    autoload; a name no installed distribution provides is reported);
``PCDEQ_BLOCK_PLUGINS=a,b``
    entry-point plugins never to load;
``PCDEQ_STRICT_PLUGINS=1``
    any plugin error raises ``PluginError`` instead of a ``PluginWarning`` (including a
    hook implementation whose name matches no hook specification, e.g. a misspelt
    ``pcdeq_register_activation``).

:func:`select_entry_points` is a pure function of the entry points found and the
environment, so the plugin manager (:mod:`pcdeq_plugin.plugins`) only acts on its answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ENV_ALLOW",
    "ENV_BLOCK",
    "ENV_DISABLE_AUTOLOAD",
    "ENV_STRICT",
    "EntryPointChoice",
    "Selection",
    "select_entry_points",
    "strict_from_env",
]

ENV_DISABLE_AUTOLOAD = "PCDEQ_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "PCDEQ_PLUGINS"
ENV_BLOCK = "PCDEQ_BLOCK_PLUGINS"
ENV_STRICT = "PCDEQ_STRICT_PLUGINS"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _name_list(value: str | None) -> set[str]:
    return {part.strip() for part in (value or "").split(",") if part.strip()}


def strict_from_env(strict: bool | None, environ: Mapping[str, str]) -> bool:
    """``strict`` if given, else the ``PCDEQ_STRICT_PLUGINS`` switch."""
    return _truthy(environ.get(ENV_STRICT)) if strict is None else strict


@dataclass(frozen=True)
class EntryPointChoice:
    """What to do with one entry point.

    Attributes:
        action: ``"load"``; ``"blocked"`` (a switch keeps it out); ``"duplicate"`` (another
            distribution took its name first: reported, not loaded).
        reason: The report of a duplicate.
    """

    entry_point: Any
    distribution: str
    action: Literal["load", "blocked", "duplicate"]
    reason: str = ""

    @property
    def name(self) -> str:
        return str(self.entry_point.name)


@dataclass(frozen=True)
class Selection:
    """The choices, in discovery order, and the problem of an allowlist naming nothing."""

    choices: list[EntryPointChoice] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    missing_reason: str = ""


def select_entry_points(entry_points: Iterable[Any], environ: Mapping[str, str]) -> Selection:
    """Decide, for every entry point found, whether it loads under the switches.

    The same distribution seen twice on ``sys.path`` appears once; a second distribution
    using a name already taken is a duplicate.
    """
    disabled = _truthy(environ.get(ENV_DISABLE_AUTOLOAD))
    allowed = _name_list(environ.get(ENV_ALLOW))
    blocked = _name_list(environ.get(ENV_BLOCK))
    found = list(entry_points)
    names = {ep.name for ep in found}
    missing = sorted(allowed - names)
    missing_reason = ""
    if missing:
        available = ", ".join(sorted(names)) or "(none installed)"
        missing_reason = (
            f"{ENV_ALLOW} names plugin(s) {', '.join(missing)} that no installed distribution "
            f"provides; available entry points: {available}"
        )
    seen: dict[str, str] = {}
    choices: list[EntryPointChoice] = []
    for ep in found:
        dist = getattr(getattr(ep, "dist", None), "name", "") or ""
        if ep.name in seen:
            if seen[ep.name] != dist:  # the same distribution twice on sys.path is skipped
                reason = (
                    f"entry-point name {ep.name!r} is also used by distribution "
                    f"{seen[ep.name]!r}; only the first was loaded (use the distribution name "
                    "as entry-point name)"
                )
                choices.append(EntryPointChoice(ep, dist, "duplicate", reason))
            continue
        seen[ep.name] = dist
        # an allowlist, when given, is exclusive; without one, autoload decides
        keep_out = ep.name in blocked or (ep.name not in allowed if allowed else disabled)
        choices.append(EntryPointChoice(ep, dist, "blocked" if keep_out else "load"))
    return Selection(choices, missing, missing_reason)
