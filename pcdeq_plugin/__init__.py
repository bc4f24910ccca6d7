"""pcdeq-plugin: positive concave deep equilibrium models and a common implicit-model interface.

Public surface only; nothing is registered or loaded at import. Heavier names (layers,
solvers, the TorchDEQ bridge) are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from .catalog import (
    build_model,
    get_activation,
    get_cell,
    get_solver,
    list_activations,
    list_cells,
    list_datasets,
    list_models,
    list_solvers,
)
from .hookspecs import hookimpl
from .interface import (
    BlockStats,
    ConvergenceError,
    ConvergenceWarning,
    FixedPointResult,
    ImplicitBlock,
    ImplicitModel,
    SolverConfig,
    SolveStats,
)
from .plugins import PluginError, PluginWarning, add_plugin, load_plugins, plugin_report
from .recipes import RecipeOverride, TrainingRecipe
from .specs import (
    ActivationSpec,
    CellSpec,
    DatasetSpec,
    DuplicateNameError,
    ModelSpec,
    SolverSpec,
    UnknownNameError,
)

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access
_LAZY: dict[str, str] = {
    "PcDEQLinear": "cells",
    "PcDEQConv": "cells",
    "PcDEQBlock": "cells",
    "NonNegativeWeightNorm": "constraints",
    "NonNegativeSoftplus": "constraints",
    "certify": "certificates",
    "Certificate": "certificates",
    "certify_model": "certificates",
    "solve_implicit": "implicit",
    "register": "torchdeq_bridge",
    "add_pcdeq_args": "torchdeq_bridge",
    "register_pc_nonneg_module": "torchdeq_bridge",
    "verify_activation": "activation_checks",
    "ActivationCheckError": "activation_checks",
}

__all__ = [
    "ActivationSpec",
    "BlockStats",
    "CellSpec",
    "ConvergenceError",
    "ConvergenceWarning",
    "DatasetSpec",
    "DuplicateNameError",
    "FixedPointResult",
    "ImplicitBlock",
    "ImplicitModel",
    "ModelSpec",
    "PluginError",
    "PluginWarning",
    "RecipeOverride",
    "SolveStats",
    "SolverConfig",
    "SolverSpec",
    "TrainingRecipe",
    "UnknownNameError",
    "__version__",
    "add_plugin",
    "build_model",
    "get_activation",
    "get_cell",
    "get_solver",
    "hookimpl",
    "list_activations",
    "list_cells",
    "list_datasets",
    "list_models",
    "list_solvers",
    "load_plugins",
    "plugin_report",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pcdeq_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
