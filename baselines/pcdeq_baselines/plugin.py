"""Entry-point plugin module: registers every baseline model and cell through the pcdeq hooks."""

from __future__ import annotations

from pcdeq_plugin import CellSpec, ModelSpec, hookimpl

from . import deq, geq, lben, mondeq, node, subdeq
from .deq.cell import CELL_SPECS as DEQ_CELLS
from .mondeq.cell import CELL_SPECS as MONDEQ_CELLS


@hookimpl
def pcdeq_register_models() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for module in (node, deq, mondeq, subdeq, lben, geq):
        specs.update(module.MODEL_SPECS)
    return specs


@hookimpl
def pcdeq_register_cells() -> dict[str, CellSpec]:
    # the cells that fit the shared backbones: build_model("single-conv", cell="deq")
    return {**DEQ_CELLS, **MONDEQ_CELLS}
