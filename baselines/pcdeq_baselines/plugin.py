"""Entry-point plugin module: registers every baseline model through the pcdeq hooks."""

from __future__ import annotations

from pcdeq_plugin import ModelSpec, hookimpl

from . import deq, geq, lben, mondeq, node, subdeq


@hookimpl
def pcdeq_register_models() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for module in (node, deq, mondeq, subdeq, lben, geq):
        specs.update(module.MODEL_SPECS)
    return specs
