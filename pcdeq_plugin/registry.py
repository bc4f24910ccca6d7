"""Named registries: activations, solvers, models and datasets (the public face).

The parts live in one module each, imported one way:

* :mod:`~pcdeq_plugin.specs` -- what an entry is (``ActivationSpec``, ``ModelSpec``, ...);
* :mod:`~pcdeq_plugin.recipes` -- a model's typed training recipe;
* :mod:`~pcdeq_plugin.spec_registry` -- the passive :class:`Registry`;
* :mod:`~pcdeq_plugin.catalog` -- the registries themselves, wired to the plugin manager
  and to the activation checks, and the lookups by name.

This module gathers their public names, so ``from pcdeq_plugin.registry import MODELS``
keeps working for plugins and scripts written against it.
"""

from __future__ import annotations

from .catalog import (
    ACTIVATIONS,
    DATASETS,
    MODELS,
    SOLVERS,
    build_model,
    get_activation,
    get_solver,
    list_activations,
    list_datasets,
    list_models,
    list_solvers,
)
from .recipes import RecipeOverride, TrainingRecipe
from .spec_registry import Registry
from .specs import (
    ACTIVATION_KINDS,
    ActivationKind,
    ActivationSpec,
    DatasetSpec,
    DuplicateNameError,
    FixedPointSolver,
    ModelSpec,
    SolverSpec,
    UnknownNameError,
)

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_KINDS",
    "DATASETS",
    "MODELS",
    "SOLVERS",
    "ActivationKind",
    "ActivationSpec",
    "DatasetSpec",
    "DuplicateNameError",
    "FixedPointSolver",
    "ModelSpec",
    "RecipeOverride",
    "Registry",
    "SolverSpec",
    "TrainingRecipe",
    "UnknownNameError",
    "build_model",
    "get_activation",
    "get_solver",
    "list_activations",
    "list_datasets",
    "list_models",
    "list_solvers",
]
