"""The wiring: the registries, the plugin manager that fills them, the checks that guard them.

This is the one module that knows all three parts, so none of them has to know the others:

* :mod:`~pcdeq_plugin.spec_registry` -- the passive :class:`Registry`;
* :mod:`~pcdeq_plugin.plugins` -- loads built-ins and entry points into the registries it
  is connected to (here, hook name -> registry);
* :mod:`~pcdeq_plugin.activation_checks` -- the validator of the activation registry.

It also offers the lookups by name (``get_*``, ``list_*``, :func:`build_model`).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from . import plugins
from .activation_checks import verify_activation
from .spec_registry import Registry
from .specs import (
    ActivationSpec,
    CellSpec,
    DatasetSpec,
    FixedPointSolver,
    ModelSpec,
    SolverSpec,
    UnknownNameError,
)

if TYPE_CHECKING:
    from .interface import ImplicitModel

__all__ = [
    "ACTIVATIONS",
    "CELLS",
    "DATASETS",
    "MODELS",
    "SOLVERS",
    "build_model",
    "get_activation",
    "get_cell",
    "get_solver",
    "list_activations",
    "list_cells",
    "list_datasets",
    "list_models",
    "list_solvers",
]

ACTIVATIONS: Registry[ActivationSpec] = Registry(
    "activation", validator=verify_activation, spec_type=ActivationSpec, loader=plugins.load_plugins
)
SOLVERS: Registry[SolverSpec] = Registry(
    "solver", spec_type=SolverSpec, loader=plugins.load_plugins
)
# a model's recipe is checked when its ModelSpec is made (see specs.ModelSpec)
MODELS: Registry[ModelSpec] = Registry("model", spec_type=ModelSpec, loader=plugins.load_plugins)
DATASETS: Registry[DatasetSpec] = Registry(
    "dataset", spec_type=DatasetSpec, loader=plugins.load_plugins
)

# a cell is checked when it is built on a backbone (its shape and options), not before
CELLS: Registry[CellSpec] = Registry("cell", spec_type=CellSpec, loader=plugins.load_plugins)

plugins.connect_registries(
    {
        "pcdeq_register_activations": ACTIVATIONS,
        "pcdeq_register_solvers": SOLVERS,
        "pcdeq_register_models": MODELS,
        "pcdeq_register_datasets": DATASETS,
        "pcdeq_register_cells": CELLS,
    }
)


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


def get_cell(name: str) -> CellSpec:
    """The registered cell called ``name`` (see :mod:`~pcdeq_plugin.cell_models`)."""
    return CELLS.get(name)


def list_cells() -> list[str]:
    """Names of the registered implicit cells (built-ins and plugins)."""
    return CELLS.names()
