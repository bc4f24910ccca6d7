"""Named registries: activations, solvers, models and datasets.

Each registry maps a name to a small frozen *spec*. Registries fill themselves lazily from
the plugin manager (built-ins and entry-point plugins alike) on first use, never at import.
An unknown name raises :class:`UnknownNameError` listing the valid names; a name offered
twice raises :class:`DuplicateNameError` naming both providers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from .interface import FixedPointResult, ImplicitModel

__all__ = [
    "ACTIVATIONS",
    "DATASETS",
    "MODELS",
    "SOLVERS",
    "ActivationSpec",
    "DatasetSpec",
    "DuplicateNameError",
    "FixedPointSolver",
    "ModelSpec",
    "Registry",
    "SolverSpec",
    "UnknownNameError",
    "build_model",
    "get_activation",
    "get_solver",
    "list_activations",
    "list_datasets",
    "list_models",
    "list_solvers",
]

ActivationKind = Literal["nonnegative", "positive"]
ACTIVATION_KINDS: tuple[str, ...] = ("nonnegative", "positive")


class UnknownNameError(KeyError, ValueError):
    """A name that no registry entry carries. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """Two providers offered the same name."""


@dataclass(frozen=True)
class ActivationSpec:
    """A scalar activation for pcDEQ layers, concave and nondecreasing on the positive orthant.

    Attributes:
        name: Registry name.
        fn: Elementwise torch function.
        kind: ``"nonnegative"`` (sigma(0) = 0; pcDEQ-1, needs a strictly positive injection)
            or ``"positive"`` (sigma(0) > 0; pcDEQ-2, a nonnegative injection suffices).
        upper_bound: ``sup`` of ``fn`` on ``[0, inf)``; ``math.inf`` if unbounded (then a
            fixed point needs the spectral radius of W below the slope at infinity).
        description: One line for listings.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    kind: ActivationKind
    upper_bound: float
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(
                f"activation {self.name!r}: unknown kind {self.kind!r}; "
                f"choose one of {', '.join(ACTIVATION_KINDS)}"
            )
        if not callable(self.fn):
            raise TypeError(f"activation {self.name!r}: fn must be callable, got {self.fn!r}")
        # ``inf > 0`` holds, NaN and -inf fail: one comparison covers every case
        if not (isinstance(self.upper_bound, (int, float)) and self.upper_bound > 0):
            raise ValueError(
                f"activation {self.name!r}: upper_bound must be a positive number or math.inf, "
                f"got {self.upper_bound!r}"
            )

    @property
    def variant(self) -> int:
        """The pcDEQ variant this activation belongs to (1 or 2)."""
        return 1 if self.kind == "nonnegative" else 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class FixedPointSolver(Protocol):
    """The one signature every forward/backward fixed-point solver shares.

    ``fn`` maps a state tensor ``[B, ...]`` to a tensor of the same shape; the solver returns
    the (approximate) fixed point and a :class:`~pcdeq_plugin.interface.SolveStats` with
    per-sample residuals and convergence flags. Solvers never raise on non-convergence:
    the caller applies its failure policy to the statistics. ``check_every=None`` asks for
    the solver's own check schedule; :func:`~pcdeq_plugin.implicit.solve_implicit` passes
    it only to solvers whose ``predicts_checks`` attribute is true.
    """

    name: str

    def __call__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        z0: torch.Tensor,
        *,
        tol: float,
        max_iter: int,
        check_every: int | None = 1,
    ) -> FixedPointResult: ...


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: ``factory(**options)`` returns a :class:`FixedPointSolver`.

    Attributes:
        keeps_nonnegative: the solver never leaves the nonnegative orthant when started in it
            and given an order-preserving map (plain iteration; safeguarded Anderson).
    """

    name: str
    factory: Callable[..., FixedPointSolver]
    description: str = ""
    keeps_nonnegative: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A registered classifier: ``factory(input_shape, num_classes, **overrides)``.

    Attributes:
        family: Report family (``"pcdeq"``, ``"mondeq"``, ``"node"``, ...).
        presets: Named override bundles (``{"mnist": {...}, "small": {...}}``) a caller may
            apply before its own overrides.
        training: Recommended training hyper-parameters from the model's paper
            (``{"lr": ..., "weight_decay": ..., "batch_size": ...}``), informational.
    """

    name: str
    factory: Callable[..., ImplicitModel]
    family: str
    description: str = ""
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset for the harness: ``factory(**options)`` returns train/test data.

    The exact factory contract belongs to the harness (``pcdeq_plugin.bench``).
    """

    name: str
    factory: Callable[..., Any]
    input_shape: tuple[int, int, int]
    num_classes: int
    description: str = ""


T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> spec mapping that fills itself from the plugins on first use.

    Args:
        kind: What the registry holds (``"activation"``, ``"model"``...), used in messages.
        validator: Called on every spec before it is accepted; raises to refuse it.
        spec_type: If given, every spec must be an instance of it.
    """

    def __init__(
        self,
        kind: str,
        validator: Callable[[T], None] | None = None,
        spec_type: type | None = None,
    ) -> None:
        self.kind = kind
        self.validator = validator
        self.spec_type = spec_type
        self._items: dict[str, T] = {}
        self._providers: dict[str, str] = {}

    # -- population -------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        from .plugins import load_plugins

        load_plugins()

    def register(
        self, name: str, spec: T, *, provider: str = "user", overwrite: bool = False
    ) -> None:
        """Add ``spec`` under ``name``.

        The plugins are loaded first (unless they are loading right now), so a name taken
        by a built-in or a plugin is reported here rather than breaking the lazy load later.

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
        self._items.pop(name, None)
        self._providers.pop(name, None)

    # -- lookup -----------------------------------------------------------------------
    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            available = ", ".join(sorted(self._items)) or "(none registered)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {available}"
            ) from None

    def provider(self, name: str) -> str:
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

    def _clear(self) -> None:
        self._items.clear()
        self._providers.clear()


def _validate_activation(spec: ActivationSpec) -> None:
    from .activation_checks import verify_activation

    verify_activation(spec)


ACTIVATIONS: Registry[ActivationSpec] = Registry(
    "activation", validator=_validate_activation, spec_type=ActivationSpec
)
SOLVERS: Registry[SolverSpec] = Registry("solver", spec_type=SolverSpec)
MODELS: Registry[ModelSpec] = Registry("model", spec_type=ModelSpec)
DATASETS: Registry[DatasetSpec] = Registry("dataset", spec_type=DatasetSpec)


def get_activation(name: str) -> ActivationSpec:
    """The registered activation called ``name``."""
    return ACTIVATIONS.get(name)


def get_solver(name: str, **options: Any) -> FixedPointSolver:
    """A solver instance built by name, e.g. ``get_solver("anderson", memory=5)``."""
    return SOLVERS.get(name).factory(**options)


def build_model(
    name: str,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    *,
    preset: str | None = None,
    **overrides: Any,
) -> ImplicitModel:
    """Build a registered model by name.

    Args:
        name: Registered model name (see ``list_models()``).
        input_shape: ``(channels, height, width)`` of one input.
        num_classes: Number of output classes.
        preset: Optional preset of the model spec (e.g. ``"small"``); ``overrides`` win.
        **overrides: Keyword options passed to the model factory.

    Raises:
        UnknownNameError: unknown model or preset name.
    """
    spec = MODELS.get(name)
    options: dict[str, Any] = {}
    if preset is not None:
        if preset not in spec.presets:
            available = ", ".join(sorted(spec.presets)) or "(none)"
            raise UnknownNameError(
                f"model {name!r} has no preset {preset!r}; available: {available}"
            )
        options.update(spec.presets[preset])
    options.update(overrides)
    shape = _check_input_shape(input_shape)
    try:  # accepts numpy and torch integers, refuses floats and bools
        classes = -1 if isinstance(num_classes, bool) else operator.index(num_classes)
    except TypeError:
        classes = -1
    if classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return spec.factory(shape, classes, **options)


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    """``input_shape`` as a tuple of three positive ints (accepts torch.Size, numpy ints)."""
    try:
        given = list(input_shape)  # type: ignore[call-overload]
        # operator.index refuses floats (28.5 must not silently become 28); bool is refused below
        dims = [operator.index(d) for d in given]
    except TypeError:
        given, dims = [], []
    if len(dims) != 3 or min(dims) < 1 or any(isinstance(d, bool) for d in given):
        raise ValueError(
            f"input_shape must be (channels, height, width), three integers >= 1, e.g. "
            f"(1, 28, 28), got {input_shape!r}"
        )
    return (dims[0], dims[1], dims[2])


def list_activations() -> list[str]:
    """Names of the registered activations (built-ins and plugins)."""
    return ACTIVATIONS.names()


def list_solvers() -> list[str]:
    """Names of the registered fixed-point solvers."""
    return SOLVERS.names()


def list_models() -> list[str]:
    """Names of the registered models."""
    return MODELS.names()


def list_datasets() -> list[str]:
    """Names of the registered datasets (the harness registers its own on use)."""
    return DATASETS.names()
