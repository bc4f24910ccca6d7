"""Hook module named by the ``pcdeq`` entry point.

``sqrt1pm1(t) = sqrt(1 + t) - 1`` on ``[0, inf)``: zero at 0, positive after, increasing
and concave (second derivative ``-(1 + t)^(-3/2) / 4 < 0``), unbounded. It is a pcDEQ-1
activation (kind ``"nonnegative"``); being unbounded, a fixed point needs the recurrent
weights small enough (its slope tends to 0, so any W >= 0 works far out).

The plugin also registers a cell, ``pcdeq-sqrt1pm1``: a pcDEQ-1 block with this activation
and a 5x5 kernel on convolutional states (dense states get the dense block). Registering
the cell is all it takes to get every backbone, the harness and the comparison:
``build_model("single-conv", cell="pcdeq-sqrt1pm1")``, ``pcdeq-bench train --model
single-conv --cell pcdeq-sqrt1pm1``.
"""

from __future__ import annotations

import math

import torch

from pcdeq_plugin import ActivationSpec, CellSpec, ImplicitBlock, SolverConfig, hookimpl
from pcdeq_plugin.cells import PcDEQConv, PcDEQLinear


def sqrt1pm1(t: torch.Tensor) -> torch.Tensor:
    # t / (sqrt(1 + t) + 1) equals sqrt(1 + t) - 1 without cancellation near 0
    return t / (torch.sqrt(1.0 + t) + 1.0)


@hookimpl
def pcdeq_register_activations() -> dict[str, ActivationSpec]:
    return {
        "sqrt1pm1": ActivationSpec(
            "sqrt1pm1", sqrt1pm1, "nonnegative", math.inf, "sqrt(1 + t) - 1 (example plugin)"
        )
    }


def sqrt1pm1_cell(state_shape: tuple[int, ...], name: str, **options) -> ImplicitBlock:
    """pcDEQ-1 with ``sqrt1pm1``: dense for ``(width,)``, 5x5 conv for ``(C, H, W)``."""
    config = SolverConfig(**{k: options.pop(k) for k in ("tol", "max_iter") if k in options})
    kwargs = {"activation": "sqrt1pm1", "variant": 1, "config": config, "name": name, **options}
    if len(state_shape) == 1:
        return PcDEQLinear(state_shape[0], **kwargs)
    return PcDEQConv(state_shape[0], kernel_size=5, **kwargs)


@hookimpl
def pcdeq_register_cells() -> dict[str, CellSpec]:
    return {
        "pcdeq-sqrt1pm1": CellSpec(
            "pcdeq-sqrt1pm1",
            sqrt1pm1_cell,
            family="pcdeq",
            description="pcDEQ-1 with sqrt(1 + t) - 1, 5x5 conv kernel (example plugin)",
            options=("tol", "max_iter", "beta", "init_scale"),
        )
    }
