"""What a registry entry is: the typed specs of activations, solvers, models and datasets.

This module sits at the bottom of the package: it imports only the leaf modules
:mod:`~pcdeq_plugin.checks` and :mod:`~pcdeq_plugin.recipes` (and the interface types for
type checkers), so every other module -- the registries, the plugin manager, the
activation checks, the built-in catalogues, plugins -- can import it without a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from .recipes import RecipeOverride, TrainingRecipe

if TYPE_CHECKING:
    from .interface import FixedPointResult, ImplicitModel

__all__ = [
    "ACTIVATION_KINDS",
    "ActivationKind",
    "CELL_STATE_KINDS",
    "ActivationSpec",
    "CellSpec",
    "DatasetSpec",
    "DuplicateNameError",
    "FixedPointSolver",
    "ModelSpec",
    "RecipeOverride",
    "SolverSpec",
    "TrainingRecipe",
    "UnknownNameError",
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
        training: The training recipe from the model's paper, as a
            :class:`~pcdeq_plugin.recipes.TrainingRecipe`; a mapping in the same shape
            (``{"lr": ..., "per_dataset": {"svhn": {...}}}``) is converted when the spec is
            made, so a recipe the harness could not read is refused here, naming the model.
    """

    name: str
    factory: Callable[..., ImplicitModel]
    family: str
    description: str = ""
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: TrainingRecipe = field(default_factory=TrainingRecipe)

    def __post_init__(self) -> None:
        if isinstance(self.training, Mapping):
            recipe = TrainingRecipe.from_mapping(self.training, where=f"model {self.name!r}")
            object.__setattr__(self, "training", recipe)  # frozen: set once, here
        elif not isinstance(self.training, TrainingRecipe):
            raise TypeError(
                f"model {self.name!r}: training must be a TrainingRecipe or a mapping of its "
                f"fields, got {type(self.training).__name__}"
            )


#: the kinds of state a cell can take: ``(width,)`` or ``(channels, height, width)``
CELL_STATE_KINDS: tuple[str, ...] = ("dense", "conv")


@dataclass(frozen=True)
class CellSpec:
    """A registered implicit cell, placed by name on any backbone (``cell="NAME"``).

    ``factory(state_shape, name, **options)`` returns an
    :class:`~pcdeq_plugin.interface.ImplicitBlock` that maps ``[B, *state_shape]`` to its
    equilibrium of the same shape; ``state_shape`` is ``(width,)`` for a dense state and
    ``(channels, height, width)`` for a convolutional one.

    Attributes:
        family: Report family of the models built with it (``"pcdeq"``, ``"deq"``, ...).
        state_kinds: The kinds of state it takes (:data:`CELL_STATE_KINDS`).
        options: Names of the keyword options the factory accepts (checked, and listed in
            the error, before anything is built).
    """

    name: str
    factory: Callable[..., Any]
    family: str
    description: str = ""
    state_kinds: tuple[str, ...] = CELL_STATE_KINDS
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kinds = tuple(self.state_kinds)
        if not kinds or not set(kinds) <= set(CELL_STATE_KINDS):
            raise ValueError(
                f"cell {self.name!r}: state_kinds must be a non-empty subset of "
                f"{', '.join(CELL_STATE_KINDS)}, got {self.state_kinds!r}"
            )
        object.__setattr__(self, "state_kinds", kinds)
        object.__setattr__(self, "options", tuple(self.options))


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
