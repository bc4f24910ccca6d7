"""pluggy hook specifications of the ``pcdeq`` project.

Every hook starts with ``pcdeq_`` and *returns* a mapping ``{name: spec}``; the host sees
every name before merging, so a name offered twice is reported with both providers.
Built-in activations, solvers and models are registered through these same hooks.

A plugin module looks like this::

    from pcdeq_plugin import hookimpl, ActivationSpec

    @hookimpl
    def pcdeq_register_activations():
        return {"cuberoot1p": ActivationSpec("cuberoot1p", fn, kind="nonnegative",
                                             upper_bound=math.inf)}

and is announced in its ``pyproject.toml``::

    [project.entry-points.pcdeq]
    my_plugin = "my_package.pcdeq_hooks"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .specs import ActivationSpec, CellSpec, DatasetSpec, ModelSpec, SolverSpec

PROJECT_NAME = "pcdeq"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def pcdeq_register_activations() -> dict[str, ActivationSpec]:
    """Return ``{name: ActivationSpec}``; each is verified numerically before acceptance."""


@hookspec
def pcdeq_register_solvers() -> dict[str, SolverSpec]:
    """Return ``{name: SolverSpec}``: fixed-point solvers with the common signature."""


@hookspec
def pcdeq_register_models() -> dict[str, ModelSpec]:
    """Return ``{name: ModelSpec}``: implicit-model classifiers built by name."""


@hookspec
def pcdeq_register_datasets() -> dict[str, DatasetSpec]:
    """Return ``{name: DatasetSpec}``: datasets the benchmark harness can train on."""


@hookspec
def pcdeq_register_cells() -> dict[str, CellSpec]:
    """Return ``{name: CellSpec}``: implicit cells any registered backbone can carry."""
