"""A passive name -> spec table: it is handed its loader and its validator, it imports neither.

:class:`Registry` knows nothing about plugins or activation checks. The wiring module
(:mod:`pcdeq_plugin.catalog`) creates one registry per kind and hands it

* a *loader*, called before every lookup (there: the plugin manager's idempotent
  ``load_plugins``, so registries fill themselves on first use, never at import), and
* a *validator*, called on every spec before it is accepted (there: the numerical
  verification of activations).

An unknown name raises :class:`~pcdeq_plugin.specs.UnknownNameError` listing the valid
names; a name offered twice raises :class:`~pcdeq_plugin.specs.DuplicateNameError` naming
both providers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .specs import DuplicateNameError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> spec mapping that asks its loader to fill it before every lookup.

    Args:
        kind: What the registry holds (``"activation"``, ``"model"``...), used in messages.
        validator: Called on every spec before it is accepted; raises to refuse it.
        spec_type: If given, every spec must be an instance of it.
        loader: Called (without arguments) before every lookup and registration; it must
            be idempotent and cheap after the first call, and may call :meth:`register`.
    """

    def __init__(
        self,
        kind: str,
        validator: Callable[[T], Any] | None = None,
        spec_type: type | None = None,
        *,
        loader: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.validator = validator
        self.spec_type = spec_type
        self.loader = loader
        self._items: dict[str, T] = {}
        self._providers: dict[str, str] = {}

    # -- population -------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self.loader is not None:
            self.loader()

    def register(
        self, name: str, spec: T, *, provider: str = "user", overwrite: bool = False
    ) -> None:
        """Add ``spec`` under ``name``.

        The loader runs first (the plugin manager's returns at once while it is loading),
        so a name taken by a built-in or a plugin is reported here rather than breaking the
        lazy load later.

        Raises:
            DuplicateNameError: ``name`` is taken and ``overwrite`` is false.
            TypeError: ``spec`` is not of the registry's spec type.
            ValueError: the validator refused the spec (e.g. a non-concave activation).
        """
        self._ensure_loaded()
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if self.spec_type is not None and not isinstance(spec, self.spec_type):
            raise TypeError(
                f"{self.kind} {name!r} must be an instance of {self.spec_type.__name__}, "
                f"got {type(spec).__name__}"
            )
        spec_name = getattr(spec, "name", name)
        if spec_name != name:
            raise ValueError(
                f"{self.kind} registered as {name!r} but its spec is named {spec_name!r}"
            )
        if name in self._items and not overwrite:
            raise DuplicateNameError(
                f"{self.kind} {name!r} is provided by both {self._providers[name]!r} and "
                f"{provider!r}; rename one of them (or pass overwrite=True)"
            )
        if self.validator is not None:
            self.validator(spec)
        self._items[name] = spec
        self._providers[name] = provider

    def unregister(self, name: str) -> None:
        """Remove ``name`` if present (no error if it is not)."""
        self._items.pop(name, None)
        self._providers.pop(name, None)

    def reset(self) -> None:
        """Forget every entry (the plugin manager's reset; the next lookup loads again)."""
        self._items.clear()
        self._providers.clear()

    # -- lookup -----------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._ensure_loaded()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The spec registered as ``name``.

        Raises:
            UnknownNameError: no such name; the message lists the registered ones.
        """
        self._ensure_loaded()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            available = ", ".join(sorted(self._items)) or "(none registered)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {available}"
            ) from None

    def provider(self, name: str) -> str:
        """Who registered ``name`` (a plugin name, or ``"user"``)."""
        self.get(name)
        return self._providers[name]

    def items(self) -> Iterator[tuple[str, T]]:
        self._ensure_loaded()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._items)
